"""The proxy's sockets: listeners and the options every proxied connection gets."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from builtin_proxy.loop import READ, WRITE, EventLoop
from supervisor.net import BindFailed, family_of, listen_socket


class BindError(Exception):
    """A listener could not bind: fatal for the proxy (the supervisor shows the exit)."""


def listen(address: tuple[str, int], what: str) -> socket.socket:
    host, port = address
    try:
        return listen_socket(host, port, backlog=4096)
    except BindFailed as exc:
        hint = " (another process holds it)" if exc.in_use else ""
        raise BindError(f"cannot listen on {exc.address} for the {what}: {exc.strerror}{hint}") from exc


def tune(sock: socket.socket) -> None:
    """Non-blocking, and no Nagle delay: the proxy forwards what it gets at once."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Dial:
    """A non-blocking TCP connect to ``target`` within ``timeout`` seconds. Exactly one of
    ``connected(sock)`` and ``failed(error, timed_out)`` runs, unless ``cancel`` comes
    first; a refusal the kernel reports at once is reported before the constructor returns.
    """

    __slots__ = ("loop", "sock", "timer", "connected", "failed")

    def __init__(
        self,
        loop: EventLoop,
        target: tuple[str, int],
        timeout: float,
        connected: Callable[[socket.socket], None],
        failed: Callable[[OSError, bool], None],
    ) -> None:
        self.loop, self.connected, self.failed = loop, connected, failed
        self.sock: socket.socket | None = stream_socket(target[0])
        self.timer: Any = None
        try:
            self.sock.connect(target)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self.cancel()
            failed(exc, False)
            return
        self.timer = loop.call_later(timeout, self._timeout)
        loop.watch(self.sock.fileno(), WRITE, self._writable)

    def _writable(self, fd: int, _events: int) -> None:
        sock = self.sock
        assert sock is not None
        self.loop.unwatch(fd)
        self.timer.cancel()
        self.sock = None
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            sock.close()
            self.failed(OSError(error, errno.errorcode.get(error, str(error))), False)
            return
        self.connected(sock)

    def _timeout(self) -> None:
        self.timer = None
        self.cancel()
        self.failed(OSError(errno.ETIMEDOUT, "took longer than allowed"), True)

    def cancel(self) -> None:
        """Give up: the socket is closed, no callback runs."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sock, self.sock = self.sock, None
        if sock is not None:
            if sock.fileno() >= 0:
                self.loop.unwatch(sock.fileno())
            sock.close()


def stream_socket(host: str) -> socket.socket:
    """A non-blocking, tuned TCP socket for dialling ``host``."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    tune(sock)
    return sock


log = logging.getLogger("builtin_proxy.sockets")
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PAUSE = 0.2


class AcceptPauser:
    """A listener that cannot accept for want of descriptors stops asking for a moment:
    epoll is level-triggered, so retrying at once would spin a core and flood the log
    while the connections stay queued."""

    def __init__(
        self, loop: EventLoop, sock: socket.socket, handler: Callable[[int, int], None], what: str
    ) -> None:
        self.loop, self.sock, self.handler, self.what = loop, sock, handler, what
        self._logged = 0.0

    def failed(self, exc: OSError) -> None:
        if exc.errno not in _OUT_OF_RESOURCES:
            log.warning("accept failed on %s: %s", self.what, exc)
            return
        now = time.monotonic()
        if now - self._logged > 10:
            self._logged = now
            log.warning(
                "accept on %s paused: %s (the proxy's open-file limit)", self.what, exc.strerror or exc
            )
        self.loop.unwatch(self.sock.fileno())
        self.loop.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.watch(self.sock.fileno(), READ, self.handler)
