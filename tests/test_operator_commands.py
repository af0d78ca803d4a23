"""Operator commands against a real agent: restart (one, rolling), leave, and -daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, fake_proxy, starts
from tests.helpers.processes import pid_alive, wait_until
from tests.helpers.statefile import read_state

ALLOW_ROOT = {"connect": {"proxy": {"allow_managed_root": True}}}


def service(name: str, command: list[str]) -> dict[str, Any]:
    return {"service": {"name": name, "port": 8080, "connect": {"proxy": {"command": command}}}}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path, extra=ALLOW_ROOT)
    yield process
    process.kill_everything()


def test_restart_one_proxy_by_service_name(agent: AgentProcess, tmp_path: Path) -> None:
    agent.write("web.json", service("web", fake_proxy("run", tmp_path / "web.state")))
    agent.write("db.json", service("db", fake_proxy("run", tmp_path / "db.state")))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    db = agent.wait_state("db-proxy", "running")

    result = agent.cli("restart", "web")
    assert result.returncode == 0, result.stderr
    after = agent.proxies()
    assert after["web-proxy"]["State"] == "running"  # answered only once it is running again
    assert after["web-proxy"]["Pid"] != web["Pid"] and not pid_alive(web["Pid"])
    assert f"running as pid {after['web-proxy']['Pid']}" in result.stdout
    assert after["db-proxy"]["Pid"] == db["Pid"]  # untouched
    # An operator's restart is not a crash: the restart counter stays, the old one stopped cleanly.
    assert after["web-proxy"]["Restarts"] == 0
    assert _stop_time(tmp_path / "web.state", web["Pid"]) > 0

    unknown = agent.cli("restart", "nope")
    assert unknown.returncode == 2 and "no managed proxy for 'nope'" in unknown.stderr
    both = agent.cli("restart", "web", "-all")
    assert both.returncode == 2 and "not both" in both.stderr


def test_rolling_restart_goes_one_at_a_time(agent: AgentProcess, tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    for name in names:
        agent.write(f"{name}.json", service(name, fake_proxy("run", tmp_path / f"{name}.state")))
    agent.start()
    old = {name: agent.wait_state(f"{name}-proxy", "running")["Pid"] for name in names}

    result = agent.cli("restart", "-all", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[3/3] c-proxy" in result.stdout and "Restarted 3 proxies" in result.stdout
    new_starts = [starts(tmp_path / f"{name}.state")[-1] for name in names]
    stops = {name: _stop_time(tmp_path / f"{name}.state", old[name]) for name in names}
    assert all(start["pid"] != old[name] for start, name in zip(new_starts, names, strict=True))
    # Each proxy was stopped only after the previous one's replacement had been running
    # for the startup grace period (1 s): never two proxies down at once.
    for previous, current in zip(names, names[1:], strict=False):
        previous_start = new_starts[names.index(previous)]["time"]
        assert stops[current] >= previous_start + 0.9, (previous, current)


def test_rolling_restart_stops_at_a_proxy_that_does_not_come_back(
    agent: AgentProcess, tmp_path: Path
) -> None:
    broken_flag = tmp_path / "broken"
    agent.write("a.json", service("a", fake_proxy("run", tmp_path / "a.state")))
    agent.write("b.json", service("b", fake_proxy("fail-if", tmp_path / "b.state", str(broken_flag))))
    agent.write("c.json", service("c", fake_proxy("run", tmp_path / "c.state")))
    agent.start()
    pids = {name: agent.wait_state(f"{name}-proxy", "running")["Pid"] for name in "abc"}
    broken_flag.touch()  # "the new version" of b cannot start

    result = agent.cli("restart", "-all", timeout=120)
    assert result.returncode == 1
    assert "rolling restart stopped at b-proxy (2 of 3)" in result.stderr
    assert "exited with code 3" in result.stderr and "not restarted: c-proxy" in result.stderr
    after = agent.proxies()
    assert after["a-proxy"]["Pid"] != pids["a"]
    assert after["c-proxy"]["Pid"] == pids["c"]  # the roll stopped before touching c
    assert after["b-proxy"]["State"] in ("starting", "backoff")

    wait_until(lambda: agent.proxy("b-proxy")["State"] == "backoff", timeout=10)  # type: ignore[index]
    row = next(line for line in agent.cli("proxies").stdout.splitlines() if line.startswith("b-proxy"))
    assert "next attempt at" in row and "exited with code 3" in row


def test_restart_is_refused_for_a_blocked_proxy_as_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root refusal only applies to an agent running as root")
    agent = AgentProcess(tmp_path)  # no allow_managed_root
    agent.write("web.json", service("web", fake_proxy("run", tmp_path / "web.state")))
    try:
        agent.start()
        agent.wait_state("web-proxy", "blocked")
        result = agent.cli("restart", "web-proxy")
        assert result.returncode == 1
        assert "allow_managed_root" in result.stderr
        assert not (tmp_path / "web.state").exists()
    finally:
        agent.kill_everything()


def test_leave_stops_every_proxy_then_the_agent(agent: AgentProcess, tmp_path: Path) -> None:
    for name in ("a", "b"):
        agent.write(f"{name}.json", service(name, fake_proxy("run", tmp_path / f"{name}.state")))
    agent.start()
    pids = [agent.wait_state(f"{name}-proxy", "running")["Pid"] for name in ("a", "b")]
    result = agent.cli("leave")
    assert result.returncode == 0, result.stderr
    assert agent.wait_exit() == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert not list((agent.data_dir / "proxy" / "pids").glob("*"))  # type: ignore[operator]


def _stop_time(statefile: Path, pid: int) -> float:
    for entry in read_state(statefile):
        if entry.get("stopped") == pid:
            return float(entry.get("time", 0.0))
    raise AssertionError(f"{statefile}: pid {pid} did not record a clean stop")


# -- -daemon --------------------------------------------------------------------------------


class Daemon:
    def __init__(self, root: Path) -> None:
        self.agent = AgentProcess(root, extra=ALLOW_ROOT)
        self.pid_file = root / "agent.pid"
        self.log_file = root / "daemon.log"

    def launch(self, *extra: str) -> subprocess.CompletedProcess[str]:
        argv = self.agent.argv("-daemon", "-pid-file", str(self.pid_file), "-log-file", str(self.log_file))
        return subprocess.run(
            [*argv, *extra], capture_output=True, text=True, timeout=60, start_new_session=True
        )

    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def kill(self) -> None:
        try:
            pid = self.pid()
        except (OSError, ValueError):
            pid = 0
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid), timeout=10)
        self.agent.kill_everything()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    instance = Daemon(tmp_path)
    yield instance
    instance.kill()


def test_daemon_detaches_locks_its_pid_file_and_leaves_cleanly(daemon: Daemon, tmp_path: Path) -> None:
    daemon.agent.write("web.json", service("web", fake_proxy("run", tmp_path / "web.state")))
    result = daemon.launch()
    assert result.returncode == 0, result.stderr
    pid = daemon.pid()
    assert f"pid {pid}" in result.stdout
    # Ready when the launcher returned: the API answers and the proxy was started.
    assert daemon.agent.proxies()["web-proxy"]["Pid"]
    # Detached: a new session (left by the second fork, so it can never regain a terminal).
    assert os.getsid(pid) not in (os.getsid(0), pid)
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    assert int(fields[4]) == 0  # tty_nr: no controlling terminal
    assert "agent started" in daemon.log_file.read_text()

    second = daemon.launch()
    assert second.returncode == 1
    assert f"locked by a running agent (pid {pid})" in second.stderr

    leave = daemon.agent.cli("leave")
    assert leave.returncode == 0, leave.stderr
    wait_until(lambda: not pid_alive(pid), timeout=30, message="the daemon to exit")
    assert not daemon.pid_file.exists()


def test_daemon_recovers_a_stale_pid_file(daemon: Daemon) -> None:
    # A pid file left by an agent that was kill -9'ed: nobody holds its lock.
    stale = subprocess.Popen([sys.executable, "-c", "pass"])
    stale.wait()
    daemon.pid_file.write_text(f"{stale.pid}\n")
    result = daemon.launch()
    assert result.returncode == 0, result.stderr
    assert daemon.pid() != stale.pid and pid_alive(daemon.pid())


def test_daemon_start_up_failure_reaches_the_terminal(daemon: Daemon, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", daemon.agent.port))
        taken.listen()
        result = daemon.launch()
    assert result.returncode == 1
    assert str(daemon.agent.port) in result.stderr  # the daemon's own error, not "see the log"
    assert not daemon.pid_file.exists()


def test_daemon_logs_into_data_dir_by_default_and_refuses_dev(daemon: Daemon, tmp_path: Path) -> None:
    dev = subprocess.run(
        daemon.agent.argv("-daemon", "-dev"),
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert dev.returncode == 2 and "-dev" in dev.stderr
    result = subprocess.run(
        daemon.agent.argv("-daemon", "-pid-file", str(daemon.pid_file)),
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert result.returncode == 0, result.stderr
    log = daemon.agent.data_dir / "agent.log"  # type: ignore[operator]
    assert f"log {log}" in result.stdout
    assert "agent started" in log.read_text()


def test_foreground_agent_keeps_a_locked_pid_file(agent: AgentProcess, tmp_path: Path) -> None:
    pid_file = tmp_path / "fg.pid"
    agent.start("-pid-file", str(pid_file))
    assert agent.process is not None
    assert pid_file.read_text().strip() == str(agent.process.pid)
    import fcntl

    with open(pid_file) as handle:
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the agent
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0
    assert not pid_file.exists()
