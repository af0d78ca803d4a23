"""Upstream (outbound) listeners: plain TCP in, mutual TLS to a healthy instance.

Discovery is cached: a watch thread long-polls ``/v1/health/connect/<name>?passing``
(or executes the prepared query with ``connect=true``) and hands every new instance
list to the loop, so a connection costs no agent round trip and an instance whose proxy
died drops out as soon as the agent knows. Per connection: a random healthy instance,
TCP connect and TLS handshake within one ``connect_timeout_ms`` budget, then the
server's SPIFFE URI must equal the destination's exactly. TLS sessions are resumed
per instance (no certificate signing or checking on a resumed handshake).
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NamedTuple

from builtin_proxy.agent import AgentConnection, Watch
from builtin_proxy.config import UpstreamConfig
from builtin_proxy.frames import Frame, FrameReader, Stream, header
from builtin_proxy.loop import READ, WRITE, Timer
from builtin_proxy.pump import Connection
from builtin_proxy.runtime import Runtime
from builtin_proxy.sockets import AcceptPauser, listen, stream_socket, tune
from builtin_proxy.stats import Phase, Rejection
from builtin_proxy.tls import TUNNEL_ALPN, peer_uri
from builtin_proxy.tunnels import close_tunnel, keepalive

log = logging.getLogger("builtin_proxy.upstream")


class Endpoint(NamedTuple):
    """Where a healthy instance of an upstream's destination accepts mutual TLS."""

    host: str
    port: int
    service: str  # the destination service: the identity its certificate must carry
    datacenter: str


def endpoints_from(entries: Any) -> list[Endpoint]:
    """Health entries (service endpoint or prepared query ``Nodes``) to dialable instances."""
    found = []
    for entry in entries or []:
        service, node = entry.get("Service") or {}, entry.get("Node") or {}
        if service.get("Kind") == "connect-proxy":
            destination = service.get("ProxyDestination") or (service.get("Proxy") or {}).get(
                "DestinationServiceName"
            )
        elif (service.get("Connect") or {}).get("Native"):
            destination = service.get("Service")
        else:
            continue  # not Connect-capable
        host = service.get("Address") or node.get("Address") or ""
        port = service.get("Port") or 0
        if destination and host and port:
            found.append(Endpoint(str(host), int(port), str(destination), str(node.get("Datacenter") or "")))
    return found


class Discovery:
    """The healthy instances of one upstream destination, kept current by a watch."""

    def __init__(self, runtime: Runtime, upstream: UpstreamConfig) -> None:
        self.runtime = runtime
        self.upstream = upstream
        self.instances: list[Endpoint] = []
        self.loaded = False
        self.waiters: list[Callable[[], None]] = []
        name = urllib.parse.quote(upstream.destination_name, safe="")
        dc = f"&dc={urllib.parse.quote(upstream.datacenter)}" if upstream.datacenter else ""
        if upstream.destination_type == "prepared_query":
            path = f"/v1/query/{name}/execute?connect=true{dc}"
            unpack: Callable[[Any], Any] = lambda data: (data or {}).get("Nodes")  # noqa: E731
        else:
            path = f"/v1/health/connect/{name}?passing=1{dc}"
            unpack = lambda data: data  # noqa: E731
        self.watch = Watch(
            f"discovery {upstream}",
            AgentConnection(runtime.agent_address, runtime.token),
            path,
            runtime.loop.call_soon_threadsafe,
            lambda data: self._update(endpoints_from(unpack(data))),
        )
        self.watch.start()

    def _update(self, instances: list[Endpoint]) -> None:
        if sorted(instances) != sorted(self.instances):
            log.debug("%s: %d healthy instance(s)", self.upstream, len(instances))
            gone = {(e.host, e.port) for e in self.instances} - {(e.host, e.port) for e in instances}
            for host, port in gone:  # an instance that left discovery: its pooled tunnels go too
                self.runtime.pool.drop(host, port)
        self.instances = instances
        self.loaded = True
        waiters, self.waiters = self.waiters, []
        for wake in waiters:
            wake()

    def pick(self) -> Endpoint | None:
        return random.choice(self.instances) if self.instances else None

    def close(self) -> None:
        self.watch.stop()
        self.waiters.clear()


