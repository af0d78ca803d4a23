"""Running as root: proxies are refused loudly unless allowed; as nobody they just run.

CI runs as root, so the refusal is real there. The unprivileged case switches to the
nobody user with setpriv (skipped, with the reason, when not root).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess, fake_proxy, starts
from tests.helpers.processes import pid_alive, wait_until
from tests.helpers.unprivileged import Unprivileged

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root refusal needs an agent running as root")


def service(name: str, command: list[str]) -> dict[str, object]:
    return {"service": {"name": name, "port": 8080, "connect": {"proxy": {"command": command}}}}


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return int(line.split()[2])  # effective UID
    raise AssertionError(f"no Uid line for {pid}")


@needs_root
def test_root_agent_refuses_to_start_proxies_and_says_so(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path)  # no allow_managed_root
    state = tmp_path / "web.state"
    agent.write("web.json", service("web", fake_proxy("run", state)))
    try:
        agent.start()
        entry = agent.wait_state("web-proxy", "blocked")
        assert "allow_managed_root" in entry["BlockedReason"] and entry["Pid"] is None
        log = agent.current_log()
        assert "[ERROR]" in log and "connect.proxy.allow_managed_root" in log
        table = agent.cli("proxies").stdout
        row = next(line for line in table.splitlines() if line.startswith("web-proxy"))
        assert "blocked" in row and "running as root" in row
        assert starts(state) == []
        # allowing it (a reload, no restart of the agent) starts the proxy
        agent.write("00-agent.json", {**agent.base, "connect": {"proxy": {"allow_managed_root": True}}})
        running = agent.wait_state("web-proxy", "running")
        assert uid_of(running["Pid"]) == 0
    finally:
        agent.kill_everything()


def test_unprivileged_agent_starts_proxies_as_itself(nobody: Unprivileged) -> None:
    root = nobody.make_dir("agent")
    agent = AgentProcess(
        root, command_prefix=nobody.prefix, python=nobody.python, env=nobody.env(), cwd=nobody.pythonpath
    )
    os.chown(agent.config_dir, nobody.uid, nobody.gid)
    state = root / "web.state"
    helper = os.path.join(nobody.pythonpath, "tests", "helpers", "fakeproxy.py")
    agent.write("web.json", service("web", [nobody.python, helper, "run", str(state)]))
    try:
        agent.start()
        web = agent.wait_state("web-proxy", "running")
        assert uid_of(web["Pid"]) == nobody.uid
        assert "allow_managed_root" not in agent.current_log()
        assert agent.data_dir is not None
        assert (agent.data_dir / "proxy").stat().st_uid == nobody.uid

        # kill -9 and re-adoption work the same for an unprivileged agent
        agent.kill9()
        agent.start()
        adopted = agent.wait_state("web-proxy", "running")
        assert adopted["Pid"] == web["Pid"] and adopted["Restarts"] == 0

        # A root agent on the same data_dir adopts the running proxy but will not
        # start a new one as root when it dies.
        agent.kill9()
        agent.command_prefix = []
        agent.start()
        entry = agent.wait_state("web-proxy", "running")
        assert entry["Pid"] == web["Pid"] and entry["Adopted"]
        os.kill(web["Pid"], signal.SIGKILL)
        blocked = agent.wait_state("web-proxy", "blocked")
        assert blocked["Restarts"] == 0 and blocked["Pid"] is None
        wait_until(lambda: not pid_alive(web["Pid"]))
        assert len(starts(state)) == 1
    finally:
        agent.kill_everything()
        shutil.rmtree(root, ignore_errors=True)
