"""A minimal epoll event loop for the proxy's data path.

Why not asyncio: every byte of every connection crosses this loop twice per proxy, and
its per-event cost is the proxy's latency. A bare ``epoll`` with fd callbacks, a timer
heap and a thread-safe wake-up is about a third of asyncio's overhead per event here,
and nothing else in the proxy needs coroutines (agent watches run on plain threads and
hand their results over with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
ERROR = select.EPOLLERR | select.EPOLLHUP

Handler = Callable[[int, int], None]
log = logging.getLogger("builtin_proxy.loop")


class Timer:
    __slots__ = ("deadline", "callback", "args", "cancelled")

    def __init__(self, deadline: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._ready: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_read, READ)
        self._running = False
        self._reported: set[tuple[str, str]] = set()
        self._thread = threading.get_ident()  # the loop's thread (set again by run)
        self._wake_lock = threading.Lock()  # close() against other threads' wake-ups

    # -- file descriptors -------------------------------------------------------------

    def watch(self, fd: int, mask: int, handler: Handler) -> None:
        """Call ``handler(fd, events)`` when ``fd`` is ready for ``mask``; 0 stops watching."""
        current = self._masks.get(fd)
        if mask == 0:
            if current is not None:
                self._epoll.unregister(fd)
                del self._masks[fd]
            self._handlers.pop(fd, None)
            return
        self._handlers[fd] = handler
        if current is None:
            self._epoll.register(fd, mask)
            self._masks[fd] = mask
        elif current != mask:
            self._epoll.modify(fd, mask)
            self._masks[fd] = mask

    def unwatch(self, fd: int) -> None:
        if fd in self._masks:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            del self._masks[fd]
        self._handlers.pop(fd, None)

    # -- timers and callbacks ------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        timer = Timer(time.monotonic() + delay, callback, args)
        heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        """The only way other threads (agent watches, signal handlers) touch the loop.

        ``deque.append``/``popleft`` are atomic in CPython. The wake-up write is guarded
        against ``close``: a late post must never write into whatever file got the closed
        pipe's number. A signal handler runs on the loop's own thread (it may interrupt
        ``close`` itself) and so takes no lock, which it could deadlock on.
        """
        self._ready.append((callback, args))
        if threading.get_ident() == self._thread:
            self._wake()
        else:
            with self._wake_lock:
                self._wake()

    def _wake(self) -> None:
        fd = self._wake_write
        if fd < 0:
            return  # closed: the loop is gone
        try:
            os.write(fd, b"\0")
        except BlockingIOError:
            pass  # already awake

    # -- running -------------------------------------------------------------------------

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        self._thread = threading.get_ident()
        poll = self._epoll.poll
        handlers = self._handlers
        wake = self._wake_read
        timers, ready = self._timers, self._ready
        while self._running:
            timeout = self._next_timeout() if timers or ready else -1
            for fd, events in poll(timeout):
                if fd == wake:
                    self._drain_wake()
                    continue
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(fd, events)
                    except Exception as exc:  # noqa: BLE001 - one connection's bug must not end the others
                        self._contain(handler, exc, fd)
            if timers:
                self._run_timers()
            if ready:
                self._run_ready()

    def _next_timeout(self) -> float:
        if self._ready:
            return 0
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if not timers:
            return -1
        return max(0.0, timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                try:
                    timer.callback(*timer.args)
                except Exception as exc:  # noqa: BLE001 - as for fd handlers
                    self._contain(timer.callback, exc)

    def _run_ready(self) -> None:
        ready = self._ready
        for _ in range(len(ready)):  # only what is queued now; new arrivals wait a turn
            callback, args = ready.popleft()
            try:
                callback(*args)
            except Exception as exc:  # noqa: BLE001 - as for fd handlers
                self._contain(callback, exc)

    def _contain(self, callback: Callable[..., object], exc: Exception, fd: int | None = None) -> None:
        """A callback raised: log it (with its traceback, once per kind of failure), stop
        watching its fd, and close what it belongs to (a connection, a listener), so one
        bad connection costs only itself."""
        where = getattr(callback, "__qualname__", repr(callback))
        key = (where, type(exc).__name__)
        if key not in self._reported:
            self._reported.add(key)
            log.error(
                "internal error in %s (closing what it served; further ones are not logged)",
                where,
                exc_info=exc,
            )
        if fd is not None:
            self.unwatch(fd)
        owner = getattr(callback, "__self__", None)
        close = getattr(owner, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - it is already broken; nothing more to do
                pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_read)
        with self._wake_lock:
            fd, self._wake_write = self._wake_write, -1
            os.close(fd)
