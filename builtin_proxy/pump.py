"""Copying bytes between a plain socket and a TLS socket, both ways, on the event loop.

* Backpressure: a direction that cannot send everything keeps the rest and stops
  reading its source until the destination drains (no unbounded buffering).
* Half-close: end-of-stream on one side shuts down the *write* half of the other; the
  opposite direction keeps flowing until it ends too. The TCP write side of the TLS
  socket is shut down directly: ``SSLSocket.shutdown`` would throw the TLS state away.
* One read buffer is shared by every connection of the loop; only a congested direction
  keeps its own copy, so idle connections cost no buffer memory.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Callable
from typing import Any

from builtin_proxy.loop import ERROR, READ, WRITE, EventLoop
from builtin_proxy.stats import ListenerStats

BUFFER_SIZE = 256 * 1024
TLS_RECORD = 16384  # the largest plaintext one TLS record carries
_SHARED = bytearray(BUFFER_SIZE)
_VIEW = memoryview(_SHARED)
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
BROKEN = (OSError, ssl.SSLError)
READABLE = READ | ERROR


def gather_records(read: Callable[[int, Any], Any], buffer: bytearray, count: int) -> tuple[int, int]:
    """After a first TLS read of ``count`` bytes into ``buffer``: if it was a full record
    (a hint that the sender is streaming), decrypt the records queued behind it into the
    rest of the buffer. Returns the bytes now in the buffer and the size of the last read
    (a full record: there may be more). Whatever stops the gathering (no more data, end of
    stream, an error) is reported again by the next read, after these bytes are on their way.
    """
    last = count
    if last != TLS_RECORD:
        return count, last  # a small record, the common interactive case: straight out
    view, size = memoryview(buffer), len(buffer)
    while last == TLS_RECORD and count <= size - TLS_RECORD:
        try:
            last = int(read(size - count, view[count:]))
        except (*WOULD_BLOCK, *BROKEN):
            break
        count += last
    return count, last


def shutdown_write(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        pass


def _tls_object(sock: socket.socket) -> ssl.SSLObject | None:
    """The TLS connection behind an ``SSLSocket``, to call ``read``/``write`` on directly.

    Why: ``SSLSocket.recv_into``/``send`` wrap those two calls in three Python frames of
    checks that cost more than the encryption of a small record; this path runs on every
    event. ``None`` (plain socket, or a Python without the attribute) means the public
    methods are used.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    return getattr(sock, "_sslobj", None)


class _Direction:
    __slots__ = (
        "stats",
        "inbound",
        "conn",
        "src",
        "dst",
        "pending",
        "ended",
        "dst_is_tls",
        "_batch",
        "_read",
        "_tls_read",
        "_write",
        "_buffered",
    )

    def __init__(
        self,
        conn: Connection,
        src: socket.socket,
        dst: socket.socket,
        stats: ListenerStats | None,
        inbound: bool,
    ) -> None:
        self.stats = stats  # where this direction's bytes are counted (None: nowhere)
        self.inbound = inbound  # from the listener's client into the proxy
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pending: bytes | None = None
        self.ended = False
        self.dst_is_tls = isinstance(dst, ssl.SSLSocket)
        src_tls, dst_tls = _tls_object(src), _tls_object(dst)
        self._read: Callable[[bytearray], Any] = src.recv_into
        self._tls_read: Callable[[int, Any], Any] | None = None
        if src_tls is not None:
            self._tls_read = src_tls.read  # (length, buffer) -> count
            self._read = self._read_records
        elif isinstance(src, ssl.SSLSocket):
            self._read = functools.partial(src.recv_into, nbytes=TLS_RECORD)
        self._write: Callable[[Any], int] = dst_tls.write if dst_tls is not None else dst.send
        # A plain read takes everything the kernel holds; a TLS read stops at what fits
        # whole records, so a read that filled that much may have left more behind.
        self._batch = TLS_RECORD if isinstance(src, ssl.SSLSocket) else BUFFER_SIZE

    def _read_records(self, buffer: bytearray) -> int:
        """Decrypt the TLS records that are already here into one buffer.

        One read returns one record at most (16 KiB). A full record hints that the
        sender is streaming, so the records queued behind it are decrypted into the same
        buffer and leave in one send (a small record, the common interactive case, goes
        straight out). Whatever stops the gathering (no more data, end of stream, an
        error) is reported again by the next read, after these bytes are on their way.
        """
        read = self._tls_read
        assert read is not None
        count, _last = gather_records(read, buffer, int(read(BUFFER_SIZE, buffer)))
        return count

    @property
    def wants_read(self) -> bool:
        return not self.ended and self.pending is None

    def pump(self) -> bool:
        """Read what the source has and send it on, until the source would block.

        Returns whether the direction's state changed (it ended, or now waits to send).
        """
        read, write, batch = self._read, self._write, self._batch
        for _ in range(32):  # bounded: one busy connection must not starve the others
            try:
                count = read(_SHARED)
            except WOULD_BLOCK:
                return False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                count = 0  # end of stream (with or without close_notify)
            except BROKEN:
                self.conn.close()
                return True
            if count == 0:
                self.ended = True
                shutdown_write(self.dst)
                self.conn.direction_ended()
                return True
            stats = self.stats
            if stats is not None:
                if self.inbound:
                    stats.bytes_in += count
                else:
                    stats.bytes_out += count
            try:
                sent = write(_VIEW[:count])
            except WOULD_BLOCK:
                sent = 0
            except BROKEN:
                self.conn.close()
                return True
            if sent < count:
                # TLS must be retried with the same data; a plain socket sent a prefix.
                self.pending = bytes(_VIEW[:count] if self.dst_is_tls else _VIEW[sent:count])
                return True
            if count < batch:
                return False  # drained for now: epoll says when there is more
        return False

    def flush(self) -> bool:
        """Send what a congested direction kept; returns whether it is all gone now."""
        pending = self.pending
        if pending is None:
            return False
        try:
            sent = self._write(pending)
        except WOULD_BLOCK:
            return False
        except BROKEN:
            self.conn.close()
            return True
        if sent < len(pending):
            self.pending = pending[sent:]
            return False
        self.pending = None
        self.conn.direction_ended()  # the last bytes after both ends finished: close now
        return True


