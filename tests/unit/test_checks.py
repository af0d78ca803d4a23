"""Health check scheduling (``supervisor/catalog/checks.py``): TTL expiry, the fast-probe
back-off after a proxy (re)start, a stopped proxy process, and the probe loop reporting
consecutive results -- without touching the network.

checks.py reads ``time.monotonic`` itself (no injected clock), so TTL tests set the
deadline relative to it, and the probe loop is fed scripted results through its one
network seam, ``checks.probe`` (the probes themselves are tests/test_probes.py's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from supervisor.catalog import checks
from supervisor.catalog.checks import (
    CRITICAL,
    FAST_PROBE_INTERVAL,
    FAST_PROBE_WINDOW,
    PASSING,
    WARNING,
    CheckSpec,
    CheckState,
    next_delay,
    run_check,
    stopped_process,
)
from supervisor.catalog.status import CheckKind, CheckStatus, worst
from supervisor.process.identity import ProcStat, read_stat

Reports = list[tuple[CheckStatus, str]]


def spec(kind: CheckKind = CheckKind.TCP, **fields: Any) -> CheckSpec:
    values: dict[str, Any] = {
        "check_id": "c1",
        "name": "check one",
        "service_id": "web",
        "service_name": "web",
        "service_tags": ("v1",),
        "kind": kind,
        "target": "127.0.0.1:9",
        **fields,
    }
    return CheckSpec(**values)


def state_of(
    check: CheckSpec, status: CheckStatus = CRITICAL, ttl_deadline: float | None = None
) -> CheckState:
    return CheckState(check, status, "", 5, 5, ttl_deadline=ttl_deadline)


def run(coroutine: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coroutine(), 10))


def recorder(reports: Reports) -> checks.Report:
    def report(_state: CheckState, status: CheckStatus, output: str) -> None:
        reports.append((status, output))

    return report


async def settle(rounds: int = 20) -> None:
    """Let the check's task run until it blocks (a few loop turns; nothing waits on time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- the fast-probe back-off ---------------------------------------------------------------------


def test_a_new_proxy_is_probed_from_50ms_doubling_up_to_the_interval() -> None:
    state = state_of(spec(interval=1.0))
    state.probe_fast(now=100.0)
    delays = [next_delay(state, CRITICAL, now=100.0) for _ in range(7)]
    assert delays[:5] == [FAST_PROBE_INTERVAL * 2**n for n in range(5)]
    assert delays[5:] == [1.0, 1.0]  # capped at the interval


def test_fast_probing_ends_when_the_check_passes_or_the_window_closes() -> None:
    state = state_of(spec(interval=10.0))
    state.probe_fast(now=100.0)
    assert next_delay(state, PASSING, now=100.0) == 10.0
    assert next_delay(state, CRITICAL, now=100.0 + FAST_PROBE_WINDOW) == 10.0
    assert state.fast_probes == 0  # neither counted as a fast probe


def test_a_restart_starts_the_back_off_again_and_wakes_the_check() -> None:
    state = state_of(spec(interval=10.0))
    state.probe_fast(now=0.0)
    for _ in range(4):
        next_delay(state, CRITICAL, now=1.0)
    state.wake.clear()
    state.probe_fast(now=2.0)
    assert state.wake.is_set() and state.fast_until == 2.0 + FAST_PROBE_WINDOW
    assert next_delay(state, CRITICAL, now=2.0) == FAST_PROBE_INTERVAL


# -- TTL checks ------------------------------------------------------------------------------------


def test_a_ttl_past_its_deadline_reports_critical_once() -> None:
    reports: Reports = []

    async def scenario() -> None:
        state = state_of(spec(CheckKind.TTL, ttl=30.0), PASSING, ttl_deadline=time.monotonic() - 0.001)
        task = asyncio.get_running_loop().create_task(run_check(state, recorder(reports)))
        await settle()
        assert reports == [(CRITICAL, "TTL expired")]
        assert state.ttl_deadline is None  # it does not expire again until the next update
        state.wake.set()
        await settle()
        assert len(reports) == 1
        task.cancel()

    run(scenario)


def test_a_ttl_whose_deadline_moved_forward_does_not_expire() -> None:
    reports: Reports = []

    async def scenario() -> None:
        state = state_of(spec(CheckKind.TTL, ttl=30.0), PASSING, ttl_deadline=time.monotonic() + 30)
        task = asyncio.get_running_loop().create_task(run_check(state, recorder(reports)))
        await settle()
        state.ttl_deadline = time.monotonic() + 60  # what an update does, then wakes the task
        state.wake.set()
        await settle()
        assert reports == [] and not task.done()
        task.cancel()

    run(scenario)


def test_a_ttl_without_a_deadline_never_expires() -> None:
    reports: Reports = []

    async def scenario() -> None:
        state = state_of(spec(CheckKind.TTL, ttl=0.0), PASSING)
        task = asyncio.get_running_loop().create_task(run_check(state, recorder(reports)))
        state.wake.set()
        await settle()
        assert reports == [] and not task.done()
        task.cancel()

    run(scenario)


# -- the probe loop ----------------------------------------------------------------------------


def test_every_probe_result_is_reported_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    script = [(CRITICAL, "refused"), (CRITICAL, "refused"), (PASSING, "ok"), (WARNING, "429")]
    reports: Reports = []

    async def scenario() -> None:
        done = asyncio.get_running_loop().create_future()

        async def scripted(_state: CheckState) -> tuple[CheckStatus, str]:
            if not script:
                done.set_result(None)
                await asyncio.Event().wait()  # the catalog would cancel it from here
            return script.pop(0)

        monkeypatch.setattr(checks, "probe", scripted)
        # interval 0: each wait between probes times out at once instead of taking 10 s
        state = state_of(spec(interval=0.0))
        task = asyncio.get_running_loop().create_task(run_check(state, recorder(reports)))
        await done
        task.cancel()

    run(scenario)
    assert reports == [(CRITICAL, "refused"), (CRITICAL, "refused"), (PASSING, "ok"), (WARNING, "429")]


def test_a_stopped_proxy_process_is_critical_without_dialing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = read_stat(os.getpid())
    assert real is not None and real.state not in ("T", "t")  # we are running, so not "stopped"
    assert stopped_process(os.getpid()) is None and stopped_process(None) is None

    def stopped(pid: int) -> ProcStat:
        return dataclasses.replace(real, pid=pid, state="T")  # as /proc shows a SIGSTOPped process

    monkeypatch.setattr(checks, "read_stat", stopped)
    state = state_of(spec(target="192.0.2.1:1"))  # TEST-NET: would hang if dialed
    state.pid = 4242
    status, output = asyncio.run(asyncio.wait_for(checks.probe(state), 1))
    assert status is CRITICAL
    assert output.startswith("proxy process 4242 is stopped")


# -- statuses ----------------------------------------------------------------------------------------


def test_the_worst_status_wins_and_no_checks_is_passing() -> None:
    assert worst([]) is PASSING
    assert worst([PASSING, WARNING]) is WARNING
    assert worst([WARNING, CRITICAL, PASSING]) is CRITICAL
