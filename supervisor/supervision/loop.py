"""The supervision thread's event loop: asyncio's selector loop, read through a clock.

One loop, one thread. Process exits arrive as readable pidfds (``add_reader``), events
from other threads through ``post`` (``call_soon_threadsafe``), and every deadline is a
real timer on the loop (an ``Alarm``). The loop's notion of time is the injected
``Clock``: tests hand in a fake one and drive the loop with ``settle`` in microseconds,
where the real agent waits in ``epoll`` and uses no CPU while nothing is due.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from supervisor.supervision.events import Clock


class SupervisionLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` is ``clock.monotonic()``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self._in_flight = 0  # callbacks posted from other threads and not run yet
        self._in_flight_lock = threading.Lock()

    def time(self) -> float:
        return self.clock.monotonic()

    def post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop; safe from any thread and from signal
        handlers. Dropped silently once the loop is closed (the agent is exiting)."""
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            self.call_soon_threadsafe(self._run_posted, callback, args)
        except RuntimeError:  # closed
            with self._in_flight_lock:
                self._in_flight -= 1

    def _run_posted(self, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
        callback(*args)

    def run_pending(self) -> None:
        """One pass: run what is ready and every timer due by the clock, then return."""
        self.call_soon(self.stop)
        self.run_forever()

    def settle(self, passes: int = 10) -> None:
        """For tests with a fake clock: run passes until what is posted is done.

        A pass runs what is ready, the timers due by the clock, and the callbacks of fds
        that turned readable (a fake process that exited in the previous pass). Chains
        of work in the supervisor are a few passes long; ``passes`` covers them with
        room to spare. Timers due only later are left alone: advance the clock and
        settle again to fire them.
        """
        for _ in range(passes):
            self.run_pending()
        for _ in range(100):
            with self._in_flight_lock:
                if self._in_flight == 0:
                    return
            self.run_pending()


class Alarm:
    """One deadline on the loop for one decision: ``set`` moves it, ``set(None)`` clears it.

    Every deadline-based decision in the supervisor (a machine's next attempt or stop
    timeout, the debounce of config events, the watchdog ping, a storage retry) owns an
    Alarm, so no decision can wait for an unrelated event to wake the loop.
    """

    __slots__ = ("_loop", "_callback", "_handle", "due")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.due: float | None = None

    def set(self, when: float | None) -> None:
        if when == self.due and (when is None or self._handle is not None):
            return
        self.cancel()
        if when is not None:
            self.due = when
            self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.due = None

    def _fire(self) -> None:
        self._handle = None
        self.due = None
        self._callback()
