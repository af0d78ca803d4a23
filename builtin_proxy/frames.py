"""The tunnel wire format between two built-in proxies, and the framed byte pump.

A tunnel is a mutual-TLS connection whose ALPN is ``ALPN`` (offered only by our upstream
side; any other peer never selects it and gets one TLS connection per client connection,
as before). It carries one stream at a time; when a stream is over the tunnel goes back
to its upstream's pool and carries the next client connection without a new handshake.

Frame: a 4-byte header -- the type (1 byte) and the payload length (3 bytes, big-endian) --
then the payload.

    OPEN    upstream -> public   a new stream: authorize the tunnel's peer and dial the app
    DATA    both ways            payload bytes of the stream (at most 256 KiB per frame); the
                                 public side's first, empty, says the app is connected
    FIN     both ways            this side's half of the stream has ended (a TCP half-close)
    RESET   both ways            the stream is aborted (denied, app unreachable, client gone);
                                 the other side answers RESET unless it already sent one
    GOAWAY  public -> upstream   open no more streams here (idle too long, leaf renewed)

A stream is over for a side once it has sent and received FIN, or sent and received
RESET. Frames of an aborted stream that were already on their way are skipped until the
peer's RESET arrives.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from builtin_proxy.loop import READ, WRITE, EventLoop
from builtin_proxy.pump import BROKEN, READABLE, TLS_RECORD, WOULD_BLOCK, gather_records, shutdown_write
from builtin_proxy.stats import ListenerStats
from builtin_proxy.tls import TUNNEL_ALPN

log = logging.getLogger("builtin_proxy.frames")
ALPN = TUNNEL_ALPN
HEADER = 4
MAX_PAYLOAD = 256 * 1024 - HEADER
_OUT = bytearray(MAX_PAYLOAD + HEADER)  # plain -> tunnel: payload read behind its header
_OUT_VIEW = memoryview(_OUT)
_IN = bytearray(256 * 1024)  # tunnel -> plain
_IN_VIEW = memoryview(_IN)


class Frame(enum.IntEnum):
    OPEN = 1
    DATA = 2
    FIN = 3
    RESET = 4
    GOAWAY = 5


# A plain dict lookup: the enum's own constructor costs more than a small record's
# decryption, and this runs on every frame.
_FRAMES: dict[int, Frame] = {frame.value: frame for frame in Frame}
_DATA = Frame.DATA.value


def header(kind: Frame, length: int = 0) -> bytes:
    return bytes((kind, (length >> 16) & 0xFF, (length >> 8) & 0xFF, length & 0xFF))


class FrameReader:
    """Splits what the tunnel delivers into frames, across reads of any size."""

    __slots__ = ("rest", "payload_left", "kind")

    def __init__(self) -> None:
        self.rest = b""  # an incomplete header
        self.payload_left = 0  # of the DATA frame under way
        self.kind = Frame.DATA

    def feed(
        self,
        data: memoryview,
        on_data: Callable[[memoryview], None],
        on_frame: Callable[[Frame], bool | None],
    ) -> None:
        """Deliver ``data``'s frames. ``on_frame`` returning True stops the delivery: the
        rest is kept for whoever reads next (a stream that just ended must not be handed
        the next stream's OPEN). A DATA frame with no payload is delivered as empty data."""
        position, size = 0, len(data)
        if self.rest:
            data = memoryview(self.rest + bytes(data))
            self.rest, size = b"", len(data)
        while position < size:
            if self.payload_left:
                take = min(self.payload_left, size - position)
                self.payload_left -= take
                on_data(data[position : position + take])
                position += take
                continue
            if size - position < HEADER:
                self.rest = bytes(data[position:])
                return
            kind = data[position]
            length = (data[position + 1] << 16) | (data[position + 2] << 8) | data[position + 3]
            position += HEADER
            if kind == _DATA:
                if length > MAX_PAYLOAD:
                    raise ProtocolError(f"a DATA frame of {length} bytes (at most {MAX_PAYLOAD})")
                if length and length <= size - position:  # the whole payload is here
                    on_data(data[position : position + length])
                    position += length
                    continue
                self.payload_left = length
                if not length:
                    on_data(data[position:position])  # (the public side's "stream is up")
                continue
            frame = _FRAMES.get(kind)
            if frame is None:
                raise ProtocolError(f"unknown frame type {kind}")
            if length:
                raise ProtocolError(f"{frame.name} frame with a payload")
            elif on_frame(frame):
                self.rest = bytes(data[position:])
                return


class ProtocolError(Exception):
    """The peer broke the tunnel protocol: the tunnel is closed."""


class Stream:
    """One client connection carried over a tunnel: ``plain`` is the client (upstream side)
    or the app (public side); ``tunnel`` the TLS socket. Back-pressure per direction: a
    side that cannot take more stops the reading of the other. ``done(reusable)`` runs
    once, when the stream is over (``reusable``: the tunnel may carry another)."""

    __slots__ = (
        "loop",
        "plain",
        "tunnel",
        "reader",
        "done",
        "stats",
        "inbound_is_plain",
        "sent_fin",
        "got_fin",
        "sent_reset",
        "got_reset",
        "to_plain",
        "to_tunnel",
        "plain_ended",
        "finished",
        "keep",
        "upstream_side",
        "ack_timer",
        "_plain_fd",
        "_tunnel_fd",
        "_tls_write",
        "_tls_read",
        "_tls_pending",
        "_plain_mask",
        "_tunnel_mask",
    )

    def __init__(
        self,
        loop: EventLoop,
        plain: socket.socket | None,
        tunnel: ssl.SSLSocket,
        reader: FrameReader,
        done: Callable[[Stream, bool], None],
        stats: ListenerStats | None = None,
        *,
        inbound_is_plain: bool,
    ) -> None:
        self.loop = loop
        self.plain = plain
        self.tunnel = tunnel
        self.reader = reader
        self.done = done
        self.stats = stats
        self.inbound_is_plain = inbound_is_plain
        self.sent_fin = self.got_fin = self.sent_reset = self.got_reset = False
        self.to_plain: bytes | None = None  # congested: bytes the plain side has not taken
        self.to_tunnel: bytes | None = None
        self.plain_ended = plain is None
        self.finished = False
        self.keep = True  # False once the peer said GOAWAY: the tunnel ends with this stream
        self.upstream_side = inbound_is_plain  # (the side that opens streams and hears GOAWAY)
        self.ack_timer: Any = None  # upstream side: the public side has not said the stream is up
        self._plain_fd = plain.fileno() if plain is not None else -1
        self._tunnel_fd = tunnel.fileno()
        tls: Any = getattr(tunnel, "_sslobj", None) or tunnel
        self._tls_write: Callable[[Any], int] = tls.write
        self._tls_read: Callable[..., Any] = tls.read
        self._tls_pending: Callable[[], int] = tls.pending
        self._plain_mask = self._tunnel_mask = -1  # what the loop watches for now (-1: unknown)

    # -- starting and ending --------------------------------------------------------------

    def start(
        self, first: bytes = b"", early: bytes = b"", ack_timeout: float = 0.0, *, early_fin: bool = False
    ) -> None:
        """Begin relaying; ``first``: frames to send before anything else (OPEN, or the
        public side's empty DATA that says the stream is up); ``early``: stream bytes that
        arrived with the OPEN, and ``early_fin``: its FIN too (after those bytes);
        ``ack_timeout``: how long the public side may take to say the stream is up (a
        pooled tunnel to a hung peer must not hold the client)."""
        if self.stats is not None:
            self.stats.active += 1
        if ack_timeout:
            self.ack_timer = self.loop.call_later(ack_timeout, self._no_ack)
        if first:
            self._send(first)
        if early and not self.finished:
            self._data(memoryview(early))
        self.got_fin = self.got_fin or early_fin
        if self.got_fin and self.plain is not None and self.to_plain is None:
            shutdown_write(self.plain)
        if not self.finished:
            self._pump_tunnel()
        if not self.finished:
            self._update()

    def _no_ack(self) -> None:
        self.ack_timer = None
        log.warning("a pooled tunnel did not answer within connect_timeout_ms: closed it")
        self.broken()

    def reset(self) -> None:
        """Abort the stream (our side): RESET to the peer, then wait for its RESET. Bytes
        already on their way to the tunnel go first (TLS must retry them as they were)."""
        if self.sent_reset or self.finished:
            return
        self.sent_reset = True
        self._close_plain()
        self._send(header(Frame.RESET))
        self._check_over()
        if not self.finished:
            self._update()

    def _check_over(self) -> None:
        if self.finished:
            return
        clean = self.sent_fin and self.got_fin and self.to_plain is None and self.to_tunnel is None
        aborted = self.sent_reset and self.got_reset and self.to_tunnel is None
        if clean or aborted:
            self._finish(reusable=True)

    def _finish(self, *, reusable: bool) -> None:
        self.finished = True
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if self.stats is not None:
            self.stats.active -= 1
        self._close_plain()
        if self._tunnel_fd >= 0:
            self.loop.unwatch(self._tunnel_fd)
        done, self.done = self.done, _nothing
        # After the frames being delivered now: the next stream's may be among them.
        self.loop.call_later(0, done, self, reusable and self.keep)

    def broken(self) -> None:
        """The tunnel failed: the stream ends with it, the tunnel is not reused."""
        if not self.finished:
            self._finish(reusable=False)

    def _close_plain(self) -> None:
        if self.plain is not None:
            self.loop.unwatch(self._plain_fd)
            try:
                self.plain.close()
            except OSError:
                pass
            self.plain = None
            self.plain_ended = True

    # -- plain -> tunnel ---------------------------------------------------------------------

    def _pump_plain(self) -> None:
        plain = self.plain
        if plain is None or self.plain_ended or self.to_tunnel is not None:
            return
        for _ in range(32):
            try:
                count = plain.recv_into(_OUT_VIEW[HEADER:], MAX_PAYLOAD)
            except WOULD_BLOCK:
                return
            except OSError:
                self.reset()  # the client (or app) broke off
                return
            if count == 0:
                self.plain_ended = True
                self.sent_fin = True
                self._send(header(Frame.FIN))
                self._check_over()
                return
            if self.stats is not None:
                if self.inbound_is_plain:
                    self.stats.bytes_in += count
                else:
                    self.stats.bytes_out += count
            _OUT[0] = Frame.DATA
            _OUT[1], _OUT[2], _OUT[3] = (count >> 16) & 0xFF, (count >> 8) & 0xFF, count & 0xFF
            if not self._send(_OUT_VIEW[: HEADER + count]) or self.finished:
                return
            if count < MAX_PAYLOAD:
                return

    def _send(self, data: Any) -> bool:
        """Write frames to the tunnel; False when they had to be kept (congested) or failed."""
        if self.to_tunnel is not None:
            self.to_tunnel += bytes(data)
            return False
        try:
            sent = self._tls_write(data)
        except WOULD_BLOCK:
            sent = 0
        except BROKEN:
            self.broken()
            return False
        if sent < len(data):
            self.to_tunnel = bytes(data)  # TLS: retried with the same bytes
            return False
        return True

    def _flush_tunnel(self) -> None:
        pending = self.to_tunnel
        if pending is None:
            return
        try:
            sent = self._tls_write(pending)
        except WOULD_BLOCK:
            return
        except BROKEN:
            self.broken()
            return
        self.to_tunnel = pending[sent:] if sent < len(pending) else None
        self._check_over()

    # -- tunnel -> plain ---------------------------------------------------------------------

    def _pump_tunnel(self) -> None:
        for _ in range(32):  # bounded: one busy stream must not starve the others
            if self.to_plain is not None or self.finished:
                return
            try:
                count = self._tls_read(len(_IN), _IN)
            except WOULD_BLOCK:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                count = 0
            except BROKEN:
                self.broken()
                return
            if count == 0:
                self.broken()  # the peer closed the tunnel mid-stream
                return
            last = count
            if count == TLS_RECORD:  # the records queued behind a full one: one send to the app
                count, last = gather_records(self._tls_read, _IN, count)
            try:
                self.reader.feed(_IN_VIEW[:count], self._data, self._frame)
            except ProtocolError:
                self.broken()
                return
            if last < TLS_RECORD and not self._tls_pending():
                return
        if not self.finished and self.to_plain is None and self._tls_pending():
            # Decrypted bytes epoll cannot report: come back for them after the others.
            self.loop.call_later(0, self._on_tunnel, self._tunnel_fd, READ)

    def _data(self, payload: memoryview) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if self.got_fin and not self.sent_reset:
            raise ProtocolError("DATA after FIN")
        if self.sent_reset or self.plain is None or not payload:
            return  # an aborted stream's bytes, already on their way: skipped
        if self.stats is not None:
            if self.inbound_is_plain:
                self.stats.bytes_out += len(payload)
            else:
                self.stats.bytes_in += len(payload)
        if self.to_plain is not None:
            self.to_plain += bytes(payload)
            return
        try:
            sent = self.plain.send(payload)
        except WOULD_BLOCK:
            sent = 0
        except OSError:
            self.reset()
            return
        if sent < len(payload):
            self.to_plain = bytes(payload[sent:])

    def _frame(self, frame: Frame) -> bool:
        """One control frame; True when the stream is over (what follows is not ours)."""
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if frame is Frame.FIN:
            if self.got_fin:
                raise ProtocolError("FIN twice")
            self.got_fin = True
            if self.plain is not None and self.to_plain is None:
                shutdown_write(self.plain)
        elif frame is Frame.RESET:
            if self.got_reset:
                raise ProtocolError("RESET twice")
            self.got_reset = True
            if not self.sent_reset:
                self.reset()  # answered: both sides agree the stream is gone
        elif frame is Frame.GOAWAY and self.upstream_side:
            self.goaway()
        else:
            raise ProtocolError(f"{frame.name} in the middle of a stream")
        self._check_over()
        return self.finished

    def goaway(self) -> None:
        """The peer takes no more streams on this tunnel; this one runs to its end."""
        self.keep = False

    def _flush_plain(self) -> None:
        pending = self.to_plain
        if pending is None or self.plain is None:
            self.to_plain = None
            return
        try:
            sent = self.plain.send(pending)
        except WOULD_BLOCK:
            return
        except OSError:
            self.to_plain = None
            self.reset()
            return
        if sent < len(pending):
            self.to_plain = pending[sent:]
            return
        self.to_plain = None
        if self.got_fin:
            shutdown_write(self.plain)
        self._check_over()

    # -- events ---------------------------------------------------------------------------------

    # The other side is pumped at once only when this event drained what held it back
    # (the TLS side may then hold decrypted bytes that epoll cannot report); otherwise
    # epoll says when it has something, and a speculative read would be a wasted system
    # call on every message.

    def _on_plain(self, _fd: int, events: int) -> None:
        drained = False
        if events & WRITE and self.to_plain is not None:
            self._flush_plain()
            drained = self.to_plain is None
        if events & READABLE and not self.finished:
            self._pump_plain()
        if not self.finished:
            if drained:
                self._pump_tunnel()  # bytes that waited for the plain side to drain
            if not self.finished:
                self._update()

    def _on_tunnel(self, _fd: int, events: int) -> None:
        drained = False
        if events & WRITE and self.to_tunnel is not None:
            self._flush_tunnel()
            drained = self.to_tunnel is None
        if events & READABLE and not self.finished:
            self._pump_tunnel()
        if not self.finished:
            if drained:
                self._pump_plain()
            if not self.finished:
                self._update()

    def _update(self) -> None:
        if self.plain is not None:
            plain_mask = (READ if not self.plain_ended and self.to_tunnel is None else 0) | (
                WRITE if self.to_plain is not None else 0
            )
            if plain_mask != self._plain_mask:
                self._plain_mask = plain_mask
                self.loop.watch(self._plain_fd, plain_mask, self._on_plain)
        tunnel_mask = (READ if self.to_plain is None else 0) | (WRITE if self.to_tunnel is not None else 0)
        if tunnel_mask != self._tunnel_mask:
            self._tunnel_mask = tunnel_mask
            self.loop.watch(self._tunnel_fd, tunnel_mask, self._on_tunnel)


def _nothing(_stream: Stream, _reusable: bool) -> None:
    pass
