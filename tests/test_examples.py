"""The shipped examples/ config validates and runs as the README's quick start says."""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from tests.conftest import free_port, free_port_range
from tests.helpers.agent import AgentProcess
from tests.helpers.processes import wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_examples_validate() -> None:
    command = [sys.executable, "-m", "supervisor", "validate", str(EXAMPLES)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Configuration is valid!" in result.stdout


def test_quick_start_runs_and_forwards_traffic(tmp_path: Path) -> None:
    # The examples use fixed, documented ports; tests only use ephemeral ones.
    copy = tmp_path / "repo"
    shutil.copytree(EXAMPLES, copy / "examples")
    app_port, proxy_port = free_port(), free_port()
    low, high = free_port_range(16)
    for path in (copy / "examples").glob("*.hcl"):
        text = path.read_text()
        text = re.sub(r"\bport\s*=\s*8080", f"port = {app_port}", text)
        text = re.sub(r"bind_port\s*=\s*21000", f"bind_port = {proxy_port}", text)
        text = text.replace("proxy_min_port = 21000", f"proxy_min_port = {low}")
        text = text.replace("proxy_max_port = 21255", f"proxy_max_port = {high}")
        path.write_text(text)

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from web\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    app = http.server.ThreadingHTTPServer(("127.0.0.1", app_port), Hello)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    agent = AgentProcess(tmp_path / "agent", data_dir=False, cwd=str(copy))
    agent.config_dir = copy / "examples"
    try:
        agent.start("-dev", "-http-port", str(agent.port))
        agent.wait_state("web-proxy", "running")

        def fetch() -> bytes:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/", timeout=5) as response:
                    return bytes(response.read())
            except OSError:
                return b""

        assert wait_until(fetch, timeout=15) == b"hello from web\n"
        with socket.create_connection(("127.0.0.1", agent.port)):
            pass
    finally:
        agent.kill_everything()
        app.shutdown()
        app.server_close()
