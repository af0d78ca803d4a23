"""How many API connections each client may hold, and how many there may be in all.

An API that needs no token for some endpoints (CA roots) is open to anyone on the host:
without bounds, a thousand held blocking queries exhaust the agent's file descriptors,
and then the supervisor cannot open a proxy's log files or save the record -- an API
flood would stop restarts. So:

* in total, the API holds at most the open-file limit minus a reserve kept for
  supervision (256 plus 4 per managed proxy: pidfds, log files, record writes,
  health probes), or ``limits.http_max_conns`` if that is lower;
* per client, at most ``limits.http_max_conns_per_client`` (Consul 1.6+'s setting,
  default 200; 0 turns it off). A client is its address until its first request
  says who it is: connections carrying a proxy's token count against that proxy
  (so a host with hundreds of proxies on loopback is not one client), connections
  carrying the master token are never refused by this limit;
* anonymous requests (no proxy or master token) may hold all but the last
  ``IDENTIFIED_HEADROOM`` connections of the total, so a flood of anonymous blocking
  queries from many addresses still leaves room for proxies and the operator.

Over a limit, the connection is answered 429 and closed (as Consul does), never left
hanging; the refusal is logged once a minute per client, not per connection.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("supervisor.api")

FD_RESERVE = 256
FD_RESERVE_PER_PROXY = 4
IDENTIFIED_HEADROOM = 64
TOO_MANY = "Your IP is issuing too many concurrent connections, please rate limit your calls\n"
SATURATED = "The agent is at its limit of API connections; try again shortly\n"


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


@dataclass(frozen=True)
class Caps:
    per_client: int  # 0: no per-client limit
    total: int


def open_file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def caps_for(per_client: int, max_total: int, proxies: int, file_limit: int) -> Caps:
    """The limits for a configuration (``max_total`` 0: only the open-file limit counts)."""
    reserve = FD_RESERVE + FD_RESERVE_PER_PROXY * proxies
    total = max(16, file_limit - reserve)
    if max_total > 0:
        total = min(total, max_total)
    return Caps(per_client, total)


class ConnectionBook:
    """Counts open connections by client; lives on the API's event loop (no locks).

    A connection counts against its address until a request on it names who it speaks
    for (``identified``: ``proxy:<id>``, ``addr:<ip>``, or None for the master token,
    which is never limited).
    """

    def __init__(self, caps: Callable[[], Caps]) -> None:
        self.caps = caps
        self.total = 0
        self.anonymous = 0  # connections counted by address (no proxy or master token seen)
        self._principal: dict[object, str | None] = {}
        self._held: Counter[str] = Counter()
        self._last_warning: dict[str, float] = {}

    @property
    def full(self) -> bool:
        """At the total cap: accept nothing more until a connection closes."""
        if self.total >= self.caps().total:
            self._warn("all clients", f"{self.total} connections are open in all (limits.http_max_conns)")
            return True
        return False

    def opened(self, connection: object, host: str) -> Refusal | None:
        """Every accepted connection is counted (a refused one too, until it is closed)."""
        principal = f"addr:{host}"
        self.total += 1
        self._principal[connection] = principal
        self._hold(principal)
        per_client = self.caps().per_client
        if per_client and self._held[principal] > per_client:
            self._warn(principal, f"{host} holds {per_client} (limits.http_max_conns_per_client)")
            return Refusal(429, TOO_MANY)
        return None

    def identified(self, connection: object, principal: str | None) -> Refusal | None:
        """A request arrived on ``connection``: count it against whom it speaks for."""
        if connection not in self._principal:
            return None
        previous = self._principal[connection]
        if principal != previous:
            self._release(previous)
            self._principal[connection] = principal
            if principal is not None:
                self._hold(principal)
        if principal is None:
            return None
        caps = self.caps()
        headroom = min(IDENTIFIED_HEADROOM, caps.total // 4)
        if principal.startswith("addr:") and self.anonymous > caps.total - headroom:
            self._warn(
                "anonymous", f"{self.anonymous} anonymous connections are open (limits.http_max_conns)"
            )
            return Refusal(429, SATURATED)
        if caps.per_client and self._held[principal] > caps.per_client:
            held = self._held[principal] - 1
            self._warn(principal, f"{principal} holds {held} (limits.http_max_conns_per_client)")
            return Refusal(429, TOO_MANY)
        return None

    def connections(self) -> list[object]:
        return list(self._principal)

    def closed(self, connection: object) -> None:
        if connection not in self._principal:
            return
        self.total -= 1
        self._release(self._principal.pop(connection))

    def held_by(self, principal: str) -> int:
        return self._held[principal]

    def _hold(self, principal: str) -> None:
        self._held[principal] += 1
        if principal.startswith("addr:"):
            self.anonymous += 1

    def _release(self, principal: str | None) -> None:
        if principal is None:
            return
        if principal.startswith("addr:"):
            self.anonymous -= 1
        self._held[principal] -= 1
        if self._held[principal] <= 0:
            del self._held[principal]

    def _warn(self, key: str, detail: str) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, -1e9) >= 60:
            self._last_warning[key] = now
            log.warning("refusing API connections with 429: %s", detail)
