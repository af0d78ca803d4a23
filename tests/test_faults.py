"""Faults a production agent meets: kill -9 at random moments, SIGSTOP, PID reuse after a
reboot, damaged or deleted state, a full disk, and proxies that misbehave.

Nothing lost, nothing duplicated, nothing orphaned. The long variants (SIGSTOP for 30 s)
run with ``-m soak``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_config
from supervisor.errors import DataDirError
from supervisor.process.identity import identity_of
from supervisor.process.marker import find_marked
from supervisor.state.datadir import DataDir, ProxyRecord
from supervisor.supervision.events import ReloadRequested, ShutdownRequested
from supervisor.supervision.manager import Supervisor, SupervisorOptions
from supervisor.supervision.view import AgentView, ViewBoard
from tests.conftest import free_port, free_port_range
from tests.helpers.agent import AgentProcess, fake_proxy, starts
from tests.helpers.mesh import Mesh, talk
from tests.helpers.processes import wait_until

ALLOW_ROOT = {"connect": {"proxy": {"allow_managed_root": True}}}


def service(name: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {"service": {"name": name, "port": 8080, **extra, "connect": {"proxy": {"command": command}}}}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path, extra=ALLOW_ROOT)
    yield process
    process.kill_everything()


def marked_counts(agent: AgentProcess) -> Counter[str]:
    node_id = agent.node_id()
    assert node_id
    return Counter(process.marker.proxy_id for process in find_marked(node_id))


# -- 1. kill -9 at random moments ------------------------------------------------------------


@pytest.mark.slow
def test_fifty_kill_9s_at_random_moments_lose_and_duplicate_nothing(
    agent: AgentProcess, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("FAULT_SEED", "4481")))
    steady = ["alpha", "beta", "gamma"]
    for name in steady:
        agent.write(f"{name}.json", service(name, fake_proxy("run", tmp_path / f"{name}.state")))
    agent.write("crash.json", service("crash", fake_proxy("exit", tmp_path / "crash.state", "1")))
    agent.start()
    first_pids = {name: agent.wait_state(f"{name}-proxy", "running")["Pid"] for name in steady}
    store = DataDir(str(agent.data_dir))
    churn: set[str] = set()
    crash_restarts: list[int] = []

    for round_number in range(50):
        # Change the drop-ins while no agent runs or while one is starting: both happen.
        name = f"churn{rng.randrange(4)}"
        if name in churn:
            agent.remove(f"{name}.json")
            churn.discard(name)
        else:
            agent.write(f"{name}.json", service(name, fake_proxy("run", tmp_path / f"{name}.state")))
            churn.add(name)
        if round_number > 0:
            agent.start(wait=False)
        time.sleep(rng.uniform(0.0, 0.8))  # anywhere from mid-start-up to settled
        agent.kill9()
        loaded = store.load_records()
        assert loaded.problem is None, f"round {round_number}: {loaded.problem}"
        record = loaded.records.get("crash-proxy")
        if record is not None:
            crash_restarts.append(record.restarts)

    agent.start()
    wanted = {f"{name}-proxy" for name in [*steady, *churn]}
    for proxy_id in wanted:
        agent.wait_state(proxy_id, "running", timeout=20)
    wait_until(
        lambda: set(marked_counts(agent)) - {"crash-proxy"} == wanted, timeout=20, message="leftovers gone"
    )
    counts = marked_counts(agent)
    assert all(counts[proxy_id] == 1 for proxy_id in wanted), counts  # exactly one each
    assert counts["crash-proxy"] <= 1
    proxies = agent.proxies()
    assert set(proxies) == wanted | {"crash-proxy"}
    # The steady proxies were never restarted: 50 agents adopted the same processes.
    assert {name: proxies[f"{name}-proxy"]["Pid"] for name in steady} == first_pids
    assert all(len(starts(tmp_path / f"{name}.state")) == 1 for name in steady)
    # Counters only ever go up, across every agent run.
    assert crash_restarts == sorted(crash_restarts) and crash_restarts[-1] > 0
    assert proxies["crash-proxy"]["Restarts"] >= crash_restarts[-1]
    # Every file the agent keeps is whole.
    for path in [store.snapshot_path, store.allocations_path]:
        json.loads(Path(path).read_text())
    assert not list(Path(str(agent.data_dir)).rglob(".tmp-*"))


# -- 2. SIGSTOP -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stopped_for", [pytest.param(3.0, marks=pytest.mark.slow), pytest.param(30.0, marks=pytest.mark.soak)]
)
def test_sigstopped_agent_leaves_traffic_alone_and_reconciles_after_sigcont(
    tmp_path: Path, stopped_for: float
) -> None:
    mesh = Mesh(tmp_path)
    state = tmp_path / "side.state"
    try:
        mesh.agent.write("side.json", service("side", fake_proxy("run", state)))
        mesh.start()
        side = mesh.agent.wait_state("side-proxy", "running")
        agent = mesh.agent
        assert agent.process is not None
        os.kill(agent.process.pid, signal.SIGSTOP)
        try:
            # Proxies live on: new connections through the mesh keep working (certificates,
            # instances and authorizations are cached in the proxies) ...
            failures, successes = 0, 0
            deadline = time.monotonic() + stopped_for
            os.kill(side["Pid"], signal.SIGKILL)  # a proxy dies while nobody watches
            mesh.agent.write("late.json", service("late", fake_proxy("run", tmp_path / "late.state")))
            while time.monotonic() < deadline:
                if talk(mesh.upstream_port, b"stopped?") == b"stopped?|db":
                    successes += 1
                else:
                    failures += 1
                time.sleep(0.05)
        finally:
            os.kill(agent.process.pid, signal.SIGCONT)
        assert failures == 0 and successes > 10
        # ... and once the agent runs again it catches up at once.
        restarted = agent.wait_proxy("side-proxy", lambda e: e["Pid"] not in (None, side["Pid"]), timeout=5)
        assert restarted["LastExit"] is not None
        agent.wait_state("late-proxy", "running", timeout=10)
        assert talk(mesh.upstream_port) == b"ping|db"
    finally:
        mesh.close()


# -- 3. PID reuse after a reboot --------------------------------------------------------------


def test_record_from_before_a_reboot_is_neither_adopted_nor_signalled(
    agent: AgentProcess, tmp_path: Path
) -> None:
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        identity = identity_of(stranger.pid)
        assert identity is not None
        store = DataDir(str(agent.data_dir))
        store.prepare()
        # Same PID and start time as a live process, but recorded under another boot: after
        # a reboot PIDs and start ticks repeat, so only the boot ID tells them apart.
        other_boot = "00000000-0000-4000-8000-000000000000"
        record = ProxyRecord("web-proxy", stranger.pid, identity.start_ticks, other_boot, "x", 2, 1)
        store.save_records({"web-proxy": record})
        agent.start()
        entry = agent.wait_state("web-proxy", "running")
        assert entry["Pid"] != stranger.pid and not entry["Adopted"]
        assert stranger.poll() is None  # never signalled
        assert len(starts(state)) == 1
    finally:
        stranger.kill()
        stranger.wait()


# -- 4. damaged, deleted and full storage --------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "content"),
    [
        ("connect/intentions.json", '{"Version": 1, "Intentions": [{"ID": '),
        ("connect/queries.json", "[1, 2"),
        ("connect/ca.json", '{"Version": 1, "ClusterID": "x", "Roots": []}'),
    ],
)
def test_damaged_security_state_stops_the_agent_with_exit_2_and_keeps_the_file(
    agent: AgentProcess, tmp_path: Path, relative: str, content: str
) -> None:
    agent.write("web.json", service("web", fake_proxy("run", tmp_path / "web.state")))
    assert agent.data_dir is not None
    damaged = agent.data_dir / relative
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_text(content)
    agent.start(wait=False)
    assert agent.wait_exit() == 2  # systemd's RestartPreventExitStatus=2: no crash loop
    log = agent.current_log()
    assert str(damaged) in log and ("restore it" in log)
    assert damaged.read_text() == content  # nothing overwritten: the operator can repair it
    assert not (tmp_path / "web.state").exists()  # and nothing was started


def test_damaged_records_pid_files_and_registrations_are_set_aside(
    agent: AgentProcess, tmp_path: Path
) -> None:
    agent.write("web.json", service("web", fake_proxy("run", tmp_path / "web.state")))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    status, _, _ = agent.http("PUT", "/v1/agent/service/register", {"Name": "api", "Port": 9000})
    assert status == 200
    agent.kill9()
    data = agent.data_dir
    assert data is not None
    (data / "proxy" / "snapshot.json").write_text('{"Version": 2, "Proxies": {"web-pr')
    (data / "proxy" / "pids" / "web-proxy.pid").write_text("not a pid\n")
    (data / "services" / "api.json").write_bytes(b"\x00\x01garbage")
    (data / "proxy" / ".tmp-abc-snapshot.json").write_text("half a write")
    agent.start()
    log = agent.current_log()
    assert "is unusable" in log and "moved it to" in log  # registration set aside, said loudly
    assert "removed 1 temporary file" in log
    entry = agent.wait_state("web-proxy", "running")
    assert entry["Pid"] == web["Pid"] and entry["Adopted"]  # found by its marker despite the record
    assert (data / "proxy" / "pids" / "web-proxy.pid").read_text().strip() == str(web["Pid"])
    assert list((data / "services").glob("api.json.corrupt-*"))


def test_data_dir_deleted_while_running_is_rebuilt_from_memory(agent: AgentProcess, tmp_path: Path) -> None:
    agent.write("web.json", service("web", fake_proxy("run", tmp_path / "web.state")))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    status, _, created = agent.http(
        "POST", "/v1/connect/intentions", {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    )
    assert status == 200
    data = agent.data_dir
    assert data is not None
    kept = ["node-id", "proxy/allocations.json", "connect/ca.json", "connect/intentions.json"]
    before = {name: (data / name).read_bytes() for name in kept}

    subprocess.run(["rm", "-rf", str(data)], check=False)  # may race the repair: both are fine
    wait_until(lambda: all((data / name).exists() for name in [*kept, "agent.lock"]), timeout=10)
    assert {name: (data / name).read_bytes() for name in kept} == before
    assert "was damaged while the agent runs" in agent.current_log()
    # The lock is held again: a second agent on this data_dir is refused.
    second = AgentProcess(tmp_path / "second", data_dir=False, extra={**ALLOW_ROOT, "data_dir": str(data)})
    second.start(wait=False)
    assert second.wait_exit() == 1
    assert f"another agent (PID {agent.process.pid})" in second.log()  # type: ignore[union-attr]
    # Supervision carried on: the proxy is still ours, and the record lists it.
    assert agent.proxies()["web-proxy"]["Pid"] == web["Pid"]
    wait_until(lambda: (data / "proxy" / "snapshot.json").exists(), timeout=5)
    snapshot = json.loads((data / "proxy" / "snapshot.json").read_text())
    assert str(web["Pid"]) in json.dumps(snapshot)
    assert agent.get(f"/v1/connect/intentions/{created['ID']}")["Action"] == "deny"


def test_removed_logs_directory_is_recreated_and_said(agent: AgentProcess, tmp_path: Path) -> None:
    agent.write("web.json", service("web", fake_proxy("tick", tmp_path / "web.state")))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    logs = agent.data_dir / "proxy" / "logs"  # type: ignore[operator]
    shutil.rmtree(logs)
    wait_until(logs.is_dir, timeout=10, message="the logs directory to be re-created")
    wait_until(lambda: "restart -all" in agent.current_log(), timeout=5, message="the warning")
    result = agent.cli("restart", "web")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "tick" in (logs / "web-proxy-stdout.log").read_text(), timeout=10)
    assert agent.proxies()["web-proxy"]["Pid"] != web["Pid"]


class FullDisk(DataDir):
    """A data_dir whose writes fail with ENOSPC while ``full`` is set."""

    full = False

    def save_allocations(self, allocations: Any) -> None:
        if self.full:
            raise DataDirError(f"cannot write {self.allocations_path}: {os.strerror(errno.ENOSPC)}")
        super().save_allocations(allocations)

    def save_records(self, records: Any) -> None:
        if self.full:
            raise DataDirError(f"cannot write {self.snapshot_path}: {os.strerror(errno.ENOSPC)}")
        super().save_records(records)


def test_full_disk_blocks_only_proxies_whose_token_cannot_be_saved(tmp_path: Path) -> None:
    config_dir = tmp_path / "conf.d"
    config_dir.mkdir()
    low, high = free_port_range(16)
    store = FullDisk(str(tmp_path / "data"))
    store.prepare()
    base = {"data_dir": store.root, "ports": {"proxy_min_port": low, "proxy_max_port": high}}
    (config_dir / "00.json").write_text(json.dumps(base))
    (config_dir / "web.json").write_text(json.dumps(service("web", fake_proxy("run", tmp_path / "w.state"))))

    def load() -> Any:
        return load_config([], [str(config_dir)])

    config = load()
    board = ViewBoard(AgentView(config=config, node_id=store.node_id(), api_address="127.0.0.1:1"))
    supervisor = Supervisor(
        SupervisorOptions(
            data_dir=store,
            node_id=store.node_id(),
            api_address="127.0.0.1:1",
            load_config=load,
            is_root=False,
            storage_retry=0.2,
        ),
        board,
    )

    def run() -> None:
        supervisor.start(config)
        supervisor.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def state_of(proxy_id: str) -> Any:
        status = board.current.statuses.get(proxy_id)
        return status.state if status else None

    try:
        wait_until(lambda: state_of("web-proxy") == "running", timeout=10)
        store.full = True
        (config_dir / "db.json").write_text(
            json.dumps(service("db", fake_proxy("run", tmp_path / "d.state")))
        )
        supervisor.post(ReloadRequested("test"))  # (no file watcher in this harness)
        wait_until(lambda: state_of("db-proxy") == "blocked", timeout=10)
        reason = board.current.statuses["db-proxy"].blocked_reason or ""
        assert "No space left on device" in reason and "retrying" in reason
        assert state_of("web-proxy") == "running" and not (tmp_path / "d.state").exists()
        store.full = False  # space freed: the next retry saves the token, then starts db
        wait_until(lambda: state_of("db-proxy") == "running", timeout=10)
        assert "db-proxy" in json.loads(Path(store.allocations_path).read_text())["Proxies"]
    finally:
        supervisor.post(ShutdownRequested(stop_proxies=True, reason="test"))
        thread.join(15)
        supervisor.close()


# -- 5. proxies that misbehave ----------------------------------------------------------------------


def test_flooding_proxy_output_is_kept_whole_and_the_agent_stays_responsive(
    agent: AgentProcess, tmp_path: Path
) -> None:
    lines = 1_000_000
    agent.write("loud.json", service("loud", fake_proxy("flood", tmp_path / "loud.state", str(lines))))
    agent.start()
    agent.wait_state("loud-proxy", "running")
    log = agent.data_dir / "proxy" / "logs" / "loud-proxy-stdout.log"  # type: ignore[operator]
    worst = 0.0
    while not log.exists() or f"line {lines - 1}\n" not in log.read_text()[-64:]:
        began = time.monotonic()
        agent.proxies()
        worst = max(worst, time.monotonic() - began)
        time.sleep(0.05)
    assert worst < 1.0  # the API never stalled behind the flood (it is not on the data path)
    text = log.read_text()
    assert text.count("\n") >= lines and f"line {lines - 1}\n" in text


def test_proxy_whose_port_is_taken_backs_off_visibly(agent: AgentProcess, tmp_path: Path) -> None:
    import socket

    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        forwarder = [
            sys.executable,
            "-c",
            f"import socket; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()",
        ]
        agent.write("busy.json", service("busy", forwarder))
        agent.start()
        entry = agent.wait_state("busy-proxy", "backoff", timeout=15)
        assert "exited with code 1" in (entry["LastExit"] or "")
        assert entry["NextAttemptInSeconds"] is not None and entry["Restarts"] >= 3
        stderr = Path(entry["StderrLog"]).read_text()
        assert "Address already in use" in stderr


def test_a_rebuild_interrupted_by_a_full_disk_is_finished_later(tmp_path: Path) -> None:
    from supervisor.state.datadir import Allocation
    from supervisor.state.guard import DataDirGuard, Repair

    store = FullDisk(str(tmp_path / "data"))
    store.prepare()
    node_id = store.node_id()
    lock = store.lock()
    guard = DataDirGuard(store, lock, node_id)
    allocations = {"web-proxy": Allocation(token="t0k3n", port=21000, port_auto=True)}
    assert guard.repair(allocations, {}) is Repair.INTACT
    shutil.rmtree(store.root)
    store.full = True
    assert guard.repair(allocations, {"web-proxy": os.getpid()}) is Repair.RETRY
    assert lock.in_place() and (Path(store.root) / "node-id").read_text().strip() == node_id
    assert not Path(store.allocations_path).exists()
    store.full = False  # nothing is missing any more, but the rebuild is not finished
    assert guard.repair(allocations, {"web-proxy": os.getpid()}) is Repair.RESTORED
    assert json.loads(Path(store.allocations_path).read_text())["Proxies"]["web-proxy"]["Token"] == "t0k3n"
    assert guard.repair(allocations, {}) is Repair.INTACT
    lock.release()
