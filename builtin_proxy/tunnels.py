"""Reusable tunnels (wire format in ``frames.py``): the upstream side's pool, and the
public side's handling of a tunnel between streams.

Upstream side: after a stream, a tunnel goes back to the pool of its instance (host, port,
and the generation of our certificates it was made with), bounded per instance and in
total; an idle tunnel is closed after ``IDLE_TIMEOUT``, when the peer closes it or says
GOAWAY, and when our certificates change (new streams then use new tunnels; a busy tunnel
finishes its stream first). Public side: each stream is authorized (intentions may have
changed since the last) and the app is dialled only for an authorized one; an idle tunnel
is told GOAWAY after ``PUBLIC_IDLE_TIMEOUT`` or when our certificates change. TCP
keepalive finds peers that vanished without a word.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from builtin_proxy.frames import Frame, FrameReader, ProtocolError, Stream, header
from builtin_proxy.loop import READ, EventLoop, Timer
from builtin_proxy.sockets import Dial
from builtin_proxy.stats import Phase, Rejection, TunnelStats

if TYPE_CHECKING:
    from builtin_proxy.runtime import Runtime

log = logging.getLogger("builtin_proxy.tunnels")

IDLE_TIMEOUT = 30.0
PUBLIC_IDLE_TIMEOUT = 90.0  # longer than the upstream side's: it closes first, cleanly
GOAWAY_GRACE = 10.0  # then a tunnel told to go is closed by the public side
MAX_PUBLIC_TUNNELS = 2048  # held open by peers at one public listener
MAX_IDLE_PER_INSTANCE = 16
MAX_IDLE = 256
PoolKey = tuple[str, int, int]  # host, port, certificate generation


def keepalive(sock: socket.socket) -> None:
    """Find a peer that vanished (host down, cable cut) within about a minute."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass


class _Idle:
    __slots__ = ("tls", "reader", "timer", "key")

    def __init__(self, tls: ssl.SSLSocket, reader: FrameReader, key: PoolKey, timer: Timer) -> None:
        self.tls, self.reader, self.key, self.timer = tls, reader, key, timer


class TunnelPool:
    """Idle tunnels of the upstream side, most recently used first."""

    def __init__(self, loop: EventLoop, stats: TunnelStats) -> None:
        self.loop = loop
        self.idle: dict[PoolKey, OrderedDict[int, _Idle]] = {}
        self.stats = stats

    def take(self, key: PoolKey) -> tuple[ssl.SSLSocket, FrameReader] | None:
        while tunnels := self.idle.get(key):
            entry = tunnels[next(reversed(tunnels))]  # the most recently used
            self._forget(entry, close=False)
            if entry.tls.fileno() >= 0:
                self.stats.reused += 1
                return entry.tls, entry.reader
        return None

    def give(self, key: PoolKey, tls: ssl.SSLSocket, reader: FrameReader, generation: int) -> None:
        """A tunnel whose stream is over; kept if it is current and there is room."""
        tunnels = self.idle.setdefault(key, OrderedDict())
        if key[2] != generation or len(tunnels) >= MAX_IDLE_PER_INSTANCE or self.stats.idle >= MAX_IDLE:
            if key[2] != generation:
                self.stats.retired += 1
            close_tunnel(self.loop, tls)
            return
        fd = tls.fileno()
        entry = _Idle(tls, reader, key, self.loop.call_later(IDLE_TIMEOUT, self._expire, fd, key))
        tunnels[fd] = entry
        self.stats.idle += 1
        self.loop.watch(fd, READ, lambda _fd, _events: self._readable(entry))
        if tls.pending() or reader.rest:
            self._readable(entry)

    def drop(self, host: str, port: int) -> None:
        """The instance left discovery (unhealthy, deregistered): close its idle tunnels."""
        for key in [key for key in self.idle if key[:2] == (host, port)]:
            for entry in list(self.idle[key].values()):
                self.stats.retired += 1
                self._forget(entry)

    def retire(self, generation: int) -> None:
        """Our certificates changed: idle tunnels made with the old ones are closed."""
        for key in [key for key in self.idle if key[2] != generation]:
            for entry in list(self.idle[key].values()):
                self.stats.retired += 1
                self._forget(entry)

    def close(self) -> None:
        for tunnels in list(self.idle.values()):
            for entry in list(tunnels.values()):
                self._forget(entry)

    def _readable(self, entry: _Idle) -> None:
        """An idle tunnel has something to say: GOAWAY, or its end. Either way it goes."""
        try:
            if entry.reader.rest:
                entry.reader.feed(memoryview(b""), _no_data, _expect_goaway)
            data = entry.tls.recv(4096)
            if data:
                entry.reader.feed(memoryview(data), _no_data, _expect_goaway)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ssl.SSLError, ProtocolError):
            pass
        except _GoAway:
            self.stats.retired += 1
        self._forget(entry)

    def _expire(self, fd: int, key: PoolKey) -> None:
        tunnels = self.idle.get(key)
        entry = tunnels.get(fd) if tunnels is not None else None
        if entry is not None:
            self.stats.retired += 1
            self._forget(entry)

    def _forget(self, entry: _Idle, *, close: bool = True) -> None:
        tunnels = self.idle.get(entry.key)
        fd = entry.tls.fileno()
        if tunnels is not None and tunnels.pop(fd, None) is not None:
            self.stats.idle -= 1
        if tunnels is not None and not tunnels:
            del self.idle[entry.key]
        entry.timer.cancel()
        if fd >= 0:
            self.loop.unwatch(fd)
        if close:
            close_tunnel(self.loop, entry.tls)