class Connection:
    """A live, copying connection. ``on_close`` runs once, before the sockets close."""

    __slots__ = (
        "loop",
        "plain",
        "tls",
        "_up",
        "_down",
        "closed",
        "on_close",
        "_plain_fd",
        "_tls_fd",
        "stats",
    )

    def __init__(
        self,
        loop: EventLoop,
        plain: socket.socket,
        tls: ssl.SSLSocket,
        on_close: Callable[[Connection], None] | None = None,
        stats: ListenerStats | None = None,
        *,
        client_is_plain: bool = False,
    ) -> None:
        """``stats``: the listener whose bytes and active connections this one counts in;
        ``client_is_plain``: that listener's client is the plain side (an upstream's)."""
        self.loop = loop
        self.plain = plain
        self.tls = tls
        self.stats = stats
        self._up = _Direction(self, plain, tls, stats, inbound=client_is_plain)  # plain -> TLS (encrypt)
        self._down = _Direction(self, tls, plain, stats, inbound=not client_is_plain)  # TLS -> plain
        self._plain_fd = plain.fileno()
        self._tls_fd = tls.fileno()
        self.closed = False
        self.on_close = on_close

    def start(self) -> None:
        if self.stats is not None:
            self.stats.active += 1
        # TLS may already hold decrypted records that epoll cannot report.
        if self.tls.pending():
            self._down.pump()
        if not self.closed:
            self._update()

    # The event handlers re-register interest only when a direction changed state: in the
    # steady state an event is one read and one write, nothing else.

    def _on_plain(self, _fd: int, events: int) -> None:
        changed = False
        if events & WRITE:
            changed = self._down.flush()
        up = self._up
        if events & READABLE and up.pending is None and not up.ended:
            changed = up.pump() or changed
        if changed and not self.closed:
            self._update()

    def _on_tls(self, _fd: int, events: int) -> None:
        changed = False
        if events & WRITE:
            changed = self._up.flush()
        down = self._down
        if events & READABLE and down.pending is None and not down.ended:
            changed = down.pump() or changed
        if changed and not self.closed:
            self._update()

    def _update(self) -> None:
        up, down = self._up, self._down
        plain_mask = (READ if up.wants_read else 0) | (WRITE if down.pending is not None else 0)
        tls_mask = (READ if down.wants_read else 0) | (WRITE if up.pending is not None else 0)
        self.loop.watch(self._plain_fd, plain_mask, self._on_plain)
        self.loop.watch(self._tls_fd, tls_mask, self._on_tls)

    def direction_ended(self) -> None:
        if self._up.ended and self._down.ended and self._up.pending is None and self._down.pending is None:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stats is not None:
            self.stats.active -= 1
        self.loop.unwatch(self._plain_fd)
        self.loop.unwatch(self._tls_fd)
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None
        for sock in (self.plain, self.tls):
            try:
                sock.close()
            except OSError:
                pass
