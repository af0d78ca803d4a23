"""The supervision loop driven by a fake clock and a fake spawner: every path in milliseconds.

Each test builds a Supervisor on a real temp data_dir with ``FakeSpawner`` "processes"
(pipes that turn readable on exit), runs work that would go to a thread inline, and
moves time only with ``clock.advance`` followed by ``loop.settle()``. Nothing sleeps:
a deadline fires because the loop's timer for it is due, which is exactly what the
real agent relies on.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisor.config.build import build_config
from supervisor.config.model import AgentConfig
from supervisor.config.sources import Source
from supervisor.errors import ConfigError, DataDirError, SupervisorError
from supervisor.process.marker import MarkedProcess
from supervisor.state.datadir import Allocation, DataDir, ProxyRecord
from supervisor.supervision.adoption import AdoptedProxy, AdoptionResult
from supervisor.supervision.events import (
    FilesChanged,
    LoopHooks,
    ReloadRequested,
    RestartRequested,
    ShutdownRequested,
)
from supervisor.supervision.machine import RestartPolicy, State
from supervisor.supervision.manager import Supervisor, SupervisorOptions
from supervisor.supervision.view import AgentView, ViewBoard
from tests.helpers.fakes import FakeClock, FakeProcess, FakeSpawner

POLICY = RestartPolicy()


def service(name: str, **proxy: Any) -> dict[str, Any]:
    return {"name": name, "port": 8080, "connect": {"proxy": {"command": ["/bin/true"], **proxy}}}


class FullDisk(DataDir):
    """A data_dir whose allocation writes fail with ENOSPC while ``full``."""

    full = False

    def save_allocations(self, allocations: Mapping[str, Allocation]) -> None:
        if self.full:
            raise DataDirError(f"cannot write {self.allocations_path}: {os.strerror(errno.ENOSPC)}")
        super().save_allocations(allocations)


class CountingHooks(LoopHooks):
    def __init__(self, heartbeat_interval: float | None = None) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.calls: list[str] = []

    def reloading(self) -> None:
        self.calls.append("reloading")

    def reloaded(self) -> None:
        self.calls.append("reloaded")

    def heartbeat(self) -> None:
        self.calls.append("heartbeat")

    def stopping(self) -> None:
        self.calls.append("stopping")


@dataclass
class Rig:
    """A Supervisor with fakes; ``documents`` is the config it (re)loads."""

    tmp_path: Path
    documents: list[dict[str, Any]]
    store: DataDir | None = None
    adopt: Callable[..., AdoptionResult] | None = None
    hooks: LoopHooks = field(default_factory=LoopHooks)
    deferred: list[Callable[[], None]] | None = None  # background work held back by the test
    clock: FakeClock = field(default_factory=FakeClock)
    spawner: FakeSpawner = field(default_factory=FakeSpawner)

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = DataDir(str(self.tmp_path / "data"))
        self.store.prepare()
        node_id = self.store.node_id()
        config = self.load()
        self.board = ViewBoard(AgentView(config=config, node_id=node_id, api_address="127.0.0.1:1"))
        options = SupervisorOptions(
            data_dir=self.store,
            node_id=node_id,
            api_address="127.0.0.1:1",
            load_config=self.load,
            is_root=False,
            spawner=self.spawner,
            clock=self.clock,
            policy=POLICY,
            port_is_free=lambda host, port: True,
            scan_marked=lambda owner, skip: [],
            kill_marked=lambda process: False,
            hooks=self.hooks,
            storage_retry=5.0,
            run_in_background=self._background,
        )
        if self.adopt is not None:
            options.adopt = self.adopt
        self.supervisor = Supervisor(options, self.board)
        self.loop = self.supervisor.loop
        self.supervisor.start(config)
        self.loop.settle()

    def _background(self, work: Callable[[], None]) -> None:
        if self.deferred is None:
            work()
        else:
            self.deferred.append(work)

    def load(self) -> AgentConfig:
        base = {
            "data_dir": str(self.tmp_path / "data"),
            "ports": {"proxy_min_port": 21000, "proxy_max_port": 21100},
        }
        sources = [Source("00.json", "json", json.dumps(base))]
        for number, doc in enumerate(self.documents, 1):
            document = {"service": doc} if "name" in doc else doc
            sources.append(Source(f"{number}.json", "json", json.dumps(document)))
        return build_config(sources)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.loop.settle()

    def post(self, event: Any) -> None:
        self.supervisor.post(event)
        self.loop.settle()

    def state(self, proxy_id: str) -> State | None:
        status = self.board.current.statuses.get(proxy_id)
        return status.state if status is not None else None

    def close(self) -> None:
        self.supervisor.close()
        self.spawner.close_all()


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def rig(rigs: list[Rig], tmp_path: Path, *documents: dict[str, Any], **options: Any) -> Rig:
    made = Rig(tmp_path, list(documents), **options)
    rigs.append(made)
    return made


def test_a_crashed_proxy_is_restarted_at_once_then_on_the_backoff_timer(
    rigs: list[Rig], tmp_path: Path
) -> None:
    r = rig(rigs, tmp_path, service("web"))
    assert r.state("web-proxy") is State.STARTING
    r.advance(POLICY.startup_grace)
    assert r.state("web-proxy") is State.RUNNING  # the startup-grace timer fired by itself
    for _ in range(POLICY.immediate_restarts):
        r.spawner.current("web-proxy").exit(1)
        r.loop.settle()
    assert len(r.spawner.of("web-proxy")) == 1 + POLICY.immediate_restarts
    r.spawner.current("web-proxy").exit(1)
    r.loop.settle()
    status = r.board.current.statuses["web-proxy"]
    assert status.state is State.BACKOFF and status.last_exit == "exited with code 1"
    assert status.next_attempt_monotonic is not None
    r.advance(status.next_attempt_monotonic - r.clock.now - 0.001)
    assert r.state("web-proxy") is State.BACKOFF  # not a moment early
    r.advance(0.002)
    assert r.state("web-proxy") is State.STARTING and len(r.spawner.of("web-proxy")) == 5


def test_an_adopted_proxy_of_a_service_removed_while_down_is_stopped_at_start(
    rigs: list[Rig], tmp_path: Path
) -> None:
    """Regression: the old loop only woke on events, so this decision waited forever."""
    survivor = FakeProcess(None, generation=3)

    def adopt(records: Any, owner: str, scan: Any, kill: Any) -> AdoptionResult:
        adopted = AdoptedProxy("gone-proxy", survivor, "spec", age=60.0, restarts=2, found_by="record")
        return AdoptionResult(adopted={"gone-proxy": adopted})

    r = rig(rigs, tmp_path, service("web"), adopt=adopt)
    assert survivor.signals == [signal.SIGINT]  # at start-up, with no other event
    assert r.state("gone-proxy") is None  # exited: its slot is gone
    assert "gone-proxy" not in json.loads(Path(r.store.snapshot_path).read_text())["Proxies"]  # type: ignore[union-attr]
    survivor.close()


def test_an_adopted_proxy_that_ignores_sigint_is_killed_after_the_stop_timeout(
    rigs: list[Rig], tmp_path: Path
) -> None:
    survivor = FakeProcess(None, generation=1, ignores_sigint=True)

    def adopt(records: Any, owner: str, scan: Any, kill: Any) -> AdoptionResult:
        return AdoptionResult(
            adopted={"gone-proxy": AdoptedProxy("gone-proxy", survivor, "s", 60.0, 0, "record")}
        )

    r = rig(rigs, tmp_path, adopt=adopt)
    assert r.state("gone-proxy") is State.STOPPING
    r.advance(POLICY.stop_timeout - 0.01)
    assert survivor.signals == [signal.SIGINT]
    r.advance(0.02)
    assert survivor.signals == [signal.SIGINT, signal.SIGKILL] and r.state("gone-proxy") is None
    survivor.close()


def test_an_adopted_proxy_that_is_still_wanted_keeps_running(rigs: list[Rig], tmp_path: Path) -> None:
    survivor = FakeProcess(None, generation=4)
    r0 = rig(rigs, tmp_path / "first", service("web"))
    planned = r0.board.current.proxies["web-proxy"]
    tmp = tmp_path / "second"

    def adopt(records: Any, owner: str, scan: Any, kill: Any) -> AdoptionResult:
        adopted = AdoptedProxy("web-proxy", survivor, planned.spec_hash, 60.0, 1, "record")
        return AdoptionResult(adopted={"web-proxy": adopted})

    tmp.mkdir()
    (tmp / "data").mkdir()
    (tmp / "data" / "proxy").mkdir()
    Path(r0.store.allocations_path).replace(tmp / "data" / "proxy" / "allocations.json")  # type: ignore[union-attr]
    r = rig(rigs, tmp, service("web"), adopt=adopt)
    assert survivor.signals == [] and r.state("web-proxy") is State.RUNNING
    assert r.spawner.started == []  # nothing new was started
    survivor.close()


def test_full_disk_blocks_only_new_proxies_and_the_retry_timer_starts_them(
    rigs: list[Rig], tmp_path: Path
) -> None:
    store = FullDisk(str(tmp_path / "data"))
    r = rig(rigs, tmp_path, service("web"), store=store)
    assert r.state("web-proxy") is State.STARTING
    store.full = True
    r.documents.append(service("db"))
    reply: concurrent.futures.Future[None] = concurrent.futures.Future()
    r.post(ReloadRequested("test", reply))
    assert reply.result(0) is None
    status = r.board.current.statuses["db-proxy"]
    assert status.state is State.BLOCKED and "No space left on device" in (status.blocked_reason or "")
    assert r.state("web-proxy") is State.STARTING and r.spawner.of("db-proxy") == []
    r.advance(4.9)
    assert r.state("db-proxy") is State.BLOCKED
    store.full = False
    r.advance(0.2)  # the storage retry is a timer: no event is needed
    assert r.state("db-proxy") is State.STARTING and len(r.spawner.of("db-proxy")) == 1
    assert "db-proxy" in json.loads(Path(store.allocations_path).read_text())["Proxies"]


def test_a_reload_applies_and_a_broken_one_keeps_everything(rigs: list[Rig], tmp_path: Path) -> None:
    hooks = CountingHooks()
    r = rig(rigs, tmp_path, service("web"), hooks=hooks)
    r.documents.append(service("db"))
    ok: concurrent.futures.Future[None] = concurrent.futures.Future()
    r.post(ReloadRequested("test", ok))
    assert ok.result(0) is None and r.state("db-proxy") is State.STARTING
    r.documents.append({"services": [{"name": "bad", "connect": {"proxy": {"comand": []}}}]})
    broken: concurrent.futures.Future[None] = concurrent.futures.Future()
    r.post(ReloadRequested("test", broken))
    with pytest.raises(ConfigError, match="comand: unknown key"):
        broken.result(0)
    assert r.board.current.reload_error and r.state("db-proxy") is State.STARTING
    assert hooks.calls == ["reloading", "reloaded", "reloading", "reloaded"]


def test_a_reload_asked_for_during_a_read_gets_a_read_of_its_own(rigs: list[Rig], tmp_path: Path) -> None:
    r = rig(rigs, tmp_path, service("web"), deferred=[])
    assert r.deferred is not None
    first: concurrent.futures.Future[None] = concurrent.futures.Future()
    second: concurrent.futures.Future[None] = concurrent.futures.Future()
    r.post(ReloadRequested("one", first))
    assert len(r.deferred) == 1  # the read runs on a worker; the loop is free meanwhile
    r.documents.append(service("db"))  # changed after the first read began
    r.post(ReloadRequested("two", second))
    assert len(r.deferred) == 1  # no second concurrent read
    r.deferred.pop()()
    r.loop.settle()
    assert first.done() and not second.done() and len(r.deferred) == 1
    r.deferred.pop()()
    r.loop.settle()
    assert second.result(0) is None and r.state("db-proxy") is State.STARTING


def test_file_events_are_debounced_into_one_reload(rigs: list[Rig], tmp_path: Path) -> None:
    hooks = CountingHooks()
    r = rig(rigs, tmp_path, service("web"), hooks=hooks)
    r.documents.append(service("db"))
    for _ in range(5):
        r.post(FilesChanged("x.json"))
        r.advance(0.1)
    assert r.state("db-proxy") is None
    r.advance(0.2)
    assert r.state("db-proxy") is State.STARTING and hooks.calls == ["reloading", "reloaded"]


def test_the_watchdog_heartbeat_is_a_timer(rigs: list[Rig], tmp_path: Path) -> None:
    hooks = CountingHooks(heartbeat_interval=10.0)
    r = rig(rigs, tmp_path, hooks=hooks)
    assert hooks.calls == ["heartbeat"]
    r.advance(9.9)
    assert hooks.calls == ["heartbeat"]
    r.advance(0.2)
    assert hooks.calls == ["heartbeat", "heartbeat"]


def test_an_operator_restart_replaces_the_process(rigs: list[Rig], tmp_path: Path) -> None:
    r = rig(rigs, tmp_path, service("web"))
    before = r.spawner.current("web-proxy")
    reply: concurrent.futures.Future[int] = concurrent.futures.Future()
    r.post(RestartRequested("web-proxy", reply))
    assert reply.result(0) == 1 and before.signals == [signal.SIGINT]
    assert len(r.spawner.of("web-proxy")) == 2 and r.board.current.statuses["web-proxy"].restarts == 0
    unknown: concurrent.futures.Future[int] = concurrent.futures.Future()
    r.post(RestartRequested("nope-proxy", unknown))
    with pytest.raises(SupervisorError, match="no managed proxy 'nope-proxy'"):
        unknown.result(0)


def test_leave_stops_every_proxy_then_the_loop(rigs: list[Rig], tmp_path: Path) -> None:
    r = rig(rigs, tmp_path, service("web"), service("db"))
    stubborn = r.spawner.current("db-proxy")
    stubborn.ignores_sigint = True
    reply: concurrent.futures.Future[None] = concurrent.futures.Future()
    r.post(ShutdownRequested(stop_proxies=True, reason="test", reply=reply))
    assert not reply.done() and not r.supervisor.stopped  # db is still running
    late: concurrent.futures.Future[None] = concurrent.futures.Future()
    r.post(ReloadRequested("too late", late))
    with pytest.raises(SupervisorError, match="shutting down"):
        late.result(0)
    r.advance(POLICY.stop_timeout + 0.01)
    assert stubborn.signals == [signal.SIGINT, signal.SIGKILL]
    assert reply.result(0) is None and r.supervisor.stopped
    assert all(not process.running for process in r.spawner.started)


def test_shutdown_without_leave_leaves_proxies_running(rigs: list[Rig], tmp_path: Path) -> None:
    r = rig(rigs, tmp_path, service("web"))
    reply: concurrent.futures.Future[None] = concurrent.futures.Future()
    r.post(ShutdownRequested(stop_proxies=False, reason="SIGTERM", reply=reply))
    assert reply.result(0) is None and r.supervisor.stopped
    assert r.spawner.current("web-proxy").running and r.spawner.current("web-proxy").signals == []
    record = json.loads(Path(r.store.snapshot_path).read_text())["Proxies"]["web-proxy"]  # type: ignore[union-attr]
    assert record["Pid"] == r.spawner.current("web-proxy").pid


def test_a_spawn_failure_backs_off_like_an_exit(rigs: list[Rig], tmp_path: Path) -> None:
    spawner = FakeSpawner(fail={"web-proxy"})
    r = rig(rigs, tmp_path, service("web"), spawner=spawner)
    status = r.board.current.statuses["web-proxy"]
    assert status.state is State.BACKOFF and "does not exist" in (status.last_exit or "")
    spawner.fail.clear()
    assert status.next_attempt_monotonic is not None
    r.advance(status.next_attempt_monotonic - r.clock.now + 0.001)
    assert r.state("web-proxy") is State.STARTING


def test_records_follow_every_start_and_exit(rigs: list[Rig], tmp_path: Path) -> None:
    r = rig(rigs, tmp_path, service("web"))

    def recorded() -> ProxyRecord:
        assert r.store is not None
        return r.store.load_records().records["web-proxy"]

    first = r.spawner.current("web-proxy")
    assert recorded().pid == first.pid and recorded().generation == 1
    first.exit(3)
    r.loop.settle()
    second = r.spawner.current("web-proxy")
    assert recorded().pid == second.pid and recorded().generation == 2 and recorded().restarts == 1


def test_marked_leftovers_of_an_exited_proxy_are_swept(rigs: list[Rig], tmp_path: Path) -> None:
    killed: list[int] = []
    r = rig(rigs, tmp_path, service("web"))
    from supervisor.process.identity import ProcStat
    from supervisor.process.marker import Marker

    leftover = MarkedProcess(
        pid=777, marker=Marker("n", "s", "web-proxy"), stat=ProcStat(777, "daemon", "S", 1, 777, 777, 5)
    )
    r.supervisor._sweeper.scan = lambda owner, skip: [leftover]

    def kill(process: MarkedProcess) -> bool:
        killed.append(process.pid)
        return True

    r.supervisor._sweeper.kill = kill
    r.spawner.current("web-proxy").exit(1)
    r.loop.settle()
    assert killed == []  # not while exits may still follow: the scan would slow restarts
    r.advance(0.31)
    assert killed == [777]
