"""What every benchmark needs: ports that cannot collide, an agent it starts and watches,
and waits that fail fast -- with the agent's last log lines -- when that agent exits.

Ports: an OS-chosen ephemeral port can be taken again a moment later by any outgoing
connection (the soak once found its upstream port held by a client), and random picks
from a range collide with each other. ``Ports`` hands out each port once, from below the
kernel's ephemeral range, after checking nothing listens there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark cannot go on (its agent exited, say); the message says why."""


def ephemeral_range() -> tuple[int, int]:
    try:
        first, last = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(first), int(last)
    except (OSError, ValueError):
        return 32768, 60999


class Ports:
    """Unique ports for one benchmark run, outside the kernel's ephemeral range."""

    def __init__(self, low: int = 10000, seed: int | None = None) -> None:
        first, _last = ephemeral_range()
        self.candidates = list(range(low, first))
        random.Random(seed).shuffle(self.candidates)
        self.given: set[int] = set()

    def take(self) -> int:
        while self.candidates:
            port = self.candidates.pop()
            if port not in self.given and _free(port):
                self.given.add(port)
                return port
        raise BenchError("no free port left below the kernel's ephemeral range")

    def block(self, size: int) -> tuple[int, int]:
        """``size`` consecutive free ports (a proxy port range), none handed out before."""
        first, _last = ephemeral_range()
        for start in range(20000, first - size, size):
            ports = range(start, start + size)
            if not self.given.intersection(ports) and all(_free(port) for port in ports):
                self.given.update(ports)
                self.candidates = [port for port in self.candidates if port not in ports]
                return start, start + size - 1
        raise BenchError(f"no free block of {size} ports below the kernel's ephemeral range")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Agent:
    """An agent process started by a benchmark, on a config dir, logging to a file."""

    def __init__(self, root: Path, config: dict[str, Any], port: int) -> None:
        self.root = root
        self.conf = root / "conf.d"
        self.conf.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = root / "agent.log"
        if os.geteuid() == 0:
            proxy = config.setdefault("connect", {}).setdefault("proxy", {})
            proxy.setdefault("allow_managed_root", True)
        ports = {"dns": -1, **config.get("ports", {}), "http": port}  # (no DNS unless asked for)
        self.write("00-agent.json", {**config, "ports": ports})
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, name: str, document: dict[str, Any]) -> None:
        temp = self.conf / f".{name}.tmp"
        temp.write_text(json.dumps(document))
        os.replace(temp, self.conf / name)

    def start(self) -> float:
        """Start the agent; returns the monotonic time it was started."""
        with open(self.log_path, "ab") as log:
            started = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "agent", "-config-dir", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        return started

    def check(self) -> None:
        """Raise BenchError, with the log's last lines, if the agent has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"the agent exited with code {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def api(self, method: str, path: str, timeout: float = 60.0) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def proxies(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = self.api("GET", "/v1/agent/connect/proxies", timeout=5)
            return data
        except OSError:
            self.check()
            return {}

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.01) -> T:
        return wait_for(predicate, timeout, what, interval, check=self.check)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def leave(self) -> None:
        """Stop every proxy, then the agent (falls back to killing its process group)."""
        try:
            self.api("PUT", "/v1/agent/leave", timeout=120)
        except OSError:
            pass
        self.kill_group()

    def kill_group(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.0005,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll ``predicate``; ``check`` raises if waiting is pointless (the agent is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
