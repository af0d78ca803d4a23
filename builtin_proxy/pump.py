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

import socket
import ssl
from collections.abc import Callable

from builtin_proxy.loop import ERROR, READ, WRITE, EventLoop

BUFFER_SIZE = 256 * 1024
_SHARED = bytearray(BUFFER_SIZE)
_VIEW = memoryview(_SHARED)
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_BROKEN = (OSError, ssl.SSLError)


def shutdown_write(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        pass


class _Direction:
    __slots__ = ("conn", "src", "dst", "pending", "ended", "src_is_tls", "dst_is_tls", "bytes")

    def __init__(self, conn: Connection, src: socket.socket, dst: socket.socket) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pending: bytes | None = None
        self.ended = False
        self.src_is_tls = isinstance(src, ssl.SSLSocket)
        self.dst_is_tls = isinstance(dst, ssl.SSLSocket)
        self.bytes = 0

    @property
    def wants_read(self) -> bool:
        return not self.ended and self.pending is None

    def pump(self) -> None:
        """Read what the source has and send it on, until the source would block."""
        src, dst = self.src, self.dst
        for _ in range(32):  # bounded: one busy connection must not starve the others
            try:
                count = src.recv_into(_SHARED)
            except _WOULD_BLOCK:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                count = 0  # end of stream (with or without close_notify)
            except _BROKEN:
                self.conn.close()
                return
            if count == 0:
                self.ended = True
                shutdown_write(dst)
                self.conn.direction_ended()
                return
            self.bytes += count
            try:
                sent = dst.send(_VIEW[:count])
            except _WOULD_BLOCK:
                sent = 0
            except _BROKEN:
                self.conn.close()
                return
            if sent < count:
                # TLS must be retried with the same data; a plain socket sent a prefix.
                self.pending = bytes(_VIEW[:count] if self.dst_is_tls else _VIEW[sent:count])
                return
            if count < BUFFER_SIZE and not (self.src_is_tls and src.pending()):  # type: ignore[attr-defined]
                return  # drained for now: epoll says when there is more

    def flush(self) -> None:
        pending = self.pending
        if pending is None:
            return
        try:
            sent = self.dst.send(pending)
        except _WOULD_BLOCK:
            return
        except _BROKEN:
            self.conn.close()
            return
        if sent < len(pending):
            self.pending = pending[sent:]
        else:
            self.pending = None
            self.conn.direction_ended()  # the last bytes after both ends finished: close now


class Connection:
    """A live, copying connection. ``on_close`` runs once, before the sockets close."""

    __slots__ = ("loop", "plain", "tls", "_up", "_down", "_fds", "closed", "on_close", "_plain_fd", "_tls_fd")

    def __init__(
        self,
        loop: EventLoop,
        plain: socket.socket,
        tls: ssl.SSLSocket,
        on_close: Callable[[Connection], None] | None = None,
    ) -> None:
        self.loop = loop
        self.plain = plain
        self.tls = tls
        self._up = _Direction(self, plain, tls)  # plain -> TLS (encrypt)
        self._down = _Direction(self, tls, plain)  # TLS -> plain (decrypt)
        self._plain_fd = plain.fileno()
        self._tls_fd = tls.fileno()
        self.closed = False
        self.on_close = on_close

    def start(self, early: bytes = b"") -> None:
        if early:
            self._up.pending = early  # bytes the client sent before the TLS side was ready
            self._up.flush()
        # TLS may already hold decrypted records that epoll cannot report.
        if self.tls.pending():
            self._down.pump()
        if not self.closed:
            self._update()

    def _event(self, fd: int, events: int) -> None:
        up, down = self._up, self._down
        readable = events & (READ | ERROR)
        if fd == self._plain_fd:
            if events & WRITE:
                down.flush()
            if readable and up.wants_read:
                up.pump()
        else:
            if events & WRITE:
                up.flush()
            if readable and down.wants_read:
                down.pump()
        if not self.closed:
            self._update()

    def _update(self) -> None:
        up, down = self._up, self._down
        plain_mask = (READ if up.wants_read else 0) | (WRITE if down.pending is not None else 0)
        tls_mask = (READ if down.wants_read else 0) | (WRITE if up.pending is not None else 0)
        self.loop.watch(self._plain_fd, plain_mask, self._event)
        self.loop.watch(self._tls_fd, tls_mask, self._event)

    def direction_ended(self) -> None:
        if self._up.ended and self._down.ended and self._up.pending is None and self._down.pending is None:
            self.close()

    @property
    def bytes_in(self) -> int:
        return self._down.bytes

    @property
    def bytes_out(self) -> int:
        return self._up.bytes

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
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
