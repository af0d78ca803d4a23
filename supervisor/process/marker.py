"""The environment marker that lets an agent recognise its own proxies in /proc.

Every proxy is started with ``PROXY_SUPERVISOR_MARKER=v1:<owner>:<spec-hash>:<proxy-id>``
where ``owner`` is the node ID stored in data_dir. Children of a proxy inherit it. After
a crash between spawning a proxy and recording it, the next agent finds the process by
this marker, so it is neither orphaned nor started twice.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from supervisor.process.identity import ProcStat, open_pidfd, read_stat

MARKER_ENV = "PROXY_SUPERVISOR_MARKER"
_VERSION = "v1"
_NEEDLE = MARKER_ENV.encode() + b"="


@dataclass(frozen=True)
class Marker:
    owner: str
    spec_hash: str
    proxy_id: str

    def __str__(self) -> str:
        return f"{_VERSION}:{self.owner}:{self.spec_hash}:{self.proxy_id}"

    @classmethod
    def parse(cls, text: str) -> Marker | None:
        parts = text.split(":", 3)
        if len(parts) != 4 or parts[0] != _VERSION or not all(parts[1:]):
            return None
        return cls(owner=parts[1], spec_hash=parts[2], proxy_id=parts[3])


@dataclass(frozen=True)
class MarkedProcess:
    """A process (a proxy, or a child of one) that carries a marker of ``owner``."""

    pid: int
    marker: Marker
    stat: ProcStat

    @property
    def is_session_leader(self) -> bool:
        """Proxies are started in a new session, so a proxy itself leads its session;
        its children (workers) belong to the proxy's session."""
        return self.stat.session == self.pid


def _pids() -> Iterable[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return (int(name) for name in names if name.isdigit())


def marker_of(pid: int) -> Marker | None:
    """The marker in a process's environment, if it has one (and we may read it)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    if _NEEDLE not in raw:
        return None
    value = ""
    for entry in raw.split(b"\0"):
        if entry.startswith(_NEEDLE):
            value = entry[len(_NEEDLE) :].decode("utf-8", "replace")
            break
    return Marker.parse(value) if value else None


def find_marked(owner: str, skip_sessions: Collection[int] = ()) -> list[MarkedProcess]:
    """Every live process on the host that carries a marker of ``owner``, except those in
    ``skip_sessions`` (the sessions of proxies known to be alive: reading every process's
    environment is the slow part, and a sweep only looks for processes outside them)."""
    found = []
    own_pid = os.getpid()
    for pid in _pids():
        if pid == own_pid:
            continue
        stat = read_stat(pid)
        if stat is None or stat.state in ("Z", "X") or stat.session in skip_sessions:
            continue
        marker = marker_of(pid)
        if marker is None or marker.owner != owner:
            continue
        found.append(MarkedProcess(pid=pid, marker=marker, stat=stat))
    return found


def kill_marked(process: MarkedProcess) -> bool:
    """SIGKILL a marked process, re-checking through a pidfd that it is still the same one."""
    pidfd = open_pidfd(process.pid)
    if pidfd is None:
        return False
    try:
        current = read_stat(process.pid)
        if current is None or current.start_ticks != process.stat.start_ticks:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
