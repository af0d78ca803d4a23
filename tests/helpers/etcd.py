"""A real etcd cluster for tests: Debian's etcd-server binary, members on loopback (or on
addresses inside test network namespaces), data on tmpfs, every process killed at the end.

The binary: ``$PROXY_SUPERVISOR_ETCD``, else ``.cache/etcd/root/usr/bin/etcd`` (where
``.ci/run`` unpacks the Debian package without running its maintainer scripts, so no
system etcd starts), else ``etcd`` on the PATH. Without one, etcd tests skip -- unless
``PROXY_SUPERVISOR_REQUIRE_ETCD=1`` (set by scripts/test when the binary is there), when
they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.ports import free_port
from tests.helpers.processes import TEST_TAG_ENV

REPO = Path(__file__).resolve().parents[2]
ETCD_TAG_ENV = "PROXY_SUPERVISOR_TEST_ETCD"


def etcd_binary() -> str | None:
    candidates = [os.environ.get("PROXY_SUPERVISOR_ETCD", ""), str(REPO / ".cache/etcd/root/usr/bin/etcd")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("etcd")


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    netns: str = ""  # run inside this network namespace
    process: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()

    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """``size`` members; ``hosts``: one address per member (default all on 127.0.0.1,
    each with its own ephemeral ports); ``netns``: one namespace per member, or none."""

    binary: str
    size: int = 3
    hosts: Sequence[str] = ()
    netns: Sequence[str] = ()
    extra: Sequence[str] = ()  # more etcd flags (e.g. a small --quota-backend-bytes)
    tls: tuple[str, str, str] | None = (
        None  # (CA file, server cert, server key): https clients with certificates
    )
    members: list[Member] = field(default_factory=list)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pst-etcd-", dir=_tmpfs())))
    token: str = field(default_factory=lambda: f"pst-{uuid.uuid4().hex[:12]}")

    def __post_init__(self) -> None:
        hosts = list(self.hosts) or ["127.0.0.1"] * self.size
        for number, host in enumerate(hosts, 1):
            inside = bool(self.netns)
            client = 2379 if inside else free_port(host)
            peer = 2380 if inside else free_port(host)
            self.members.append(
                Member(
                    f"m{number}",
                    host,
                    client,
                    peer,
                    self.root / f"m{number}",
                    self.netns[number - 1] if inside else "",
                    extra=tuple(self.extra),
                    scheme="https" if self.tls else "http",
                )
            )

    @property
    def endpoints(self) -> list[str]:
        return [member.client_url for member in self.members]

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        for member in self.members:
            self._spawn(member, "new")
        self.wait_healthy(timeout)
        return self

    def _spawn(self, member: Member, state: str) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        listen_clients = member.client_url
        if member.netns:
            listen_clients += f",http://127.0.0.1:{member.client_port}"
        tls: list[str] = []
        if self.tls is not None:
            ca, cert, key = self.tls
            tls = ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth"]
        argv = [
            self.binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", listen_clients,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", state,
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--pre-vote=true",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "10000",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
            *tls,
            *member.extra,
        ]  # fmt: skip
        if member.netns:
            argv = ["ip", "netns", "exec", member.netns, *argv]
        env = {k: v for k, v in os.environ.items() if k != TEST_TAG_ENV}  # (outlives single tests)
        env[ETCD_TAG_ENV] = self.token
        log = open(self.root / f"{member.name}.log", "ab")
        try:
            member.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            log.close()

    def healthy(self, member: Member) -> bool:
        if self.tls is not None:
            return member.process is not None and member.process.poll() is None and self._tls_health(member)
        if member.netns:
            return member.process is not None and member.process.poll() is None and self._netns_health(member)
        try:
            with urllib.request.urlopen(f"{member.client_url}/health", timeout=2) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _tls_health(self, member: Member) -> bool:
        import ssl

        assert self.tls is not None
        ca, cert, key = self.tls
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
        try:
            with urllib.request.urlopen(
                f"{member.client_url}/health", timeout=2, context=context
            ) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _netns_health(self, member: Member) -> bool:
        probe = (
            "import json,sys,urllib.request;"
            f"r=urllib.request.urlopen('http://127.0.0.1:{member.client_port}/health',timeout=2);"
            "sys.exit(0 if json.load(r).get('health')=='true' else 1)"
        )
        done = subprocess.run(
            ["ip", "netns", "exec", member.netns, "python3", "-c", probe], capture_output=True
        )
        return done.returncode == 0

    def wait_healthy(self, timeout: float = 20.0, members: Sequence[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members if members is not None else self.members)
        while pending:
            pending = [member for member in pending if not self.healthy(member)]
            if not pending:
                return
            for member in pending:
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(f"etcd member {member.name} exited: {self.log_tail(member)}")
            if time.monotonic() > deadline:
                names = ", ".join(member.name for member in pending)
                raise TimeoutError(f"etcd members {names} not healthy: {self.log_tail(pending[0])}")
            time.sleep(0.1)

    def log_tail(self, member: Member, lines: int = 8) -> str:
        try:
            text = (self.root / f"{member.name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def kill(self, member: Member) -> None:
        process = member.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)

    def restart(self, member: Member) -> None:
        self.kill(member)
        self._spawn(member, "existing")

    def stop(self) -> None:
        for member in self.members:
            self.kill(member)
        shutil.rmtree(self.root, ignore_errors=True)


def _tmpfs() -> str | None:
    # fsync on tmpfs is free: elections and lease renewals do not wait on a disk.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def kill_leftover_etcd(token_prefix: str = "pst-") -> None:
    """Members of earlier, crashed runs: they carry ETCD_TAG_ENV and their test session is
    gone (they were handed to init). Another run's live members are left alone."""
    needle = f"{ETCD_TAG_ENV}={token_prefix}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as handle:
                parent = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == 1 and any(item.startswith(needle) for item in environ):
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
