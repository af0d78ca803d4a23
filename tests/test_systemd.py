"""systemd integration: the shipped unit file, and sd_notify spoken to a real datagram socket."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli.main import build_parser
from supervisor.ops.sdnotify import SdNotifier, watchdog_interval
from tests.helpers.agent import AgentProcess, fake_proxy, starts

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib" / "systemd" / "proxy-supervisor.service"
ALLOW_ROOT = {"connect": {"proxy": {"allow_managed_root": True}}}


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_file_declares_what_operators_rely_on() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["KillMode"] == ["process"]  # restarting the agent keeps the proxies
    assert settings["Restart"] == ["on-failure"]
    assert settings["User"] != ["root"] and settings["User"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["StateDirectory"] == ["proxy-supervisor"]
    assert "WatchdogSec" in settings
    assert "$MAINPID" in settings["ExecReload"][0] and "-HUP" in settings["ExecReload"][0]
    # ExecStart is a command line our own parser accepts, and data_dir is the StateDirectory.
    argv = shlex.split(settings["ExecStart"][0])
    assert argv[0].endswith("/proxy-supervisor")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "agent" and args.data_dir == "/var/lib/proxy-supervisor"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: point it at this checkout's
    # console script instead of /opt/proxy-supervisor, and change nothing else.
    program = Path(sys.executable).parent / "proxy-supervisor"
    assert program.exists(), f"{program} is missing: install the package (pip install -e .)"
    unit = tmp_path / "proxy-supervisor.service"
    unit.write_text(UNIT.read_text().replace("/opt/proxy-supervisor/bin/proxy-supervisor", str(program)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for unknown values: any line it prints about the unit is a defect.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# -- sd_notify ----------------------------------------------------------------------------------


class NotifySocket:
    """The service manager's end: a real unix datagram socket, as systemd binds one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        fields["_received"] = str(time.monotonic())
        self.messages.append(fields)

    def wait_many(
        self, predicate: Any, count: int, timeout: float = 15.0, after: int = 0
    ) -> list[dict[str, str]]:
        """The first ``count`` messages (from index ``after`` on) that satisfy ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [message for message in self.messages[after:] if predicate(message)]
            if len(found) >= count:
                return found[:count]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {count} matching notifications within {timeout}s; got {self.messages}"
                )
            self._receive(min(remaining, 0.5))

    def wait_for(self, predicate: Any, timeout: float = 15.0, after: int = 0) -> dict[str, str]:
        return self.wait_many(predicate, 1, timeout, after)[0]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


def test_agent_notifies_ready_status_reload_watchdog_and_stopping(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="400000")
    agent = AgentProcess(tmp_path, extra=ALLOW_ROOT, env=env)
    state = tmp_path / "web.state"
    agent.write(
        "web.json", {"service": {"name": "web", "connect": {"proxy": {"command": fake_proxy("run", state)}}}}
    )
    try:
        agent.start(wait=False)
        ready = notify_socket.wait_for(lambda m: m.get("READY") == "1")
        # READY=1 means usable: the API answers and the proxy has been started already.
        entry = agent.proxies()["web-proxy"]
        assert entry["Pid"] and entry["State"] in ("starting", "running")
        assert "1 proxy" in ready["STATUS"]
        notify_socket.wait_for(lambda m: m.get("STATUS") == "1 proxy: 1 running")

        # Watchdog pings come from the loop at half of WATCHDOG_USEC, even when idle.
        first = len(notify_socket.messages)
        pings = notify_socket.wait_many(lambda m: m.get("WATCHDOG") == "1", 4, after=first)
        gaps = [float(b["_received"]) - float(a["_received"]) for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 0.4, gaps  # always within WATCHDOG_USEC

        before_reload = len(notify_socket.messages)
        agent.signal(signal.SIGHUP)
        reloading = notify_socket.wait_for(lambda m: m.get("RELOADING") == "1", after=before_reload)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        index = notify_socket.messages.index(reloading)
        notify_socket.wait_for(lambda m: m.get("READY") == "1", after=index + 1)

        before_stop = len(notify_socket.messages)
        agent.signal(signal.SIGTERM)
        notify_socket.wait_for(lambda m: m.get("STOPPING") == "1", after=before_stop)
        assert agent.wait_exit() == 0
        # Proxies inherit the agent's environment, but never its line to systemd.
        (start,) = starts(state)
        assert start["env"]["NOTIFY_SOCKET"] is None and start["env"]["WATCHDOG_USEC"] is None
    finally:
        agent.kill_everything()


def test_status_reports_backoff_and_reload_failures(tmp_path: Path, notify_socket: NotifySocket) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.path)
    agent = AgentProcess(tmp_path, extra=ALLOW_ROOT, env=env)
    command = fake_proxy("exit", tmp_path / "bad.state", "1")
    agent.write("bad.json", {"service": {"name": "bad", "connect": {"proxy": {"command": command}}}})
    try:
        agent.start()
        notify_socket.wait_for(lambda m: "backoff" in m.get("STATUS", ""))
        agent.write("broken.json", "{ not json")
        message = notify_socket.wait_for(lambda m: "last reload failed" in m.get("STATUS", ""))
        assert re.match(r"1 proxy: 1 (backoff|starting)", message["STATUS"])
        assert not any("WATCHDOG" in m for m in notify_socket.messages)  # not asked for
    finally:
        agent.kill_everything()


def test_notifier_abstract_socket_and_watchdog_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"proxy-supervisor-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        monkeypatch.setenv("WATCHDOG_USEC", "10000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        notifier = SdNotifier.from_environment(unset=True)
        assert notifier is not None and notifier.watchdog_interval == 5.0
        assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
        notifier.status("line one\nline two")
        notifier.status("line one\nline two")  # unchanged: not sent again
        notifier.ready()
        receiver.settimeout(5)
        assert receiver.recv(4096) == b"STATUS=line one line two"
        assert receiver.recv(4096) == b"READY=1"
        notifier.close()
    finally:
        receiver.close()
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None  # another pid's
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert SdNotifier.from_environment() is None


def test_a_vanished_notify_socket_does_not_hurt_the_agent(tmp_path: Path) -> None:
    notifier = SdNotifier(str(tmp_path / "gone.sock"), None)
    assert notifier.send(READY=1) is False
    assert notifier.send(STATUS="x") is False
    notifier.close()
