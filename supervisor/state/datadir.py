"""The layout of data_dir and the files the supervisor keeps in it.

::

    data_dir/                    0700
      agent.lock                 flock held by the running agent (its PID inside)
      node-id                    this agent's UUID; also the owner in proxy markers
      proxy/                     0700
        snapshot.json            the supervision record (0600, atomic + fsync)
        allocations.json         proxy tokens and auto-assigned ports (0600, secrets)
        logs/<id>-stdout.log     proxy output (0600 in a 0700 dir)
        logs/<id>-stderr.log
        pids/<id>.pid            informational PID files

Consul kept the same ``proxy/`` sub-layout, so operators find logs where they used to.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.errors import DataDirError
from supervisor.process.identity import ProcessIdentity
from supervisor.state.atomic import atomic_write, remove_stale_temp_files
from supervisor.state.lock import AgentLock

log = logging.getLogger("supervisor.datadir")

SNAPSHOT_VERSION = 2
ALLOCATIONS_VERSION = 1
DIR_MODE = 0o700


@dataclass(frozen=True)
class ProxyRecord:
    """What survives an agent restart about one proxy. ``pid`` 0: no process right now."""

    proxy_id: str
    pid: int
    start_ticks: int
    boot_id: str
    spec_hash: str
    generation: int
    restarts: int
    command: tuple[str, ...] = ()
    started_at: float = 0.0  # wall clock, for display only
    failures: int = 0  # quick exits in a row, so backoff continues across agent restarts

    @property
    def identity(self) -> ProcessIdentity | None:
        if self.pid <= 0:
            return None
        return ProcessIdentity(pid=self.pid, start_ticks=self.start_ticks, boot_id=self.boot_id)


@dataclass(frozen=True)
class Allocation:
    """A proxy's token and port, kept so reloads and restarts do not change them."""

    token: str
    port: int
    port_auto: bool


@dataclass(frozen=True)
class LoadResult:
    """Records read from disk, plus a message if the file had to be set aside."""

    records: dict[str, ProxyRecord]
    problem: str | None = None


