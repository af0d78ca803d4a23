"""The shipped examples validate and run as the README's quick start says."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, free_port_range
from tests.helpers.agent import AgentProcess
from tests.helpers.processes import wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Hello:
    """A tiny HTTP app on loopback answering with its own name."""

    def __init__(self, name: str, port: int) -> None:
        body = f"hello from {name}\n".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fetch(port: int) -> bytes:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return bytes(response.read())
    except OSError:
        return b""


def copy_with_ports(tmp_path: Path, replacements: dict[str, int]) -> Path:
    """The examples use fixed, documented ports; tests only use ephemeral ones."""
    copy = tmp_path / "repo"
    shutil.copytree(EXAMPLES, copy / "examples")
    for path in (copy / "examples").rglob("*.hcl"):
        text = path.read_text()
        for pattern, port in replacements.items():
            key = pattern.split("\\s")[0]  # the key the pattern starts with (port, bind_port ...)
            text = re.sub(pattern, f"{key} = {port}", text)
        path.write_text(text)
    return copy


@pytest.fixture
def ports() -> Iterator[dict[str, int]]:
    low, high = free_port_range(16)
    yield {
        "db": free_port(),
        "upstream": free_port(),
        "legacy": free_port(),
        "legacy_bind": free_port(),
        "low": low,
        "high": high,
    }


def test_examples_validate() -> None:
    for args in (
        [str(EXAMPLES)],
        [str(EXAMPLES / "agent.hcl"), str(EXAMPLES / "custom-proxy" / "custom.hcl")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "supervisor", "validate", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "Configuration is valid!" in result.stdout


def test_quick_start_mesh(tmp_path: Path, ports: dict[str, int]) -> None:
    copy = copy_with_ports(
        tmp_path,
        {
            r"port\s*=\s*9090": ports["db"],
            r"local_bind_port\s*=\s*9191": ports["upstream"],
            r"proxy_min_port\s*=\s*21000": ports["low"],
            r"proxy_max_port\s*=\s*21255": ports["high"],
        },
    )
    app = Hello("db", ports["db"])
    agent = AgentProcess(tmp_path / "agent", data_dir=False, cwd=str(copy))
    agent.config_dir = copy / "examples"
    try:
        agent.start("-dev", "-http-port", str(agent.port))
        agent.wait_state("web-proxy", "running")
        agent.wait_state("db-proxy", "running")
        # the README's curl: through web's upstream, over mutual TLS, to db's app
        assert wait_until(lambda: fetch(ports["upstream"]), timeout=20) == b"hello from db\n"
        denied = agent.cli("intention", "create", "-deny", "web", "db")
        assert denied.returncode == 0, denied.stderr
        wait_until(lambda: fetch(ports["upstream"]) == b"", timeout=5, message="the deny to take effect")
        agent.cli("intention", "delete", "web", "db")
        assert wait_until(lambda: fetch(ports["upstream"]), timeout=5) == b"hello from db\n"
    finally:
        agent.kill_everything()
        app.close()


def test_custom_proxy_example(tmp_path: Path, ports: dict[str, int]) -> None:
    copy = copy_with_ports(
        tmp_path,
        {
            r"port\s*=\s*9095": ports["legacy"],
            r"bind_port\s*=\s*21095": ports["legacy_bind"],
            r"proxy_min_port\s*=\s*21000": ports["low"],
            r"proxy_max_port\s*=\s*21255": ports["high"],
        },
    )
    app = Hello("legacy", ports["legacy"])
    agent = AgentProcess(tmp_path / "agent", data_dir=False, cwd=str(copy))
    agent.config_dir = copy / "examples" / "custom-proxy"
    try:
        agent.start(
            "-dev", "-http-port", str(agent.port), "-config-file", str(copy / "examples" / "agent.hcl")
        )
        agent.wait_state("legacy-proxy", "running")
        assert wait_until(lambda: fetch(ports["legacy_bind"]), timeout=20) == b"hello from legacy\n"
    finally:
        agent.kill_everything()
        app.close()


def test_the_cluster_example_shows_cross_host_discovery_in_one_command() -> None:
    from tests.helpers.etcd import etcd_binary

    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")
    low = free_port(size=200)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "cluster" / "run.py"), "--check", "--base-port", str(low)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PROXY_SUPERVISOR_ETCD": binary},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "host-a sees db on: ['host-b']" in done.stdout
    assert "hello from db on host-b" in done.stdout
