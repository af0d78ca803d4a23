"""The per-proxy state machine, driven with an injected clock (no processes, no sleeping)."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.supervision.events import Debounce
from supervisor.supervision.machine import (
    KillGroup,
    ProxyMachine,
    RestartPolicy,
    Signal,
    Spawn,
    State,
)

POLICY = RestartPolicy()


def machine(random_fraction: float = 0.0) -> ProxyMachine:
    return ProxyMachine(POLICY, lambda: random_fraction)


def crash_loop_delays(m: ProxyMachine, exits: int) -> list[float]:
    """Start ``m`` and let every process die instantly; return the wait before each restart."""
    now = 0.0
    actions = m.want(now)
    delays = []
    for _ in range(exits):
        (spawn,) = actions
        assert isinstance(spawn, Spawn)
        actions = m.exited(spawn.generation, now, "exited with code 1")
        if not actions:
            assert m.state is State.BACKOFF and m.retry_at is not None
            delays.append(m.retry_at - now)
            now = m.retry_at
            assert m.next_deadline() == now
            actions = m.tick(now)
        else:
            delays.append(0.0)
    return delays


def test_first_want_starts_generation_one() -> None:
    m = machine()
    assert m.want(0.0) == [Spawn(1)]
    assert m.state is State.STARTING and m.alive


def test_crash_loop_schedule_three_immediate_then_exponential_capped() -> None:
    delays = crash_loop_delays(machine(), 11)
    assert delays == [0, 0, 0, 2, 4, 8, 16, 32, 60, 60, 60]


def test_jitter_only_shortens_the_wait() -> None:
    delays = crash_loop_delays(machine(random_fraction=1.0), 9)
    assert delays == [0, 0, 0, 1.5, 3, 6, 12, 24, 45]


@given(failures=st.integers(min_value=1, max_value=1000), fraction=st.floats(min_value=0, max_value=1))
def test_delay_is_bounded(failures: int, fraction: float) -> None:
    delay = POLICY.delay(failures, fraction)
    assert 0 <= delay <= POLICY.max_delay
    if failures > POLICY.immediate_restarts:
        assert delay >= POLICY.base_delay * (1 - POLICY.jitter)


def test_restart_counter_counts_automatic_restarts() -> None:
    m = machine()
    crash_loop_delays(m, 5)
    assert m.restarts == 5
    assert m.last_exit == "exited with code 1"


def test_counter_resets_after_ten_seconds_of_healthy_running_even_after_backoff() -> None:
    # Consul's bug: once a backoff wait happened the reset never worked again.
    m = machine()
    crash_loop_delays(m, 6)  # deep in backoff: failures == 6
    assert m.state is State.STARTING
    started = m.started_at
    assert started is not None
    now = started + 10.0
    m.tick(now)
    assert m.state is State.RUNNING
    generation = m.generation
    assert m.exited(generation, now, "killed by signal SIGKILL") == [Spawn(generation + 1)]
    assert m.failures == 1


def test_quick_exit_after_short_run_keeps_backing_off() -> None:
    m = machine()
    crash_loop_delays(m, 4)
    assert m.started_at is not None
    now = m.started_at + 9.9  # not yet healthy
    assert m.exited(m.generation, now, "exited with code 1") == []
    assert m.retry_at == pytest.approx(now + 4.0)


def test_starting_becomes_running_after_the_startup_grace() -> None:
    m = machine()
    m.want(100.0)
    assert m.next_deadline() == 101.0
    m.tick(100.5)
    assert m.state is State.STARTING
    m.tick(101.0)
    assert m.state is State.RUNNING and m.next_deadline() is None


def test_stale_exit_from_an_older_generation_is_ignored() -> None:
    m = machine()
    m.want(0.0)
    m.exited(1, 0.0, "exited with code 1")  # restarted immediately as generation 2
    assert m.generation == 2
    assert m.exited(1, 0.1, "late duplicate event") == []
    assert m.alive and m.state is State.STARTING and m.restarts == 1


def test_stop_sends_sigint_then_kills_the_group_after_five_seconds() -> None:
    m = machine()
    m.want(0.0)
    m.tick(2.0)
    assert m.unwant(3.0) == [Signal(1, signal.SIGINT)]
    assert m.state is State.STOPPING and m.next_deadline() == 8.0
    assert m.tick(7.9) == []
    assert m.tick(8.0) == [KillGroup(1)]
    assert m.tick(9.0) == [] and m.next_deadline() is None
    assert m.exited(1, 9.5, "killed by signal SIGKILL") == []
    assert m.state is State.STOPPED and m.finished
    assert m.restarts == 0  # a requested stop is not a failure


def test_stop_during_backoff_cancels_the_retry() -> None:
    m = machine()
    crash_loop_delays(m, 4)
    assert m.started_at is not None
    now = m.started_at + 0.1
    m.exited(m.generation, now, "exited with code 1")
    assert m.state is State.BACKOFF
    assert m.unwant(now) == []
    assert m.finished and m.next_deadline() is None


def test_replace_stops_then_starts_without_counting_a_failure() -> None:
    m = machine()
    m.want(0.0)
    assert m.replace(1.0) == [Signal(1, signal.SIGINT)]
    assert m.exited(1, 1.2, "exited with code 0") == [Spawn(2)]
    assert m.restarts == 0 and m.failures == 0


def test_replace_during_backoff_starts_at_once() -> None:
    m = machine()
    crash_loop_delays(m, 5)
    assert m.started_at is not None
    now = m.started_at + 0.1
    generation = m.generation
    m.exited(generation, now, "exited with code 1")
    assert m.state is State.BACKOFF
    assert m.replace(now) == [Spawn(generation + 1)]


def test_wanted_again_while_stopping_starts_after_the_exit() -> None:
    m = machine()
    m.want(0.0)
    m.unwant(1.0)
    assert m.want(1.1) == []
    assert m.exited(1, 1.5, "exited with code 0") == [Spawn(2)]


def test_blocked_proxy_is_not_started_until_unblocked() -> None:
    m = machine()
    assert m.want(0.0, blocked_reason="running as root") == []
    assert m.state is State.BLOCKED and not m.alive
    assert m.want(1.0) == [Spawn(1)]


def test_adopted_process_is_kept_and_restarted_at_once_when_it_dies() -> None:
    m = machine()
    m.adopted(generation=7, now=1000.0, age=3600.0, restarts=4)
    assert m.want(1000.0) == []
    assert m.state is State.RUNNING and m.restarts == 4
    assert m.exited(7, 1001.0, "exited (status unknown)") == [Spawn(8)]
    assert m.restarts == 5


def test_adopted_process_while_blocked_is_kept_but_not_respawned() -> None:
    m = machine()
    m.adopted(generation=1, now=50.0, age=40.0, restarts=0)
    assert m.want(50.0, blocked_reason="running as root") == []
    assert m.state is State.RUNNING
    assert m.exited(1, 60.0, "exited (status unknown)") == []
    assert m.state is State.BLOCKED


def test_spawn_failure_counts_as_a_quick_exit() -> None:
    m = machine()
    actions = m.want(0.0)
    for _ in range(3):
        (spawn,) = actions
        assert isinstance(spawn, Spawn)
        actions = m.spawn_failed(spawn.generation, 0.0, "command not found")
    (spawn,) = actions
    assert isinstance(spawn, Spawn)
    assert m.spawn_failed(spawn.generation, 0.0, "command not found") == []
    assert m.state is State.BACKOFF and m.retry_at == 2.0
    assert m.last_exit == "failed to start: command not found"


def test_debounce_waits_for_quiet_but_not_forever() -> None:
    debounce = Debounce(quiet=0.2, cap=2.0)
    debounce.poke(10.0)
    assert not debounce.fire(10.19)
    assert debounce.fire(10.2)
    assert not debounce.fire(20.0)  # fired once per burst
    # an editor that keeps saving every 100 ms: applied at the cap, 2 s after the first event
    now = 30.0
    while now < 32.5:
        debounce.poke(now)
        if debounce.fire(now):
            break
        now = round(now + 0.1, 3)
    assert now == pytest.approx(32.0)