class DataDir:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.proxy_dir = os.path.join(self.root, "proxy")
        self.logs_dir = os.path.join(self.proxy_dir, "logs")
        self.pids_dir = os.path.join(self.proxy_dir, "pids")
        self.snapshot_path = os.path.join(self.proxy_dir, "snapshot.json")
        self.allocations_path = os.path.join(self.proxy_dir, "allocations.json")
        self.lock_path = os.path.join(self.root, "agent.lock")
        self.node_id_path = os.path.join(self.root, "node-id")

    def prepare(self) -> list[str]:
        """Create the directories (0700) and clear temp files of interrupted writes.

        Returns the names of removed temp files (for a log line).
        """
        try:
            for directory in (self.root, self.proxy_dir, self.logs_dir, self.pids_dir):
                os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
            for directory in (self.root, self.proxy_dir, self.logs_dir, self.pids_dir):
                mode = stat.S_IMODE(os.stat(directory).st_mode)
                if mode & 0o077:  # tokens, the CA key and logs inside: never group/world-readable
                    os.chmod(directory, DIR_MODE)
                    log.warning("%s was mode %04o; tightened it to 0700 (it holds secrets)", directory, mode)
        except OSError as exc:
            raise DataDirError(
                f"cannot create data_dir {exc.filename or self.root}: {exc.strerror}; "
                "check that the agent's user may write there"
            ) from exc
        removed = []
        for directory in (self.root, self.proxy_dir, self.pids_dir):
            removed.extend(remove_stale_temp_files(directory))
        return removed

    def lock(self) -> AgentLock:
        lock = AgentLock(self.lock_path)
        lock.acquire()
        return lock

    def node_id(self) -> str:
        """This data_dir's node ID (created once; Consul keeps one in the same place)."""
        try:
            with open(self.node_id_path) as handle:
                return str(uuid.UUID(handle.read().strip()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            raise DataDirError(
                f"{self.node_id_path} is unreadable or not a UUID; restore it or delete it "
                "(a new ID makes the agent unable to recognise proxies it started before)"
            ) from None
        node_id = str(uuid.uuid4())
        self._write(self.node_id_path, (node_id + "\n").encode())
        return node_id

    def write_node_id(self, node_id: str) -> None:
        """Put the known node ID back (data_dir was deleted under a running agent)."""
        if not os.path.exists(self.node_id_path):
            self._write(self.node_id_path, (node_id + "\n").encode())

    def log_paths(self, proxy_id: str) -> tuple[str, str]:
        return (
            os.path.join(self.logs_dir, f"{proxy_id}-stdout.log"),
            os.path.join(self.logs_dir, f"{proxy_id}-stderr.log"),
        )

    def pid_path(self, proxy_id: str) -> str:
        return os.path.join(self.pids_dir, f"{proxy_id}.pid")

    # -- the supervision record -------------------------------------------------------------

    def load_records(self) -> LoadResult:
        data, problem = self._load_json(self.snapshot_path)
        if data is None:
            return LoadResult({}, problem)
        if data.get("Version") == 1:
            return LoadResult(
                {},
                f"{self.snapshot_path} was written by Consul (version 1, without process start "
                "times); its processes cannot be verified and are not adopted. Stop them by hand "
                f"(PIDs: {_consul_pids(data)}), then remove the file",
            )
        try:
            if data.get("Version") != SNAPSHOT_VERSION:
                raise ValueError(f"unknown version {data.get('Version')!r}")
            records = {
                proxy_id: ProxyRecord(
                    proxy_id=proxy_id,
                    pid=int(entry["Pid"]),
                    start_ticks=int(entry["StartTicks"]),
                    boot_id=str(entry["BootId"]),
                    spec_hash=str(entry["SpecHash"]),
                    generation=int(entry["Generation"]),
                    restarts=int(entry["Restarts"]),
                    command=tuple(str(part) for part in entry.get("Command", ())),
                    started_at=float(entry.get("StartedAt", 0.0)),
                    failures=int(entry.get("Failures", 0)),
                )
                for proxy_id, entry in data["Proxies"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return LoadResult({}, self._set_aside(self.snapshot_path, f"unexpected content ({exc})"))
        return LoadResult(records)

    def save_records(self, records: Mapping[str, ProxyRecord]) -> None:
        document = {
            "Version": SNAPSHOT_VERSION,
            "Proxies": {
                proxy_id: {
                    "Pid": record.pid,
                    "StartTicks": record.start_ticks,
                    "BootId": record.boot_id,
                    "SpecHash": record.spec_hash,
                    "Generation": record.generation,
                    "Restarts": record.restarts,
                    "Command": list(record.command),
                    "StartedAt": record.started_at,
                    "Failures": record.failures,
                }
                for proxy_id, record in sorted(records.items())
            },
        }
        # Compact: written at every start and exit of every proxy (the C encoder is 10x faster).
        self._write(self.snapshot_path, json.dumps(document, separators=(",", ":")).encode())

    # -- tokens and ports -------------------------------------------------------------------

    def load_allocations(self) -> tuple[dict[str, Allocation], str | None]:
        data, problem = self._load_json(self.allocations_path)
        if data is None:
            return {}, problem
        try:
            if data.get("Version") != ALLOCATIONS_VERSION:
                raise ValueError(f"unknown version {data.get('Version')!r}")
            allocations = {
                proxy_id: Allocation(
                    token=str(entry["Token"]),
                    port=int(entry["Port"]),
                    port_auto=bool(entry["PortAuto"]),
                )
                for proxy_id, entry in data["Proxies"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return {}, self._set_aside(self.allocations_path, f"unexpected content ({exc})")
        return allocations, None

    def save_allocations(self, allocations: Mapping[str, Allocation]) -> None:
        document = {
            "Version": ALLOCATIONS_VERSION,
            "Proxies": {
                proxy_id: {"Token": alloc.token, "Port": alloc.port, "PortAuto": alloc.port_auto}
                for proxy_id, alloc in sorted(allocations.items())
            },
        }
        self._write(self.allocations_path, json.dumps(document, separators=(",", ":")).encode())

    # -- PID files -------------------------------------------------------------------------

    def write_pid_file(self, proxy_id: str, pid: int) -> None:
        os.makedirs(self.pids_dir, mode=DIR_MODE, exist_ok=True)
        atomic_write(self.pid_path(proxy_id), str(pid).encode(), mode=0o600, durable=False)

    def remove_pid_file(self, proxy_id: str) -> None:
        try:
            os.unlink(self.pid_path(proxy_id))
        except FileNotFoundError:
            pass

    # -- helpers ----------------------------------------------------------------------------

    def _write(self, path: str, data: bytes) -> None:
        try:
            os.makedirs(os.path.dirname(path), mode=DIR_MODE, exist_ok=True)
            atomic_write(path, data, mode=0o600)
        except OSError as exc:
            raise DataDirError(f"cannot write {path}: {exc.strerror}") from exc

    def _load_json(self, path: str) -> tuple[dict[str, Any] | None, str | None]:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise DataDirError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, self._set_aside(path, f"not valid JSON ({exc})")
        if not isinstance(data, dict):
            return None, self._set_aside(path, "not a JSON object")
        return data, None

    def _set_aside(self, path: str, why: str) -> str:
        """Move a corrupt file out of the way (kept for inspection) and say so."""
        target = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            os.replace(path, target)
        except OSError as exc:
            raise DataDirError(
                f"{path} is corrupt ({why}) and cannot be moved aside: {exc.strerror}"
            ) from exc
        return f"{path} is corrupt: {why}; moved it to {target} and continued without it"


def _consul_pids(data: dict[str, Any]) -> str:
    pids = []
    for entry in (data.get("Proxies") or {}).values():
        try:
            pids.append(str(int(entry["Config"]["Pid"])))
        except (KeyError, TypeError, ValueError):
            continue
    return ", ".join(pids) or "none recorded"
