"""builtin_proxy.loop.EventLoop: fd handlers, timers and the thread-safe queue of the
proxy's data path, driven in-process.

Time is a ``FakeClock`` (patched into the loop module), so a timer is due because the
test moved the clock, never because the test waited. ``run_once`` runs exactly one turn
of the loop: a queued ``stop`` makes ``run`` poll without blocking, dispatch, and return.
Readers and writers are ``socket.socketpair()`` ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import builtin_proxy.loop as loop_module
from builtin_proxy.loop import READ, WRITE, EventLoop
from tests.helpers.fakes import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(loop_module, "time", fake)
    return fake


@pytest.fixture
def loop(clock: FakeClock) -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def run_once(loop: EventLoop) -> None:
    loop.call_soon_threadsafe(loop.stop)
    loop.run()


class Owner:
    """Something a callback belongs to (a connection, a listener): what containment closes."""

    def __init__(self, fail_on_close: bool = False) -> None:
        self.closed = 0
        self.calls = 0
        self.fail_on_close = fail_on_close

    def broken(self, *_args: object) -> None:
        self.calls += 1
        raise RuntimeError("a bug in one connection")

    def close(self) -> None:
        self.closed += 1
        if self.fail_on_close:
            raise OSError("already broken")


# -- timers -------------------------------------------------------------------------------------------


def test_due_timers_fire_in_deadline_order_and_ties_in_scheduling_order(
    loop: EventLoop, clock: FakeClock
) -> None:
    fired: list[str] = []
    for delay, name in [(3, "c"), (1, "a"), (2, "b1"), (2, "b2"), (0.5, "first")]:
        loop.call_later(delay, fired.append, name)
    clock.advance(5)
    run_once(loop)
    assert fired == ["first", "a", "b1", "b2", "c"]


def test_a_timer_fires_only_once_its_deadline_has_passed(loop: EventLoop, clock: FakeClock) -> None:
    fired: list[str] = []
    loop.call_later(10, fired.append, "late")
    loop.call_later(1, fired.append, "soon")
    clock.advance(2)
    run_once(loop)
    assert fired == ["soon"]
    clock.advance(8)
    run_once(loop)
    assert fired == ["soon", "late"]
    clock.advance(100)
    run_once(loop)
    assert fired == ["soon", "late"]  # a timer fires once


def test_a_cancelled_timer_does_not_fire(loop: EventLoop, clock: FakeClock) -> None:
    fired: list[str] = []
    loop.call_later(1, fired.append, "kept")
    loop.call_later(1, fired.append, "cancelled").cancel()
    clock.advance(1)
    run_once(loop)
    assert fired == ["kept"]


def test_a_timer_cancelled_by_an_earlier_timer_of_the_same_turn_does_not_fire(
    loop: EventLoop, clock: FakeClock
) -> None:
    # A handshake that completes cancels its own timeout: the two can be due together.
    fired: list[str] = []
    timeout = loop.call_later(2, fired.append, "timeout")
    loop.call_later(1, timeout.cancel)
    clock.advance(3)
    run_once(loop)
    assert fired == []


# -- failures are contained ---------------------------------------------------------------------------


def test_a_timer_that_raises_closes_its_owner_and_the_others_still_fire(
    loop: EventLoop, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    owner = Owner()
    fired: list[str] = []
    loop.call_later(1, owner.broken)
    loop.call_later(2, fired.append, "after")
    clock.advance(2)
    run_once(loop)
    assert fired == ["after"]
    assert owner.closed == 1
    (record,) = [record for record in caplog.records if record.name == "builtin_proxy.loop"]
    assert record.levelno == logging.ERROR
    assert "Owner.broken" in record.getMessage()
    assert record.exc_info is not None  # with its traceback


def test_the_same_kind_of_failure_is_logged_once(
    loop: EventLoop, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    owners = [Owner() for _ in range(3)]
    for owner in owners:
        loop.call_later(1, owner.broken)
    clock.advance(1)
    run_once(loop)
    assert [owner.closed for owner in owners] == [1, 1, 1]  # each one is still closed
    assert len([record for record in caplog.records if record.name == "builtin_proxy.loop"]) == 1


def test_a_failing_queued_callback_does_not_stop_the_queue(loop: EventLoop) -> None:
    owner = Owner()
    done: list[str] = []
    loop.call_soon_threadsafe(owner.broken)
    loop.call_soon_threadsafe(done.append, "next")
    run_once(loop)
    assert done == ["next"]
    assert owner.closed == 1


def test_a_close_that_raises_during_containment_is_swallowed(loop: EventLoop, clock: FakeClock) -> None:
    owner = Owner(fail_on_close=True)
    fired: list[str] = []
    loop.call_later(1, owner.broken)
    loop.call_later(1, fired.append, "after")
    clock.advance(1)
    run_once(loop)
    assert fired == ["after"]


def test_an_fd_handler_that_raises_loses_its_fd_and_owner_while_other_fds_are_served(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    left, right = pair
    other_left, other_right = socket.socketpair()
    try:
        owner = Owner()
        served: list[bytes] = []
        loop.watch(left.fileno(), READ, owner.broken)
        loop.watch(other_left.fileno(), READ, lambda _fd, _ev: served.append(other_left.recv(16)))
        right.send(b"boom")
        other_right.send(b"fine")
        run_once(loop)
        assert served == [b"fine"]
        assert (owner.calls, owner.closed) == (1, 1)
        right.send(b"again")  # still readable, but no longer watched
        run_once(loop)
        assert owner.calls == 1
    finally:
        other_left.close()
        other_right.close()


# -- file descriptors ----------------------------------------------------------------------------------


def test_a_reader_is_called_when_its_socket_has_data_and_not_before(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    left, right = pair
    events: list[tuple[int, int]] = []
    loop.watch(left.fileno(), READ, lambda fd, ev: events.append((fd, ev)))
    run_once(loop)
    assert events == []
    right.send(b"ping")
    run_once(loop)
    assert events == [(left.fileno(), READ)]


def test_watching_with_mask_zero_stops_the_handler(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    left, right = pair
    calls: list[int] = []
    loop.watch(left.fileno(), READ, lambda fd, _ev: calls.append(fd))
    loop.watch(left.fileno(), 0, lambda fd, _ev: calls.append(-fd))
    right.send(b"ping")
    run_once(loop)
    assert calls == []


def test_changing_the_mask_and_handler_takes_effect(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    left, _right = pair
    reads: list[int] = []
    writes: list[int] = []
    loop.watch(left.fileno(), READ, lambda _fd, ev: reads.append(ev))
    loop.watch(left.fileno(), WRITE, lambda _fd, ev: writes.append(ev))
    run_once(loop)  # a fresh socketpair end is writable at once, not readable
    assert (reads, writes) == ([], [WRITE])
    loop.watch(left.fileno(), READ, lambda _fd, ev: reads.append(ev))
    run_once(loop)
    assert (reads, writes) == ([], [WRITE])  # back to READ: no more write events


def test_unwatching_an_fd_twice_or_after_it_closed_is_harmless(loop: EventLoop) -> None:
    left, right = socket.socketpair()
    fd = left.fileno()
    loop.watch(fd, READ, lambda _fd, _ev: None)
    left.close()
    right.close()
    loop.unwatch(fd)
    loop.unwatch(fd)
    loop.watch(fd, 0, lambda _fd, _ev: None)
    run_once(loop)


# -- the thread-safe queue -------------------------------------------------------------------------------


def test_callbacks_queued_by_a_queued_callback_wait_for_the_next_turn(loop: EventLoop) -> None:
    # So a callback that keeps re-queueing work cannot starve the sockets.
    order: list[str] = []

    def first() -> None:
        order.append("first")
        loop.call_soon_threadsafe(order.append, "queued by first")

    loop.call_soon_threadsafe(first)
    run_once(loop)
    assert order == ["first"]
    run_once(loop)
    assert order == ["first", "queued by first"]


def test_another_thread_wakes_a_loop_that_waits_for_nothing(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    blocking = threading.Event()
    stopped = threading.Event()
    delivered: list[str] = []
    rescue, rescuer = pair

    def stop() -> None:
        stopped.set()
        loop.stop()

    def watch_thread() -> None:
        blocking.wait(5)
        loop.call_soon_threadsafe(delivered.append, "from the watch thread")
        loop.call_soon_threadsafe(stop)
        if not stopped.wait(5):
            rescuer.send(b"!")  # the wake-up did not work: end the test instead of hanging it

    def rescued(_fd: int, _events: int) -> None:
        delivered.append("rescued")
        loop.stop()

    loop.watch(rescue.fileno(), READ, rescued)
    # The loop's only work is to say it is about to block in epoll with no timeout.
    loop.call_soon_threadsafe(blocking.set)
    thread = threading.Thread(target=watch_thread)
    thread.start()
    loop.run()
    thread.join(10)
    assert delivered == ["from the watch thread"]


def test_posting_to_a_closed_loop_does_not_raise() -> None:
    # A watch thread may deliver after the proxy shut its loop down.
    loop = EventLoop()
    loop.close()
    loop.call_soon_threadsafe(lambda: None)


def test_posting_to_a_closed_loop_writes_into_no_other_file(tmp_path: Path) -> None:
    loop = EventLoop()
    number = loop._wake_write
    loop.close()
    victim = tmp_path / "victim"
    fd = os.open(victim, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    if fd != number:  # the process opened something new, and it got the freed number
        os.dup2(fd, number)
        os.close(fd)
    try:
        loop.call_soon_threadsafe(lambda: None)  # a late delivery from a watch thread
    finally:
        os.close(number)
    assert victim.read_bytes() == b""
