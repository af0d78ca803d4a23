"""The trust boundary between the agent and its proxies (issue 9), tested for real as
root (CI) and as an unprivileged agent holding only CAP_SETUID, CAP_SETGID and CAP_KILL,
as the shipped systemd unit grants them; and proxies that die with a ``-dev`` agent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.helpers.processes import pid_alive, wait_until
from tests.helpers.statefile import read_state
from tests.helpers.unprivileged import Unprivileged

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root here")
ZERO_CAPS = "0000000000000000"
DAEMON_UID = 1  # Debian's "daemon" user: a second unprivileged user to run proxies as


def unit_capabilities() -> list[str]:
    """What contrib/systemd's unit grants the agent (so this test and the unit agree)."""
    unit = Path(__file__).parent.parent / "contrib" / "systemd" / "proxy-supervisor.service"
    granted = [
        line.split("=", 1)[1].split()
        for line in unit.read_text().splitlines()
        if line.startswith("AmbientCapabilities=")
    ]
    bounding = [
        line.split("=", 1)[1].split()
        for line in unit.read_text().splitlines()
        if line.startswith("CapabilityBoundingSet=")
    ]
    assert granted and granted == bounding, (granted, bounding)
    return granted[0]


def staged_fakeproxy(nobody: Unprivileged) -> str:
    return str(Path(nobody.pythonpath) / "tests" / "helpers" / "fakeproxy.py")


def owned_dir(nobody: Unprivileged, name: str, uid: int) -> Path:
    path = nobody.make_dir(name)
    os.chown(path, uid, uid)
    return path


def service(name: str, command: list[str], **proxy: Any) -> dict[str, Any]:
    return {"service": {"name": name, "port": 1, "connect": {"proxy": {"command": command, **proxy}}}}


def inspected(state: Path) -> dict[str, Any]:
    entry = wait_until(lambda: next((e for e in read_state(state) if "readable" in e), None), timeout=20)
    assert entry is not None
    return entry


@pytest.fixture
def made() -> Iterator[list[Path]]:
    paths: list[Path] = []
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_a_root_agent_runs_proxies_as_their_own_user_without_allow_managed_root(
    nobody: Unprivileged, tmp_path: Path, made: list[Path]
) -> None:
    work = owned_dir(nobody, "sep", 65534)
    made.append(work)
    state = work / "web.state"
    agent = AgentProcess(
        tmp_path,
        extra={"connect": {"proxy": {"user": "nobody"}}},
        python=nobody.python,
        env=nobody.env(),
        cwd=nobody.pythonpath,
    )
    data = tmp_path / "data"
    secrets = [str(data / "connect" / "ca.json"), str(data / "proxy" / "allocations.json")]
    command = [nobody.python, staged_fakeproxy(nobody), "inspect", str(state), *secrets]
    agent.write("web.json", service("web", command))
    try:
        agent.start()
        entry = agent.wait_state("web-proxy", "running", timeout=20)
        seen = inspected(state)
        assert seen["readable"] == dict.fromkeys(secrets, False)  # the CA key and the tokens stay the agent's
        status = seen["status"]
        assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split()[0] == "65534"
        assert all(status[name] == ZERO_CAPS for name in ("CapInh", "CapPrm", "CapEff", "CapAmb"))
        assert status["NoNewPrivs"] == "1"
        assert sorted(seen["fds"]) == ["0", "1", "2"], seen["fds"]  # stdin and its two logs: nothing else
        # it was in the record before it ran: a killed agent's successor adopts it
        record = json.loads((data / "proxy" / "snapshot.json").read_text())["Proxies"]["web-proxy"]
        assert record["Pid"] == entry["Pid"]
        agent.kill9()
        agent.start()
        adopted = agent.wait_state("web-proxy", "running")
        assert adopted["Pid"] == entry["Pid"] and adopted["Adopted"]
        assert "run as the agent's own user" not in agent.current_log()
    finally:
        agent.kill_everything()


