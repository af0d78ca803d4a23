"""What the listeners and connections of one proxy share (event-loop thread only)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from builtin_proxy.authz import Authorizer
from builtin_proxy.config import ProxyConfig
from builtin_proxy.loop import EventLoop
from builtin_proxy.pump import Connection
from builtin_proxy.stats import ProxyStats
from builtin_proxy.tls import Identity
from builtin_proxy.tunnels import PublicTunnel, TunnelPool


class Pending(Protocol):
    """A connection still being set up (handshake, authorization, dial)."""

    def close(self) -> None: ...


@dataclass
class Runtime:
    loop: EventLoop
    agent_address: str
    token: str
    config: ProxyConfig
    authorizer: Authorizer
    identity: Identity = field(default_factory=Identity)
    datacenter: str = ""
    connections: set[Connection] = field(default_factory=set)
    pending: set[Pending] = field(default_factory=set)
    # resumable TLS sessions by (host, port, identity generation, tunnel) of the instance dialled
    sessions: dict[tuple[str, int, int, bool], ssl.SSLSession] = field(default_factory=dict)
    identity_waiters: list[Callable[[], None]] = field(default_factory=list)
    stats: ProxyStats = field(default_factory=ProxyStats)
    tunnels: set[PublicTunnel] = field(default_factory=set)  # at our public listener
    pool: TunnelPool = field(init=False)  # our upstreams' idle tunnels

    def __post_init__(self) -> None:
        self.pool = TunnelPool(self.loop, self.stats.tunnels)

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
