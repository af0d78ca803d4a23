"""The supervision loop with real processes, in-process (the loop runs on a thread).

Each test builds a config dir, runs a Supervisor on a temp data_dir and drives the
``fakeproxy`` helper as its proxy command.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_config
from supervisor.config.model import AgentConfig
from supervisor.process.identity import identity_of
from supervisor.state.datadir import DataDir, ProxyRecord
from supervisor.supervision.events import ReloadRequested, ShutdownRequested
from supervisor.supervision.machine import RestartPolicy
from supervisor.supervision.manager import Supervisor, SupervisorOptions
from supervisor.supervision.view import AgentView, ProxyStatus, ViewBoard
from tests.conftest import free_port_range
from tests.helpers.processes import pid_alive, wait_until
from tests.helpers.statefile import fake_proxy, first_value, starts, stopped

FAST = RestartPolicy(stop_timeout=0.5, startup_grace=0.2)


def proxy_command(mode: str, statefile: Path, *extra: str) -> list[str]:
    return fake_proxy(mode, statefile, *extra)


class Harness:
    """A Supervisor on a thread, plus helpers to change its config and wait for states."""

    def __init__(
        self,
        tmp_path: Path,
        policy: RestartPolicy = FAST,
        is_root: bool = False,
        reuse_config: bool = False,
        ambient_env: dict[str, str] | None = None,
    ) -> None:
        self.ambient_env = ambient_env
        self.tmp_path = tmp_path
        self.config_dir = tmp_path / "conf.d"
        self.config_dir.mkdir(exist_ok=True)
        self.data_dir = DataDir(str(tmp_path / "data"))
        self.data_dir.prepare()
        self.node_id = self.data_dir.node_id()
        self.policy = policy
        self.is_root = is_root
        if reuse_config:  # a later agent run on the same data_dir and config dir
            self.base = json.loads((self.config_dir / "00-agent.json").read_text())
        else:
            low, high = free_port_range(32)
            self.base = {
                "data_dir": self.data_dir.root,
                "ports": {"proxy_min_port": low, "proxy_max_port": high},
            }
            self.write("00-agent.json", self.base)
        self.supervisor: Supervisor | None = None
        self.thread: threading.Thread | None = None
        self.board: ViewBoard | None = None
        self.error: BaseException | None = None

    def write(self, name: str, document: dict[str, Any]) -> None:
        path = self.config_dir / name
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(document))
        temp.rename(path)

    def remove(self, name: str) -> None:
        (self.config_dir / name).unlink()

    def load(self) -> AgentConfig:
        return load_config([], [str(self.config_dir)])

    def start(self) -> None:
        config = self.load()
        self.board = ViewBoard(AgentView(config=config, node_id=self.node_id, api_address="127.0.0.1:1"))
        options = SupervisorOptions(
            data_dir=self.data_dir,
            node_id=self.node_id,
            api_address="127.0.0.1:1",
            load_config=self.load,
            is_root=self.is_root,
            policy=self.policy,
            ambient_env=self.ambient_env if self.ambient_env is not None else dict(os.environ),
        )
        self.supervisor = Supervisor(options, self.board)
        started = threading.Event()

        def run() -> None:
            assert self.supervisor is not None
            try:
                self.supervisor.start(config)
                started.set()
                self.supervisor.run()
            except BaseException as exc:  # noqa: BLE001 - surfaced to the test through self.error
                self.error = exc
                started.set()
            finally:
                self.supervisor.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        assert self.error is None, self.error

    def stop(self, stop_proxies: bool) -> None:
        if self.supervisor is None or self.thread is None:
            return
        reply: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.supervisor.post(ShutdownRequested(stop_proxies=stop_proxies, reason="test", reply=reply))
        reply.result(timeout=15)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.supervisor = None

    def reload(self) -> None:
        assert self.supervisor is not None
        reply: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.supervisor.post(ReloadRequested("test", reply))
        reply.result(timeout=10)

    @property
    def view(self) -> AgentView:
        assert self.board is not None
        return self.board.current

    def status(self, proxy_id: str) -> ProxyStatus | None:
        return self.view.statuses.get(proxy_id)

    def wait_status(
        self,
        proxy_id: str,
        predicate: Callable[[ProxyStatus], bool],
        timeout: float = 10.0,
        message: str = "",
    ) -> ProxyStatus:
        def check() -> ProxyStatus | None:
            assert self.error is None, self.error
            status = self.status(proxy_id)
            return status if status is not None and predicate(status) else None

        found = wait_until(check, timeout, message=message or f"{proxy_id} (now {self.status(proxy_id)})")
        assert found is not None
        return found

    def wait_state(self, proxy_id: str, state: str, timeout: float = 10.0) -> ProxyStatus:
        def check() -> ProxyStatus | None:
            assert self.error is None, self.error
            status = self.status(proxy_id)
            return status if status is not None and status.state == state else None

        found = wait_until(check, timeout, message=f"{proxy_id} to be {state} (now {self.status(proxy_id)})")
        assert found is not None
        return found


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.stop(stop_proxies=True)


@pytest.fixture
def two_agents(tmp_path: Path) -> Iterator[tuple[Harness, Harness]]:
    """Two supervisor runs on one data_dir and config dir: the second one adopts."""
    first = Harness(tmp_path)
    second = Harness(tmp_path, reuse_config=True)
    yield first, second
    first.stop(stop_proxies=True)
    second.stop(stop_proxies=True)


def service(name: str, command: list[str], **proxy: Any) -> dict[str, Any]:
    return {"name": name, "port": 8080, "connect": {"proxy": {"command": command, **proxy}}}


def test_proxy_gets_environment_logs_pid_file_and_record(harness: Harness, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    harness.write("web.json", {"service": service("web", proxy_command("run", state))})
    os.environ["FAKEPROXY_AMBIENT"] = "from-agent"
    try:
        harness.start()
    finally:
        del os.environ["FAKEPROXY_AMBIENT"]
    status = harness.wait_state("web-proxy", "running")
    (start,) = wait_until(lambda: starts(state))
    assert start["pid"] == status.pid
    env = start["env"]
    assert env["CONNECT_PROXY_ID"] == "web-proxy"
    assert len(env["CONNECT_PROXY_TOKEN"]) == 36
    assert env["CONSUL_HTTP_ADDR"] == "127.0.0.1:1" and env["CONSUL_HTTP_SSL"] == "false"
    assert env["FAKEPROXY_AMBIENT"] == "from-agent"  # the agent's environment is passed on
    assert env["PROXY_SUPERVISOR_MARKER"].startswith(f"v1:{harness.node_id}:")

    stdout_log, stderr_log = harness.data_dir.log_paths("web-proxy")
    wait_until(lambda: Path(stdout_log).exists() and "hello stdout" in Path(stdout_log).read_text())
    assert Path(stdout_log).read_text() == f"hello stdout from {status.pid}\n"
    assert Path(stderr_log).read_text() == f"hello stderr from {status.pid}\n"
    assert os.stat(stdout_log).st_mode & 0o777 == 0o600
    assert os.stat(harness.data_dir.logs_dir).st_mode & 0o777 == 0o700
    assert Path(harness.data_dir.pid_path("web-proxy")).read_text() == str(status.pid)

    records = harness.data_dir.load_records().records
    record = records["web-proxy"]
    assert record.pid == status.pid
    assert identity_of(status.pid) == record.identity
    assert os.stat(harness.data_dir.snapshot_path).st_mode & 0o777 == 0o600


def test_exited_proxy_is_restarted_and_counted(harness: Harness, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    harness.write("web.json", {"service": service("web", proxy_command("run", state))})
    harness.start()
    first = harness.wait_state("web-proxy", "running")
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    second = harness.wait_status("web-proxy", lambda s: s.pid not in (None, first.pid))
    assert second.restarts == 1
    assert harness.status("web-proxy") is not None
    harness.wait_status("web-proxy", lambda s: s.last_exit == "killed by SIGKILL")
    assert harness.data_dir.load_records().records["web-proxy"].restarts == 1


def test_crash_looping_proxy_backs_off_and_shows_it(harness: Harness, tmp_path: Path) -> None:
    state = tmp_path / "bad.state"
    harness.write("bad.json", {"service": service("bad", proxy_command("exit", state, "3"))})
    harness.start()
    status = harness.wait_state("bad-proxy", "backoff")
    assert status.last_exit == "exited with code 3"
    assert status.restarts == 3 and len(starts(state)) == 4  # first start + 3 immediate restarts
    assert status.next_attempt_monotonic is not None and status.pid is None
    assert not Path(harness.data_dir.pid_path("bad-proxy")).exists()


def test_removed_service_stops_its_proxy_with_sigint(harness: Harness, tmp_path: Path) -> None:
    web_state, db_state = tmp_path / "web.state", tmp_path / "db.state"
    harness.write("web.json", {"service": service("web", proxy_command("run", web_state))})
    harness.write("db.json", {"service": service("db", proxy_command("run", db_state))})
    harness.start()
    web = harness.wait_state("web-proxy", "running")
    db = harness.wait_state("db-proxy", "running")
    harness.remove("web.json")
    harness.reload()
    wait_until(lambda: harness.status("web-proxy") is None, message="web-proxy to be gone")
    assert web.pid in stopped(web_state)  # it got SIGINT and exited cleanly
    assert not Path(harness.data_dir.pid_path("web-proxy")).exists()
    assert "web-proxy" not in harness.data_dir.load_records().records
    db_now = harness.status("db-proxy")
    assert db_now is not None and db_now.pid == db.pid  # untouched


def test_changed_command_restarts_only_that_proxy_and_config_change_restarts_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    web_state, db_state = tmp_path / "web.state", tmp_path / "db.state"
    harness.write("web.json", {"service": service("web", proxy_command("run", web_state))})
    harness.write("db.json", {"service": service("db", proxy_command("run", db_state))})
    harness.start()
    web = harness.wait_state("web-proxy", "running")
    db = harness.wait_state("db-proxy", "running")
    token = starts(web_state)[0]["env"]["CONNECT_PROXY_TOKEN"]

    # config-only change (plus an unrelated new tag): nothing restarts, the config endpoint changes
    harness.write(
        "web.json",
        {"service": {**service("web", proxy_command("run", web_state), config={"x": 1}), "tags": ["t"]}},
    )
    harness.reload()
    assert harness.view.proxies["web-proxy"].config["x"] == 1
    web_now, db_now = harness.status("web-proxy"), harness.status("db-proxy")
    assert web_now is not None and db_now is not None
    assert (web_now.pid, db_now.pid) == (web.pid, db.pid)

    # changed command: only web restarts, with the same token
    harness.write("web.json", {"service": service("web", proxy_command("run", web_state, "--v2"))})
    harness.reload()
    wait_until(lambda: len(starts(web_state)) == 2)
    new_web = harness.wait_state("web-proxy", "running")
    assert new_web.pid != web.pid and new_web.restarts == 0
    assert web.pid in stopped(web_state)
    assert starts(web_state)[1]["env"]["CONNECT_PROXY_TOKEN"] == token
    db_now = harness.status("db-proxy")
    assert db_now is not None and db_now.pid == db.pid and len(starts(db_state)) == 1


def test_broken_reload_keeps_running_config(harness: Harness, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    harness.write("web.json", {"service": service("web", proxy_command("run", state))})
    harness.start()
    web = harness.wait_state("web-proxy", "running")
    (harness.config_dir / "web.json").write_text('{"service": {"name": "web", ')
    assert harness.supervisor is not None
    reply: concurrent.futures.Future[None] = concurrent.futures.Future()
    harness.supervisor.post(ReloadRequested("test", reply))
    with pytest.raises(Exception, match="invalid JSON"):
        reply.result(timeout=10)
    assert harness.view.reload_error is not None and "web.json" in harness.view.reload_error
    status = harness.status("web-proxy")
    assert status is not None and status.pid == web.pid and status.state == "running"


def test_proxy_ignoring_sigint_is_killed_after_the_stop_timeout(harness: Harness, tmp_path: Path) -> None:
    state = tmp_path / "stubborn.state"
    harness.write("s.json", {"service": service("stubborn", proxy_command("ignore-sigint", state))})
    harness.start()
    status = harness.wait_state("stubborn-proxy", "running")
    assert status.pid is not None
    harness.remove("s.json")
    started = time.monotonic()
    harness.reload()
    wait_until(lambda: not pid_alive(status.pid or 0), timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed >= FAST.stop_timeout * 0.9  # not killed before the grace period
    assert status.pid not in stopped(state)


def test_group_members_are_killed_when_the_proxy_exits(harness: Harness, tmp_path: Path) -> None:
    state = tmp_path / "w.state"
    harness.write("w.json", {"service": service("w", proxy_command("worker", state))})
    harness.start()
    status = harness.wait_state("w-proxy", "running")
    worker = wait_until(lambda: first_value(state, "worker"))
    assert pid_alive(worker)
    assert status.pid is not None
    os.kill(status.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(worker), message="the orphaned worker to be killed")


def test_double_forked_leftover_is_killed(harness: Harness, tmp_path: Path) -> None:
    state = tmp_path / "d.state"
    harness.write("d.json", {"service": service("d", proxy_command("double-fork", state))})
    harness.start()
    daemon = wait_until(lambda: first_value(state, "daemon"))
    wait_until(lambda: not pid_alive(daemon), message="the escaped daemon to be killed")
    harness.wait_status("d-proxy", lambda s: s.restarts >= 1)


def test_root_without_allow_managed_root_starts_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, is_root=True)
    state = tmp_path / "web.state"
    h.write("web.json", {"service": service("web", proxy_command("run", state))})
    try:
        h.start()
        status = h.wait_state("web-proxy", "blocked")
        assert status.blocked_reason is not None and "allow_managed_root" in status.blocked_reason
        assert any(
            record.levelname == "ERROR" and "allow_managed_root" in record.getMessage()
            for record in caplog.records
        )
        time.sleep(0.3)  # give a wrongly started proxy time to show up in the state file
        assert starts(state) == []
        h.write("00-agent.json", {**h.base, "connect": {"proxy": {"allow_managed_root": True}}})
        h.reload()
        h.wait_state("web-proxy", "running")
        assert len(starts(state)) == 1
    finally:
        h.stop(stop_proxies=True)


def test_proxies_survive_the_supervisor_and_are_adopted_without_restart(
    two_agents: tuple[Harness, Harness], tmp_path: Path
) -> None:
    first, second = two_agents
    web_state, db_state = tmp_path / "web.state", tmp_path / "db.state"
    first.write("web.json", {"service": service("web", proxy_command("run", web_state))})
    first.write("db.json", {"service": service("db", proxy_command("run", db_state))})
    first.start()
    web = first.wait_state("web-proxy", "running")
    db = first.wait_state("db-proxy", "running")
    first.stop(stop_proxies=False)  # the agent goes away; proxies stay
    assert web.pid is not None and db.pid is not None
    assert pid_alive(web.pid) and pid_alive(db.pid)

    second.start()
    adopted_web = second.wait_state("web-proxy", "running")
    adopted_db = second.wait_state("db-proxy", "running")
    assert (adopted_web.pid, adopted_db.pid) == (web.pid, db.pid)
    assert adopted_web.adopted and adopted_web.restarts == 0
    assert len(starts(web_state)) == 1 and len(starts(db_state)) == 1

    # an adopted process that dies is restarted at once (its exit is seen via its pidfd)
    os.kill(web.pid, signal.SIGKILL)
    restarted = second.wait_status("web-proxy", lambda s: s.pid not in (None, web.pid))
    assert restarted.restarts == 1 and restarted.last_exit is not None
    assert "status unknown" in restarted.last_exit


def test_a_service_removed_while_the_agent_was_down_has_its_proxy_stopped_at_start(
    two_agents: tuple[Harness, Harness], tmp_path: Path
) -> None:
    """Regression (issue 9): the adopted proxy of a removed service kept running, shown as
    adopted, its token and port dropped from allocations.json: the loop only woke on
    events, and this decision needed none."""
    first, second = two_agents
    web_state, db_state = tmp_path / "web.state", tmp_path / "db.state"
    first.write("web.json", {"service": service("web", proxy_command("run", web_state))})
    first.write("db.json", {"service": service("db", proxy_command("run", db_state))})
    first.start()
    db = first.wait_state("db-proxy", "running")
    first.wait_state("web-proxy", "running")
    first.stop(stop_proxies=False)
    first.remove("db.json")  # while no agent runs

    second.start()
    pid = db.pid
    assert pid is not None
    wait_until(lambda: not pid_alive(pid), timeout=5, message="the removed service's proxy to stop")
    wait_until(lambda: second.status("db-proxy") is None, timeout=5, message="its slot to go")
    assert stopped(db_state)  # a clean stop (SIGINT), not a kill
    assert second.status("web-proxy") is not None and second.status("web-proxy").adopted  # type: ignore[union-attr]


def test_record_whose_pid_is_another_process_is_neither_adopted_nor_signalled(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    state = tmp_path / "web.state"
    h.write("web.json", {"service": service("web", proxy_command("run", state))})
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        identity = identity_of(stranger.pid)
        assert identity is not None
        fake = ProxyRecord("web-proxy", stranger.pid, identity.start_ticks + 7, identity.boot_id, "x", 3, 2)
        h.data_dir.save_records({"web-proxy": fake})
        h.start()
        status = h.wait_state("web-proxy", "running")
        assert status.pid != stranger.pid and not status.adopted
        assert status.restarts == 2 and status.generation == 4  # counters continue from the record
        assert stranger.poll() is None  # the stranger was not signalled
    finally:
        stranger.kill()
        stranger.wait()
        h.stop(stop_proxies=True)


def test_record_pointing_at_a_thread_of_the_agent_is_not_adopted(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    state = tmp_path / "web.state"
    h.write("web.json", {"service": service("web", proxy_command("run", state))})
    ready = threading.Event()
    done = threading.Event()
    thread_ids: list[int] = []

    def park() -> None:
        thread_ids.append(threading.get_native_id())
        ready.set()
        done.wait(30)

    parked = threading.Thread(target=park, daemon=True)
    parked.start()
    try:
        assert ready.wait(5)
        tid = thread_ids[0]
        with open(f"/proc/{os.getpid()}/task/{tid}/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        from supervisor.process.identity import boot_id

        # Exactly the record Consul's kill(pid, 0) check would have accepted (issue 4455).
        h.data_dir.save_records({"web-proxy": ProxyRecord("web-proxy", tid, ticks, boot_id(), "x", 1, 0)})
        h.start()
        status = h.wait_state("web-proxy", "running")
        assert status.pid != tid and not status.adopted
        assert len(starts(state)) == 1
    finally:
        done.set()
        parked.join()
        h.stop(stop_proxies=True)


def test_unrecorded_marked_proxy_is_adopted_not_duplicated(
    two_agents: tuple[Harness, Harness], tmp_path: Path
) -> None:
    first, second = two_agents
    state = tmp_path / "web.state"
    first.write("web.json", {"service": service("web", proxy_command("run", state))})
    first.start()
    web = first.wait_state("web-proxy", "running")
    first.stop(stop_proxies=False)
    # Simulate an agent that died between spawning and recording: no snapshot at all.
    os.unlink(first.data_dir.snapshot_path)
    second.start()
    adopted = second.wait_state("web-proxy", "running")
    assert adopted.pid == web.pid and adopted.adopted
    time.sleep(0.3)
    assert len(starts(state)) == 1
    assert second.data_dir.load_records().records["web-proxy"].pid == web.pid


def test_corrupt_snapshot_is_set_aside_and_proxies_are_still_found(
    two_agents: tuple[Harness, Harness], tmp_path: Path
) -> None:
    first, second = two_agents
    state = tmp_path / "web.state"
    first.write("web.json", {"service": service("web", proxy_command("run", state))})
    first.start()
    web = first.wait_state("web-proxy", "running")
    first.stop(stop_proxies=False)
    Path(first.data_dir.snapshot_path).write_text('{"Version": 2, "Proxies": {"web-pr')
    second.start()
    adopted = second.wait_state("web-proxy", "running")
    assert adopted.pid == web.pid
    aside = [
        name for name in os.listdir(first.data_dir.proxy_dir) if name.startswith("snapshot.json.corrupt-")
    ]
    assert len(aside) == 1


def test_changed_spec_while_down_replaces_the_adopted_proxy(
    two_agents: tuple[Harness, Harness], tmp_path: Path
) -> None:
    first, second = two_agents
    state = tmp_path / "web.state"
    first.write("web.json", {"service": service("web", proxy_command("run", state))})
    first.start()
    web = first.wait_state("web-proxy", "running")
    first.stop(stop_proxies=False)
    second.write("web.json", {"service": service("web", proxy_command("run", state, "--new"))})
    second.start()
    wait_until(lambda: len(starts(state)) == 2)
    assert web.pid in stopped(state)
    assert starts(state)[1]["argv"][-1] == "--new"


def test_ports_and_tokens_persist_across_restarts(
    two_agents: tuple[Harness, Harness], tmp_path: Path
) -> None:
    first, second = two_agents
    state = tmp_path / "web.state"
    first.write("web.json", {"service": service("web", proxy_command("run", state))})
    first.start()
    first.wait_state("web-proxy", "running")
    planned = first.view.proxies["web-proxy"]
    first.stop(stop_proxies=True)  # proxies stopped too: the next start spawns afresh
    second.start()
    second.wait_state("web-proxy", "running")
    again = second.view.proxies["web-proxy"]
    assert (again.port, again.spec.token) == (planned.port, planned.spec.token)
    low, high = first.base["ports"]["proxy_min_port"], first.base["ports"]["proxy_max_port"]
    assert low <= planned.port <= high
    allocations = Path(first.data_dir.allocations_path)
    assert os.stat(allocations).st_mode & 0o777 == 0o600


def test_a_different_agent_environment_restarts_nothing(tmp_path: Path) -> None:
    # Consul compared the whole environment, so a changed agent env restarted every proxy.
    first = Harness(tmp_path, ambient_env={**os.environ, "AGENT_SETTING": "one"})
    state = tmp_path / "web.state"
    first.write("web.json", {"service": service("web", proxy_command("run", state))})
    second = Harness(
        tmp_path, reuse_config=True, ambient_env={**os.environ, "AGENT_SETTING": "two", "NEW": "x"}
    )
    try:
        first.start()
        web = first.wait_state("web-proxy", "running")
        first.stop(stop_proxies=False)
        second.start()
        adopted = second.wait_state("web-proxy", "running")
        assert adopted.pid == web.pid and adopted.adopted
        time.sleep(0.3)
        assert len(starts(state)) == 1
    finally:
        first.stop(stop_proxies=True)
        second.stop(stop_proxies=True)


def test_the_api_knows_every_proxy_before_it_is_started(tmp_path: Path) -> None:
    """A new proxy asks the agent for its config within milliseconds of its start: the
    published view must already list it (the soak found 63 of 100 proxies told "unknown
    proxy" at start-up, each costing a needless restart)."""
    from supervisor.process.spawn import LaunchSpec, PosixSpawner

    known_at_spawn: dict[str, bool] = {}

    class Observing(PosixSpawner):
        def spawn(self, launch: LaunchSpec, generation: int) -> Any:
            known_at_spawn[launch.proxy_id] = launch.proxy_id in board.current.proxies
            return super().spawn(launch, generation)

    h = Harness(tmp_path)
    names = [f"svc{index}" for index in range(5)]
    h.write(
        "svcs.json", {"services": [service(n, proxy_command("run", tmp_path / f"{n}.state")) for n in names]}
    )
    config = h.load()
    board = ViewBoard(AgentView(config=config, node_id=h.node_id, api_address="127.0.0.1:1"))
    supervisor = Supervisor(
        SupervisorOptions(
            data_dir=h.data_dir,
            node_id=h.node_id,
            api_address="127.0.0.1:1",
            load_config=h.load,
            is_root=False,
            spawner=Observing(),
        ),
        board,
    )
    try:
        supervisor.start(config)
        assert known_at_spawn == {f"{n}-proxy": True for n in names}
    finally:
        supervisor.post(ShutdownRequested(stop_proxies=True, reason="test"))
        supervisor.run()
        supervisor.close()
