"""Run the real ``proxy-supervisor agent`` as a subprocess, and clean up after it.

The agent runs in its own session with its log in a file. ``kill_everything`` stops
the agent's group and every proxy carrying its marker, whatever state the test left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor.process.marker import find_marked, kill_marked
from tests.conftest import free_port, free_port_range
from tests.helpers.processes import wait_until
from tests.helpers.statefile import fake_proxy, read_state, starts

__all__ = ["AgentProcess", "fake_proxy", "read_state", "starts", "wait_for_line"]


class AgentProcess:
    """One agent on a config dir and data dir; restartable (``start`` again after ``kill``)."""

    def __init__(
        self,
        root: Path,
        *,
        data_dir: bool = True,
        extra: dict[str, Any] | None = None,
        command_prefix: Sequence[str] = (),
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        dns: bool = False,
    ) -> None:
        self.root = root
        self.cwd = cwd
        self.config_dir = root / "conf.d"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data" if data_dir else None
        self.port = free_port()
        # No DNS interface unless the test asks for one: agents of parallel tests would
        # all ask for 8600.
        self.dns_port = free_port() if dns else -1
        low, high = free_port_range(64)
        self.base: dict[str, Any] = {
            "ports": {"http": self.port, "dns": self.dns_port, "proxy_min_port": low, "proxy_max_port": high},
            **(extra or {}),
        }
        if self.data_dir is not None:
            self.base["data_dir"] = str(self.data_dir)
        self.write("00-agent.json", self.base)
        self.command_prefix = list(command_prefix)
        self.python = python
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "agent.log"
        self.runs = 0
        self._node_id: str | None = None  # learnt from the API (dev mode has no node-id file)

    # -- config -------------------------------------------------------------------------

    def write(self, name: str, document: dict[str, Any] | str) -> None:
        """Replace a drop-in atomically (as editors do: temp file, then rename)."""
        path = self.config_dir / name
        temp = self.config_dir / f".{name}.tmp"
        temp.write_text(document if isinstance(document, str) else json.dumps(document))
        os.replace(temp, path)

    def write_in_place(self, name: str, document: dict[str, Any]) -> None:
        with open(self.config_dir / name, "r+") as handle:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(document))

    def remove(self, name: str) -> None:
        (self.config_dir / name).unlink()

    # -- process --------------------------------------------------------------------------

    def argv(self, *extra: str) -> list[str]:
        return [
            *self.command_prefix,
            self.python,
            "-m",
            "supervisor",
            "agent",
            "-config-dir",
            str(self.config_dir),
            *extra,
        ]

    def start(self, *extra: str, wait: bool = True) -> None:
        self.runs += 1
        log = open(self.log_path, "ab")  # handed to the child, closed right after
        log.write(f"--- run {self.runs} ---\n".encode())
        log.flush()
        try:
            self.process = subprocess.Popen(
                self.argv(*extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                cwd=self.cwd,
            )
        finally:
            log.close()
        if wait:
            self.wait_started()

    def wait_started(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log()}")
            return "agent started" in self.log().split(f"--- run {self.runs} ---")[-1]

        wait_until(ready, timeout, message="the agent to start")
        try:
            self._node_id = self.get("/v1/agent/self")["Config"]["NodeID"]
        except (OSError, AssertionError):
            pass  # an agent whose API refuses us (ACLs): fall back to the node-id file

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def current_log(self) -> str:
        return self.log().split(f"--- run {self.runs} ---")[-1]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill9(self) -> None:
        """kill -9 the agent only (its proxies live in their own sessions)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill_everything(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        node_id = self.node_id()
        if node_id:
            for process in find_marked(node_id):
                kill_marked(process)
            # SIGKILL takes effect asynchronously: wait until they are really gone.
            wait_until(lambda: not find_marked(node_id), timeout=10, message="killed proxies to exit")

    def node_id(self) -> str | None:
        if self.data_dir is not None:
            path = self.data_dir / "node-id"
            if path.exists():
                return path.read_text().strip()
        return self._node_id

    # -- API --------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def http(
        self, method: str, path: str, body: Any = None, token: str | None = None, timeout: float = 30.0
    ) -> tuple[int, dict[str, str], Any]:
        data = json.dumps(body).encode() if body is not None else None
        return self.http_raw(method, path, data, token, timeout)

    def http_raw(
        self, method: str, path: str, data: bytes | None, token: str | None = None, timeout: float = 30.0
    ) -> tuple[int, dict[str, str], Any]:
        request = urllib.request.Request(f"http://{self.address}{path}", data=data, method=method)
        if token:
            request.add_header("X-Consul-Token", token)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status, headers = response.status, dict(response.headers)
        except urllib.error.HTTPError as exc:
            raw, status, headers = exc.read(), exc.code, dict(exc.headers)
        try:
            payload = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            payload = raw.decode()
        return status, headers, payload

    def get(self, path: str, token: str | None = None) -> Any:
        status, _, payload = self.http("GET", path, token=token)
        assert status == 200, (status, payload)
        return payload

    def proxies(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/v1/agent/connect/proxies")
        return result

    def proxy(self, proxy_id: str) -> dict[str, Any] | None:
        try:
            return self.proxies().get(proxy_id)
        except (OSError, AssertionError):
            return None

    def wait_proxy(
        self, proxy_id: str, predicate: Any, timeout: float = 10.0, message: str = ""
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            entry = self.proxy(proxy_id)
            return entry if entry is not None and predicate(entry) else None

        found = wait_until(check, timeout, message=message or f"{proxy_id}: now {self.proxy(proxy_id)}")
        assert found is not None
        return found

    def wait_state(self, proxy_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_proxy(proxy_id, lambda e: e["State"] == state, timeout, f"{proxy_id} to be {state}")

    def cli(
        self, *args: str, timeout: float = 60.0, input_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ if self.env is None else self.env)
        env["CONSUL_HTTP_ADDR"] = self.address
        env.update(input_env or {})
        return subprocess.run(
            [self.python, "-m", "supervisor", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            start_new_session=True,
            cwd=self.cwd,
        )


def wait_for_line(path: Path, needle: str, timeout: float = 10.0) -> str:
    def found() -> str:
        text = path.read_text() if path.exists() else ""
        return text if needle in text else ""

    return wait_until(found, timeout, message=needle)
