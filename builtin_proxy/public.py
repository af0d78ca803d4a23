"""The public (inbound) listener: mutual TLS in, plain TCP to the local service.

Per connection: TLS handshake (client certificate required and verified against the
CA roots) within ``handshake_timeout_ms``, then the client's SPIFFE identity is
authorized, and only an authorized connection dials the local service (within
``local_connect_timeout_ms``). Consul dialled the app first and authorized later, so a
denied client still reached the app; here it never does.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import time

from builtin_proxy.loop import READ, WRITE, Timer
from builtin_proxy.pump import Connection
from builtin_proxy.runtime import Runtime
from builtin_proxy.sockets import AcceptPauser, Dial, listen, tune
from builtin_proxy.stats import Phase, Rejection
from builtin_proxy.tls import TUNNEL_ALPN, parse_service_uri, peer_uri
from builtin_proxy.tunnels import PublicTunnel

log = logging.getLogger("builtin_proxy.public")


class PublicListener:
    def __init__(self, runtime: Runtime, address: tuple[str, int]) -> None:
        self.runtime = runtime
        self.address = address
        self.sock = listen(address, "public listener")
        self.pauser = AcceptPauser(runtime.loop, self.sock, self._accept, "the public listener")
        runtime.loop.watch(self.sock.fileno(), READ, self._accept)
        log.info("public listener on %s:%d", *address)

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
            self.runtime.stats.public.accepted += 1
            _Inbound(self.runtime, client)

    def close(self) -> None:
        self.runtime.loop.unwatch(self.sock.fileno())
        self.sock.close()


class _Inbound:
    """One accepted connection, from handshake to a running Connection."""

    __slots__ = ("runtime", "tls", "dial", "timer", "fd", "uri", "since", "stats")

    def __init__(self, runtime: Runtime, client: socket.socket) -> None:
        self.runtime = runtime
        self.stats = runtime.stats.public
        self.since = time.monotonic()  # the start of the phase under way
        self.dial: Dial | None = None
        self.uri = ""
        context = runtime.identity.server
        if context is None:  # no certificates yet: nobody can be verified
            self.stats.reject(Rejection.HANDSHAKE)
            client.close()
            return
        try:
            self.tls = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:  # the client is already gone
            log.debug("inbound connection lost before its handshake: %s", exc)
            client.close()
            return
        self.fd = self.tls.fileno()
        self.timer: Timer | None = runtime.loop.call_later(
            runtime.config.handshake_timeout_ms / 1000, self._timeout, "TLS handshake"
        )
        runtime.pending.add(self)
        self._handshake(self.fd, 0)

    def _handshake(self, fd: int, _events: int) -> None:
        loop = self.runtime.loop
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            loop.watch(fd, READ, self._handshake)
            return
        except ssl.SSLWantWriteError:
            loop.watch(fd, WRITE, self._handshake)
            return
        except (ssl.SSLError, OSError) as exc:
            log.debug("inbound TLS handshake failed: %s", exc)
            self._fail(Rejection.HANDSHAKE)
            return
        loop.unwatch(fd)
        self._cancel_timer()
        self._phase_done(Phase.HANDSHAKE)
        uri = peer_uri(self.tls)
        if uri is None or parse_service_uri(uri) is None:
            log.info("refused a client without a Connect service identity (URI %r)", uri)
            self._fail(Rejection.IDENTITY)
            return
        self.uri = uri
        serial = str((self.tls.getpeercert() or {}).get("serialNumber", ""))
        if self.tls.selected_alpn_protocol() == TUNNEL_ALPN:
            # Another built-in proxy: a peer the intentions deny may not even hold a
            # tunnel open; each stream it opens is authorized again.
            self.runtime.authorizer.authorize(uri, serial, functools.partial(self._tunnel, serial=serial))
            return
        self.runtime.authorizer.authorize(uri, serial, self._decided)

    def _tunnel(self, allowed: bool, reason: str, *, serial: str) -> None:
        if self.tls.fileno() < 0:
            return
        if not allowed:
            log.info("denied a tunnel %s -> %s: %s", self.uri, self.runtime.config.service, reason)
            self._fail(Rejection.AUTHORIZATION)
            return
        self.runtime.pending.discard(self)
        self.stats.accepted -= 1  # (counted per stream by the tunnel)
        PublicTunnel(self.runtime, self.tls, self.uri, serial)

    def _decided(self, allowed: bool, reason: str) -> None:
        if self.tls.fileno() < 0:
            return  # closed while waiting
        self._phase_done(Phase.AUTHORIZATION)
        if not allowed:
            log.info("denied %s -> %s: %s", self.uri, self.runtime.config.service, reason)
            self._fail(Rejection.AUTHORIZATION)
            return
        target = self.runtime.config.local_service
        if target is None:
            log.warning("no local_service_address: cannot forward the connection from %s", self.uri)
            self._fail(Rejection.DIAL)
            return
        timeout = self.runtime.config.local_connect_timeout_ms / 1000
        self.dial = Dial(self.runtime.loop, target, timeout, self._connected, self._app_failed)

    def _connected(self, app: socket.socket) -> None:
        self.dial = None
        self.runtime.pending.discard(self)
        self._phase_done(Phase.DIAL)
        connection = Connection(self.runtime.loop, app, self.tls, self.runtime.forget, self.stats)
        self.runtime.connections.add(connection)
        connection.start()

    def _app_failed(self, exc: OSError, timed_out: bool) -> None:
        self.dial = None
        if timed_out:
            log.info("dropped a connection: connect to the local service took longer than allowed")
        else:
            target = self.runtime.config.local_service
            log.warning("cannot reach the local service at %s: %s", target, exc.strerror or exc)
        self._fail(Rejection.DIAL)

    def _timeout(self, what: str) -> None:
        self.timer = None
        log.info("dropped a connection: %s took longer than allowed", what)
        self._fail(Rejection.HANDSHAKE)

    def _phase_done(self, phase: Phase) -> None:
        self.since = self.stats.phase_done(phase, self.since)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fail(self, reason: Rejection | None = None) -> None:
        if reason is not None:
            self.stats.reject(reason)
        self._cancel_timer()
        loop = self.runtime.loop
        self.runtime.pending.discard(self)
        if self.dial is not None:
            self.dial.cancel()
            self.dial = None
        if self.tls.fileno() >= 0:
            loop.unwatch(self.tls.fileno())
            self.tls.close()

    def close(self) -> None:
        self._fail()