class UpstreamListener:
    def __init__(self, runtime: Runtime, upstream: UpstreamConfig) -> None:
        self.runtime = runtime
        self.upstream = upstream
        self.sock = listen(upstream.listen, f"upstream {upstream.destination_name}")
        self.stats = runtime.stats.upstream(upstream.destination_name)
        self.pauser = AcceptPauser(runtime.loop, self.sock, self._accept, f"upstream {upstream}")
        self.discovery = Discovery(runtime, upstream)
        runtime.loop.watch(self.sock.fileno(), READ, self._accept)
        log.info("upstream %s listening", upstream)

    def _accept(self, _fd: int, _events: int) -> None:
        for _ in range(64):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.pauser.failed(exc)
                return
            tune(client)
            self.stats.accepted += 1
            _Outbound(self.runtime, self, client)

    def close(self) -> None:
        self.runtime.loop.unwatch(self.sock.fileno())
        self.sock.close()
        self.discovery.close()


class _Outbound:
    """One local connection, from picking an instance to a running Connection."""

    __slots__ = (
        "runtime",
        "listener",
        "client",
        "tls",
        "timer",
        "instance",
        "deadline",
        "generation",
        "since",
        "connected",
    )

    def __init__(self, runtime: Runtime, listener: UpstreamListener, client: socket.socket) -> None:
        self.runtime = runtime
        self.listener = listener
        self.client = client
        self.tls: ssl.SSLSocket | None = None
        self.instance: Endpoint | None = None
        budget = listener.upstream.connect_timeout_ms / 1000
        self.deadline = time.monotonic() + budget
        self.timer: Timer | None = runtime.loop.call_later(budget, self._timeout)
        self.generation = 0
        self.since = time.monotonic()  # the start of the phase under way
        self.connected = False  # TCP is up: what remains is the handshake
        runtime.pending.add(self)
        self._try()

    def _try(self) -> None:
        """Dial once the identity and an instance are known (or give up at the deadline)."""
        if self.client.fileno() < 0:
            return
        runtime = self.runtime
        discovery = self.listener.discovery
        if not runtime.identity.ready:
            runtime.identity_waiters.append(self._try)
            return
        instance = discovery.pick()
        if instance is None:
            if discovery.loaded:  # the agent answered: there is none (Consul's behaviour too)
                log.warning("%s: no healthy instances found", self.listener.upstream)
                self._fail(Rejection.DIAL)
                return
            discovery.waiters.append(self._try)  # first answer still on its way
            return
        self.instance = instance
        self.since = time.monotonic()
        host, port, _, _ = instance
        tunnels = runtime.config.tunnels
        if tunnels:
            pooled = runtime.pool.take((host, port, runtime.identity.generation))
            if pooled is not None:  # no dial, no handshake: a tunnel that is already up
                self.generation = runtime.identity.generation
                self._stream(*pooled)
                return
        raw = stream_socket(host)
        try:
            raw.connect((host, port))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            raw.close()
            self._dial_failed(exc)
            return
        context = runtime.identity.tunnel_client if tunnels else runtime.identity.client
        assert context is not None
        self.generation = runtime.identity.generation
        session = runtime.sessions.get((host, port, self.generation, tunnels))
        try:
            self.tls = context.wrap_socket(
                raw, server_side=False, do_handshake_on_connect=False, session=session
            )
        except OSError as exc:  # the connect already failed (refused at once, on loopback)
            raw.close()
            self._dial_failed(exc)
            return
        runtime.loop.watch(self.tls.fileno(), WRITE, self._handshake)

    def _handshake(self, fd: int, _events: int) -> None:
        loop = self.runtime.loop
        assert self.tls is not None
        if not self.connected:  # first call: the socket became writable, TCP is up
            self.connected = True
            self._phase_done(Phase.DIAL)
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            loop.watch(fd, READ, self._handshake)
            return
        except ssl.SSLWantWriteError:
            loop.watch(fd, WRITE, self._handshake)
            return
        except (ssl.SSLError, OSError) as exc:
            self._dial_failed(exc)
            return
        loop.unwatch(fd)
        self._phase_done(Phase.HANDSHAKE)
        assert self.instance is not None
        host, port, destination, datacenter = self.instance
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connected to %s:%d (TLS session resumed: %s)", host, port, self.tls.session_reused)
        identity, where = self.runtime.identity, datacenter or self.runtime.datacenter
        expected = identity.expected_uri(destination, where)
        got = peer_uri(self.tls)
        if not identity.accepts(got, destination, where):
            log.warning(
                "%s: peer certificate mismatch at %s:%d: got %s, want %s",
                self.listener.upstream,
                host,
                port,
                got,
                expected,
            )
            self._fail(Rejection.IDENTITY)
            return
        if self.tls.selected_alpn_protocol() == TUNNEL_ALPN:
            keepalive(self.tls)
            self._keep_session(self.tls, tunnel=True)
            self._stream(self.tls, FrameReader())
            return
        self._cancel_timer()
        self.runtime.pending.discard(self)
        connection = Connection(
            loop, self.client, self.tls, self._closed, self.listener.stats, client_is_plain=True
        )
        self.runtime.connections.add(connection)
        connection.start()

    def _stream(self, tls: ssl.SSLSocket, reader: FrameReader) -> None:
        """Carry this client connection over a tunnel (pooled, or just made)."""
        self._cancel_timer()
        self.runtime.pending.discard(self)
        stream = Stream(
            self.runtime.loop,
            self.client,
            tls,
            reader,
            self._stream_done,
            self.listener.stats,
            inbound_is_plain=True,
        )
        # The public side answers every OPEN (the stream is up, or RESET); a pooled tunnel to a
        # peer that hangs must not hold the client longer than a dial would.
        stream.start(first=header(Frame.OPEN), ack_timeout=self.listener.upstream.connect_timeout_ms / 1000)

    def _stream_done(self, stream: Stream, reusable: bool) -> None:
        instance = self.instance
        if reusable and instance is not None:
            key = (instance[0], instance[1], self.generation)
            self.runtime.pool.give(key, stream.tunnel, stream.reader, self.runtime.identity.generation)
        else:
            close_tunnel(self.runtime.loop, stream.tunnel)

    def _closed(self, connection: Connection) -> None:
        self.runtime.forget(connection)
        self._keep_session(connection.tls, tunnel=False)

    def _keep_session(self, tls: ssl.SSLSocket, *, tunnel: bool) -> None:
        if tls.session_reused:
            return  # the cached session still works; reading it back costs a DER round trip
        session = tls.session
        if session is not None and session.has_ticket and self.instance is not None:
            host, port, _, _ = self.instance
            self.runtime.sessions[(host, port, self.generation, tunnel)] = session

    def _dial_failed(self, exc: BaseException) -> None:
        instance = self.instance
        where = f"{instance[0]}:{instance[1]}" if instance else "?"
        reason = getattr(exc, "strerror", None) or str(exc)
        if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
            reason = "connection refused"
        log.warning("%s: failed to dial %s: %s", self.listener.upstream, where, reason)
        self._fail(Rejection.HANDSHAKE if self.connected else Rejection.DIAL)

    def _timeout(self) -> None:
        self.timer = None
        log.warning("%s: no connection within connect_timeout_ms", self.listener.upstream)
        self._fail(Rejection.HANDSHAKE if self.connected else Rejection.DIAL)

    def _phase_done(self, phase: Phase) -> None:
        self.since = self.listener.stats.phase_done(phase, self.since)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fail(self, reason: Rejection | None = None) -> None:
        if reason is not None:
            self.listener.stats.reject(reason)
        self._cancel_timer()
        self.runtime.pending.discard(self)
        loop = self.runtime.loop
        for sock in (self.tls, self.client):
            if sock is not None and sock.fileno() >= 0:
                loop.unwatch(sock.fileno())
                sock.close()

    def close(self) -> None:
        self._fail()
