"""The real agent process: signals, kill -9 and re-adoption, locking, live config, CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, fake_proxy, starts, wait_for_line
from tests.helpers.processes import pid_alive, wait_until
from tests.helpers.statefile import stopped

ALLOW_ROOT = {"connect": {"proxy": {"allow_managed_root": True}}}


def service(name: str, command: list[str], **proxy: Any) -> dict[str, Any]:
    return {"service": {"name": name, "port": 8080, "connect": {"proxy": {"command": command, **proxy}}}}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path, extra=ALLOW_ROOT)
    yield process
    process.kill_everything()


def test_kill_9_leaves_proxies_running_and_a_new_agent_adopts_them(
    agent: AgentProcess, tmp_path: Path
) -> None:
    web_state, db_state = tmp_path / "web.state", tmp_path / "db.state"
    agent.write("web.json", service("web", fake_proxy("tick", web_state)))
    agent.write("db.json", service("db", fake_proxy("run", db_state)))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    db = agent.wait_state("db-proxy", "running")
    agent.kill9()

    assert pid_alive(web["Pid"]) and pid_alive(db["Pid"])
    # With no agent running, the proxy keeps writing to its log: the fd is its own.
    stdout_log = Path(web["StdoutLog"])
    lines_at_kill = stdout_log.read_text().count("tick")
    wait_until(lambda: stdout_log.read_text().count("tick") >= lines_at_kill + 5, message="ticks while down")

    agent.start()
    adopted = agent.proxies()
    assert adopted["web-proxy"]["Pid"] == web["Pid"] and adopted["db-proxy"]["Pid"] == db["Pid"]
    assert adopted["web-proxy"]["Restarts"] == 0 and adopted["web-proxy"]["Adopted"] is True
    assert len(starts(web_state)) == 1 and len(starts(db_state)) == 1

    # A re-adopted proxy that dies is restarted in milliseconds, not after a 1 s poll.
    killed_at = time.monotonic()
    os.kill(web["Pid"], signal.SIGKILL)
    new = agent.wait_proxy("web-proxy", lambda e: e["Pid"] not in (None, web["Pid"]))
    assert time.monotonic() - killed_at < 2.0
    assert new["Restarts"] == 1 and "status unknown" in new["LastExit"]
    assert "found by record" in agent.current_log()


def test_unrecorded_proxy_is_found_by_its_marker(agent: AgentProcess, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    agent.kill9()
    assert agent.data_dir is not None
    (agent.data_dir / "proxy" / "snapshot.json").unlink()  # as if it died before recording
    agent.start()
    adopted = agent.wait_state("web-proxy", "running")
    assert adopted["Pid"] == web["Pid"]
    assert "started but not recorded" in agent.current_log()
    assert len(starts(state)) == 1


def test_second_agent_on_the_same_data_dir_exits_1_naming_the_holder(agent: AgentProcess) -> None:
    agent.start()
    assert agent.process is not None
    second = agent.cli("agent", "-config-dir", str(agent.config_dir))
    assert second.returncode == 1
    assert f"another agent (PID {agent.process.pid}) is already running" in second.stderr


def test_bad_config_exits_2_with_file_and_key_and_starts_nothing(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, extra=ALLOW_ROOT)
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    agent.write("zz-typo.json", {"service": {"name": "x", "connect": {"proxy": {"comand": ["y"]}}}})
    try:
        result = agent.cli("agent", "-config-dir", str(agent.config_dir))
        assert result.returncode == 2
        assert "zz-typo.json: service.connect.proxy.comand: unknown key" in result.stderr
        assert "Traceback" not in result.stderr
        assert starts(state) == []
        assert agent.data_dir is not None and not agent.data_dir.exists()
    finally:
        agent.kill_everything()


def test_sigterm_leaves_proxies_running_with_a_data_dir(agent: AgentProcess, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0
    assert pid_alive(web["Pid"])
    assert web["Pid"] not in stopped(state)


def test_dev_mode_kills_proxies_on_exit_and_passes_their_output_through(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, data_dir=False, extra=ALLOW_ROOT)
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    try:
        agent.start("-dev")
        web = agent.wait_state("web-proxy", "running")
        assert web["StdoutLog"] is None
        wait_for_line(agent.log_path, f"hello stdout from {web['Pid']}")  # the agent's own terminal
        assert "DEBUG" in agent.current_log() or "[INFO]" in agent.current_log()
        agent.signal(signal.SIGINT)
        assert agent.wait_exit() == 0
        wait_until(lambda: not pid_alive(web["Pid"]))
        assert web["Pid"] in stopped(state)
    finally:
        agent.kill_everything()


def test_drop_ins_are_applied_without_a_signal(agent: AgentProcess, tmp_path: Path) -> None:
    web_state, db_state = tmp_path / "web.state", tmp_path / "db.state"
    agent.start()
    # created by an atomic rename, as editors save
    agent.write("web.json", service("web", fake_proxy("run", web_state)))
    web = agent.wait_state("web-proxy", "running")
    # created and edited in place
    (agent.config_dir / "db.json").write_text(json.dumps(service("db", fake_proxy("run", db_state))))
    db = agent.wait_state("db-proxy", "running")
    agent.write_in_place("db.json", service("db", fake_proxy("run", db_state, "--v2")))
    agent.wait_proxy("db-proxy", lambda e: e["Pid"] not in (None, db["Pid"]) and e["State"] == "running")
    assert starts(db_state)[-1]["argv"][-1] == "--v2"
    # editor leftovers are ignored
    (agent.config_dir / ".web.json.swp").write_text("garbage")
    (agent.config_dir / "web.json~").write_text("garbage")
    (agent.config_dir / "4913").write_text("")
    # deleted
    agent.remove("web.json")
    wait_until(lambda: agent.proxy("web-proxy") is None, message="web-proxy to go away")
    assert web["Pid"] in stopped(web_state)
    assert agent.proxy("db-proxy") is not None


def test_broken_edit_keeps_the_running_config_and_is_reported(agent: AgentProcess, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    agent.write("web.json", '{"service": {"name": "web", "port": "eighty"}}')
    wait_until(lambda: "keeping the running configuration" in agent.current_log())
    assert "web.json: service.port: expected an integer" in agent.current_log()
    self_info = agent.get("/v1/agent/self")
    assert "service.port" in self_info["Stats"]["proxy-supervisor"]["reload_error"]
    result = agent.cli("reload")
    assert result.returncode == 2 and "service.port: expected an integer" in result.stderr
    entry = agent.proxy("web-proxy")
    assert entry is not None and entry["Pid"] == web["Pid"] and entry["State"] == "running"
    # fixing it clears the error
    agent.write("web.json", service("web", fake_proxy("run", state)))
    wait_until(lambda: agent.get("/v1/agent/self")["Stats"]["proxy-supervisor"]["reload_error"] == "")


def test_sighup_and_the_reload_command_reload(agent: AgentProcess, tmp_path: Path) -> None:
    agent.start()
    # Written where the watcher does not look, then moved in with the watcher's own
    # events: to exercise SIGHUP alone, write a file the watcher ignores until renamed.
    state = tmp_path / "a.state"
    assert agent.data_dir is not None
    agent.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded (SIGHUP)" in agent.current_log())
    agent.write("a.json", service("a", fake_proxy("run", state)))
    result = agent.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "Configuration reloaded" in result.stdout
    agent.wait_state("a-proxy", "running")


def test_cli_proxies_table_json_and_logs(agent: AgentProcess, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    agent.write("bad.json", service("bad", fake_proxy("exit", tmp_path / "bad.state", "7")))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    agent.wait_state("bad-proxy", "backoff")

    table = agent.cli("proxies")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:7] == ["PROXY", "SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "PORT"]
    web_row = next(line for line in lines if line.startswith("web-proxy"))
    assert "running" in web_row and str(web["Pid"]) in web_row
    bad_row = next(line for line in lines if line.startswith("bad-proxy"))
    assert "backoff" in bad_row and "next attempt at" in bad_row and "exited with code 7" in bad_row

    as_json = json.loads(agent.cli("proxies", "-json").stdout)
    assert as_json["web-proxy"]["Pid"] == web["Pid"] and as_json["bad-proxy"]["State"] == "backoff"

    wait_until(lambda: "hello stdout" in Path(web["StdoutLog"]).read_text())
    out = agent.cli("logs", "web")
    assert out.returncode == 0 and out.stdout == f"hello stdout from {web['Pid']}\n"
    err = agent.cli("logs", "web-proxy", "-stderr", "-n", "1")
    assert err.stdout == f"hello stderr from {web['Pid']}\n"
    assert agent.data_dir is not None
    offline = agent.cli("logs", "web", "-data-dir", str(agent.data_dir))
    assert offline.stdout == out.stdout
    missing = agent.cli("logs", "nope")
    assert missing.returncode == 2 and "no managed proxy for 'nope'" in missing.stderr


def test_logs_follow_prints_new_output(agent: AgentProcess, tmp_path: Path) -> None:
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    agent.start()
    web = agent.wait_state("web-proxy", "running")
    import subprocess

    env = dict(os.environ, CONSUL_HTTP_ADDR=agent.address)
    follower = subprocess.Popen(
        [agent.python, "-m", "supervisor", "logs", "web", "-f", "-n", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        time.sleep(0.5)  # let it open the file and seek to the end
        with open(web["StdoutLog"], "a") as handle:
            handle.write("appended later\n")
        assert follower.stdout is not None
        assert follower.stdout.readline() == "appended later\n"
    finally:
        follower.kill()
        follower.wait()
        if follower.stdout is not None:
            follower.stdout.close()


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path)
    try:
        down = agent.cli("proxies")
        assert down.returncode == 1 and f"cannot reach the agent at http://{agent.address}" in down.stderr
        usage = agent.cli("proxies", "-bogus")
        assert usage.returncode == 2 and "unrecognized arguments: -bogus" in usage.stderr
        assert agent.cli("version").stdout.startswith("proxy-supervisor ")
        assert agent.cli("--version").returncode == 2
    finally:
        agent.kill_everything()


def test_validate_command(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.json").write_text(
        json.dumps({"data_dir": "/x", "server": True, **service("web", ["/bin/true"])})
    )
    agent = AgentProcess(tmp_path / "agent")
    result = agent.cli("validate", str(good))
    assert result.returncode == 0, result.stderr
    assert "Configuration is valid! 1 service(s), 1 managed proxy." in result.stdout
    assert "note:" in result.stdout and "server: ignored" in result.stdout
    (good / "b.hcl").write_text('service {\n  name = "../x"\n}\n')
    bad = agent.cli("validate", str(good))
    assert bad.returncode == 2
    assert f"{good / 'b.hcl'}: service.name: '../x' cannot be used" in bad.stderr