class _GoAway(Exception):
    pass


def _no_data(_payload: memoryview) -> None:
    raise ProtocolError("data on an idle tunnel")


def _expect_goaway(frame: Frame) -> None:
    if frame is Frame.GOAWAY:
        raise _GoAway
    raise ProtocolError(f"{frame.name} on an idle tunnel")


def close_tunnel(loop: EventLoop, tls: ssl.SSLSocket) -> None:
    """Stop watching a tunnel and close it (once; a closed one is left alone)."""
    fd = tls.fileno()
    if fd >= 0:
        loop.unwatch(fd)
        try:
            tls.close()
        except OSError:
            pass


class PublicTunnel:
    """A tunnel at the public listener: waits for OPEN, authorizes, dials, relays, and
    waits again."""

    __slots__ = (
        "runtime",
        "tls",
        "uri",
        "serial",
        "reader",
        "timer",
        "early",
        "early_fin",
        "early_reset",
        "stream",
        "since",
        "closing",
        "told_at",
    )

    def __init__(self, runtime: Runtime, tls: ssl.SSLSocket, uri: str, serial: str) -> None:
        self.runtime = runtime
        self.tls = tls
        self.uri = uri
        self.serial = serial
        self.reader = FrameReader()
        self.timer: Timer | None = None
        self.early = bytearray()  # stream bytes that came with the OPEN
        self.early_fin = False
        self.early_reset = False
        self.stream: Stream | None = None
        self.since = 0.0
        self.closing = False  # GOAWAY wanted (sent as soon as no stream runs)
        self.told_at: float | None = None  # when GOAWAY was sent (monotonic)
        keepalive(tls)
        runtime.tunnels.add(self)
        runtime.stats.tunnels.public += 1
        self._idle()

    # -- between streams ---------------------------------------------------------------------

    def _idle(self) -> None:
        self.stream = None
        self.early, self.early_fin, self.early_reset = bytearray(), False, False
        loop = self.runtime.loop
        if self.told_at is None:  # (once told, the grace's timer runs on: see goaway)
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_later(PUBLIC_IDLE_TIMEOUT, self.goaway)
        if len(self.runtime.tunnels) > MAX_PUBLIC_TUNNELS:
            self.goaway()  # too many held open: the newest idle one is asked to go
        loop.watch(self.tls.fileno(), READ, self._readable)
        if self.tls.pending() or self.reader.rest:
            self._readable(self.tls.fileno(), READ)

    def goaway(self) -> None:
        """Ask the upstream side to open nothing more here (it closes the tunnel). A peer
        that ignores it gets the streams it opens within GOAWAY_GRACE (one may have crossed
        the GOAWAY), and then the tunnel is closed, once no stream runs."""
        if self.tls.fileno() < 0 or self.told_at is not None:
            return
        self.closing = True
        if self.stream is None:
            try:
                self.tls.write(header(Frame.GOAWAY))
            except (OSError, ssl.SSLError):
                self.close()
                return
            self.told_at = time.monotonic()
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.runtime.loop.call_later(GOAWAY_GRACE, self._grace_over)
        # (a busy tunnel says it when its stream is over)

    def _grace_over(self) -> None:
        self.timer = None
        stream = self.stream
        if stream is None or stream.finished or stream.plain is None:
            self.close()  # (idle, or a refused stream whose RESET the peer never answers)
        # (else closed when that stream is over: ``_stream_done``)

    def _told_long_ago(self) -> bool:
        return self.told_at is not None and time.monotonic() - self.told_at >= GOAWAY_GRACE

    def _readable(self, fd: int, _events: int) -> None:
        opened = False

        def on_data(payload: memoryview) -> None:
            if not opened or self.early_fin:
                raise ProtocolError("data before OPEN or after FIN")
            self.early += payload

        def on_frame(frame: Frame) -> None:
            nonlocal opened
            if frame is Frame.OPEN and not opened:
                opened = True
            elif frame is Frame.FIN and opened and not self.early_fin:
                self.early_fin = True
            elif frame is Frame.RESET and opened and not self.early_reset:
                self.early_reset = True  # the client went before its stream started
            else:
                raise ProtocolError(f"{frame.name} out of order on an idle tunnel")

        try:
            if self.reader.rest:  # frames the last stream left unread (this stream's OPEN)
                self.reader.feed(memoryview(b""), on_data, on_frame)
            while not opened:
                data = self.tls.recv(65536)
                if not data:
                    self.close()
                    return
                self.reader.feed(memoryview(data), on_data, on_frame)
                if not self.tls.pending():
                    break
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if not opened:
                return
        except (OSError, ssl.SSLError, ProtocolError) as exc:
            log.debug("tunnel from %s closed: %s", self.uri, exc)
            self.close()
            return
        if opened:
            self._open(fd)

    # -- one stream ------------------------------------------------------------------------

    def _open(self, fd: int) -> None:
        runtime = self.runtime
        if self._told_long_ago():
            log.debug("tunnel from %s ignored GOAWAY: closed", self.uri)
            self.close()
            return
        runtime.loop.unwatch(fd)  # the stream's bytes wait in TLS until the app is connected
        if self.timer is not None and self.told_at is None:
            self.timer.cancel()  # (the idle timer; a GOAWAY's grace runs on)
            self.timer = None
        stats = runtime.stats.public
        stats.accepted += 1
        self.since = time.monotonic()
        runtime.authorizer.authorize(self.uri, self.serial, self._decided)

    def _decided(self, allowed: bool, reason: str) -> None:
        if self.tls.fileno() < 0:
            return
        runtime = self.runtime
        self.since = runtime.stats.public.phase_done(Phase.AUTHORIZATION, self.since)
        if self.early_reset:
            self._abort(count=None)
            return
        if not allowed:
            log.info("denied %s -> %s: %s", self.uri, runtime.config.service, reason)
            self.closing = True  # a denied peer does not keep its tunnel (GOAWAY once refused)
            self._refuse(Rejection.AUTHORIZATION)
            return
        target = runtime.config.local_service
        if target is None:
            log.warning("no local_service_address: cannot forward the connection from %s", self.uri)
            self._refuse(Rejection.DIAL)
            return
        timeout = runtime.config.local_connect_timeout_ms / 1000
        Dial(runtime.loop, target, timeout, self._connected, self._dial_failed)

    def _connected(self, app: socket.socket) -> None:
        runtime = self.runtime
        if self.tls.fileno() < 0:  # the tunnel closed during the dial
            app.close()
            return
        stats = runtime.stats.public
        stats.phase_done(Phase.DIAL, self.since)
        if self.early_reset:
            app.close()
            self._abort(count=None)
            return
        stream = Stream(
            runtime.loop, app, self.tls, self.reader, self._stream_done, stats, inbound_is_plain=False
        )
        self.stream = stream
        try:  # ("the stream is up", then what came with the OPEN)
            stream.start(first=header(Frame.DATA, 0), early=bytes(self.early), early_fin=self.early_fin)
        except ProtocolError as exc:
            log.debug("tunnel from %s closed: %s", self.uri, exc)
            self.close()  # (the stream's app socket with it)

    def _dial_failed(self, exc: OSError, timed_out: bool) -> None:
        if self.tls.fileno() < 0:
            return
        target = self.runtime.config.local_service
        reason = "took longer than local_connect_timeout_ms" if timed_out else exc.strerror or exc
        log.warning("cannot reach the local service at %s: %s", target, reason)
        self._refuse(Rejection.DIAL)

    def _refuse(self, reason: Rejection) -> None:
        self._abort(count=reason)

    def _abort(self, count: Rejection | None) -> None:
        """End this stream with RESET (then skip its frames until the upstream's RESET)."""
        if count is not None:
            self.runtime.stats.public.reject(count)
        runtime = self.runtime
        stream = Stream(
            runtime.loop, None, self.tls, self.reader, self._stream_done, None, inbound_is_plain=False
        )
        self.stream = stream
        stream.got_fin, stream.got_reset = self.early_fin, self.early_reset
        stream.start()
        if not stream.finished:
            stream.reset()
        if not stream.finished and self.timer is None:
            # A peer that never answers our RESET does not hold the tunnel with it.
            self.timer = runtime.loop.call_later(GOAWAY_GRACE, self.close)

    def _stream_done(self, _stream: Stream, reusable: bool) -> None:
        if not reusable or self.tls.fileno() < 0 or self._told_long_ago():
            self.close()
            return
        if self.timer is not None and self.told_at is None:
            self.timer.cancel()  # (an aborted stream's wait for the peer's RESET)
            self.timer = None
        self._idle()
        if self.closing:
            self.goaway()

    def close(self) -> None:
        runtime = self.runtime
        if self in runtime.tunnels:
            runtime.tunnels.discard(self)
            runtime.stats.tunnels.public -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.stream is not None and not self.stream.finished:
            self.stream.broken()
        close_tunnel(runtime.loop, self.tls)