@needs_root
def test_an_unprivileged_agent_with_three_capabilities_separates_its_proxies(
    nobody: Unprivileged, made: list[Path]
) -> None:
    """What contrib/systemd's unit does: User=proxy-supervisor, AmbientCapabilities=
    CAP_SETUID CAP_SETGID CAP_KILL; the proxies run as another user, with nothing."""
    root = owned_dir(nobody, "caps", 65534)
    work = owned_dir(nobody, "caps-work", DAEMON_UID)
    made += [root, work]
    state = work / "web.state"
    caps = ",".join(f"+{name.lower().removeprefix('cap_')}" for name in unit_capabilities())
    assert caps == "+setuid,+setgid,+kill"
    prefix = [
        "setpriv",
        f"--reuid={nobody.uid}",
        f"--regid={nobody.gid}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--",
    ]
    agent = AgentProcess(
        root,
        extra={"connect": {"proxy": {"user": "daemon"}}},
        command_prefix=prefix,
        python=nobody.python,
        env=nobody.env(),
        cwd=nobody.pythonpath,
    )
    os.chown(agent.config_dir, nobody.uid, nobody.gid)
    data = root / "data"
    secrets = [str(data / "connect" / "ca.json"), str(data / "proxy" / "allocations.json")]
    command = [nobody.python, staged_fakeproxy(nobody), "inspect", str(state), *secrets]
    agent.write("web.json", service("web", command))
    try:
        agent.start()
        first = agent.wait_state("web-proxy", "running", timeout=20)
        seen = inspected(state)
        assert seen["readable"] == dict.fromkeys(secrets, False)
        assert seen["status"]["Uid"].split()[0] == str(DAEMON_UID)
        assert all(seen["status"][name] == ZERO_CAPS for name in ("CapInh", "CapPrm", "CapEff", "CapAmb"))
        # a crash is restarted; an operator's leave stops it (SIGINT to another user: CAP_KILL)
        os.kill(first["Pid"], signal.SIGKILL)
        second = agent.wait_proxy("web-proxy", lambda e: e["Pid"] not in (None, first["Pid"]), timeout=20)
        assert agent.cli("leave").returncode == 0
        wait_until(lambda: not pid_alive(second["Pid"]), timeout=15, message="the proxy to stop")
    finally:
        agent.kill_everything()


@needs_root
def test_the_builtin_proxy_keeps_its_token_out_of_reach_of_its_user(
    nobody: Unprivileged, tmp_path: Path
) -> None:
    agent = AgentProcess(
        tmp_path,
        extra={"connect": {"proxy": {"user": "nobody"}}, "bind_addr": "127.0.0.1"},
        python=nobody.python,
        env=nobody.env(),
        cwd=nobody.pythonpath,
    )
    agent.write("web.json", {"service": {"name": "web", "port": 1, "connect": {"proxy": {}}}})
    try:
        agent.start()
        wait_until(
            lambda: agent.get("/v1/health/connect/web?passing"),
            timeout=30,
            message="the built-in proxy to serve",
        )
        pid = agent.proxies()["web-proxy"]["Pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes()  # as root
        assert b"CONNECT_PROXY_TOKEN" not in environ and b"CONNECT_PROXY_ID=web-proxy" in environ
        peeking = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat", f"/proc/{pid}/environ"],
            capture_output=True,
            timeout=10,
        )
        assert peeking.returncode != 0  # another process of its user may not read it (non-dumpable)
    finally:
        agent.kill_everything()


@needs_root
def test_an_unknown_proxy_user_blocks_with_the_reason(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, extra={"connect": {"proxy": {"user": "no-such-user-here"}}})
    agent.write("web.json", service("web", ["/bin/sleep", "60"]))
    try:
        agent.start()
        entry = agent.wait_state("web-proxy", "blocked")
        assert "no user 'no-such-user-here'" in entry["BlockedReason"]
    finally:
        agent.kill_everything()


def test_a_dev_agent_takes_its_proxies_with_it_however_it_dies(tmp_path: Path) -> None:
    """Regression (issue 9): ``kill -9`` of a -dev agent left every proxy running forever."""
    state = tmp_path / "custom.state"
    agent = AgentProcess(
        tmp_path,
        data_dir=False,
        extra={"connect": {"proxy": {"allow_managed_root": True}}, "bind_addr": "127.0.0.1"},
    )
    from tests.helpers.statefile import fake_proxy

    agent.write("custom.json", service("custom", fake_proxy("run", state)))
    agent.write("web.json", {"service": {"name": "web", "port": 1, "connect": {"proxy": {}}}})
    try:
        agent.start("-dev")
        pids = [
            agent.wait_state(proxy, "running", timeout=20)["Pid"] for proxy in ("custom-proxy", "web-proxy")
        ]
        agent.kill9()
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=10, message="the proxies to die")
    finally:
        agent.kill_everything()
