"""Test "hosts": Linux network namespaces on a bridge that lives in a namespace of its own.

Each host namespace has loopback and one veth (``eth0``) on the bridge, with an address in
a /24 picked for the run; nothing has a default route, so nothing can leave the machine,
and the root namespace has no interface on the bridge at all: tests reach the hosts only
through ``ip netns exec``. Every namespace and every process in it is removed at the end
(also when the test fails); namespaces a crashed run left behind are swept by prefix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "pst"  # every namespace of ours: pst<run>-sw, pst<run>-h<N>


def available() -> str | None:
    """None when namespaces can be made here, else why not (the reason to skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no ip command (apt-get install iproute2)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def sweep_leftovers() -> None:
    """Namespaces of earlier runs whose test process is gone (their name carries its PID)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        owner = name[len(PREFIX) :].split("x", 1)[0]
        if owner.isdigit() and os.path.exists(f"/proc/{owner}"):
            continue  # a live run's
        _kill_inside(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _kill_inside(namespace: str) -> None:
    pids = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    ).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Hosts:
    count: int
    names: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: f"{os.getpid()}x{random.randrange(36**3):03x}")
    subnet: str = field(default_factory=lambda: f"10.213.{random.randrange(1, 255)}")

    def __post_init__(self) -> None:
        self.switch = f"{PREFIX}{self.run_id}-sw"
        self.names = [f"{PREFIX}{self.run_id}-h{n}" for n in range(1, self.count + 1)]
        self.addresses = [f"{self.subnet}.{10 + n}" for n in range(1, self.count + 1)]

    def create(self) -> Hosts:
        try:
            self._ip("netns", "add", self.switch)
            self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch, "link", "set", "br0", "up")
            for number, (name, address) in enumerate(zip(self.names, self.addresses, strict=True), 1):
                veth = f"v{self.run_id[-4:]}{number}"  # (interface names: at most 15 characters)
                self._ip("netns", "add", name)
                self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
                self._ip("link", "set", veth, "netns", self.switch)
                self._ip("-n", self.switch, "link", "set", veth, "master", "br0", "up")
                self._ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
                self._ip("-n", name, "link", "set", "eth0", "up")
                self._ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def _veth(self, number: int) -> str:
        return f"v{self.run_id[-4:]}{number}"

    def cut(self, number: int) -> None:
        """Partition host ``number`` (1-based) from the others."""
        self._ip("-n", self.switch, "link", "set", self._veth(number), "down")

    def heal(self, number: int) -> None:
        self._ip("-n", self.switch, "link", "set", self._veth(number), "up")

    def kill_host(self, number: int) -> None:
        """Everything running on host ``number`` dies at once (a power cut)."""
        _kill_inside(self.names[number - 1])

    def destroy(self) -> None:
        for name in [*self.names, self.switch]:
            _kill_inside(name)
        deadline = time.monotonic() + 5
        for name in [*self.names, self.switch]:
            while subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
            ).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def prefix(self, number: int) -> list[str]:
        """The command prefix that runs something on host ``number``."""
        return ["ip", "netns", "exec", self.names[number - 1]]

    def http(
        self, number: int, port: int, method: str, path: str, body: Any = None, timeout: float = 30
    ) -> tuple[int, dict[str, str], Any]:
        """An HTTP request to 127.0.0.1:``port`` on host ``number`` (from inside it)."""
        script = _HTTP_SCRIPT
        argv = [
            *self.prefix(number),
            sys.executable,
            "-c",
            script,
            str(port),
            method,
            path,
            json.dumps(body),
            str(timeout),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, check=False)
        if done.returncode != 0:
            raise OSError(f"request on host {number} failed: {done.stderr.strip()[-400:]}")
        status, headers, payload = json.loads(done.stdout)
        return int(status), dict(headers), payload

    def tcp_exchange(
        self, number: int, port: int, data: bytes, count: int = 1, timeout: float = 10
    ) -> list[str]:
        """Open ``count`` connections to 127.0.0.1:``port`` on host ``number`` one after the
        other; each sends ``data``, half-closes and reads the whole answer."""
        argv = [
            *self.prefix(number),
            sys.executable,
            "-c",
            _TCP_SCRIPT,
            str(port),
            data.decode(),
            str(count),
            str(timeout),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * count + 20, check=False)
        if done.returncode != 0:
            raise OSError(f"connections on host {number} failed: {done.stderr.strip()[-400:]}")
        return list(json.loads(done.stdout))

    def spawn(self, number: int, argv: Sequence[str], log: str) -> subprocess.Popen[bytes]:
        with open(log, "ab") as handle:
            return subprocess.Popen(
                [*self.prefix(number), *argv], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


_HTTP_SCRIPT = """
import json, sys, urllib.error, urllib.request
port, method, path, body, timeout = sys.argv[1:]
data = None if body == "null" else body.encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
try:
    with urllib.request.urlopen(request, timeout=float(timeout)) as response:
        status, headers, raw = response.status, dict(response.headers), response.read()
except urllib.error.HTTPError as exc:
    status, headers, raw = exc.code, dict(exc.headers), exc.read()
try:
    payload = json.loads(raw) if raw else None
except ValueError:
    payload = raw.decode(errors="replace")
print(json.dumps([status, headers, payload]))
"""

_TCP_SCRIPT = """
import json, socket, sys
port, data, count, timeout = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), float(sys.argv[4])
answers = []
for _ in range(count):
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=timeout) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            answers.append(b"".join(chunks).decode(errors="replace"))
    except OSError as exc:
        answers.append(f"error: {exc}")
print(json.dumps(answers))
"""

# An app for a host: answers every connection with its name, then what it was sent.
NAMED_APP = """
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(128)
def serve(conn):
    with conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(name.encode() + b":" + data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
