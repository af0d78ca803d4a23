"""Noticing that data_dir was deleted (or gutted) under a running agent, and rebuilding it.

An operator's ``rm -rf`` of data_dir while the agent runs would otherwise be silent and
dangerous: the lock file is gone (a second agent could start on the same directory),
the tokens of running proxies are gone (the next agent would hand out new ones), and so
is the record the next agent adopts from. The agent still holds all of it in memory, so
it puts it back: directories, node-id, a fresh lock, and (through its owners) the
allocations, the record, pid files, the CA and the stores.

Detection is event-driven: ``DataDirWatcher`` watches data_dir and data_dir/proxy
(non-recursively) and only reports removals and renames; the loop then asks the guard.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from supervisor.errors import AgentLockedError, DataDirError
from supervisor.process.spawn import seal_inherited_fds
from supervisor.state.datadir import Allocation, DataDir
from supervisor.state.lock import AgentLock

log = logging.getLogger("supervisor.guard")


class Repair(enum.Enum):
    INTACT = "nothing was missing"
    RESTORED = "data_dir was rebuilt"
    RETRY = "rebuilding failed for now (disk full?); try again later"
    TAKEN_OVER = "another agent holds data_dir now"


class DataDirGuard:
    def __init__(self, data_dir: DataDir, lock: AgentLock, node_id: str) -> None:
        self.data_dir = data_dir
        self.lock = lock
        self.node_id = node_id
        self._unfinished = False  # a repair failed halfway (disk full): finish it next time

    def missing(self) -> list[str]:
        """What is gone from data_dir (empty when all is in place)."""
        gone = []
        if not self.lock.in_place():
            gone.append("agent.lock")
        if not os.path.exists(self.data_dir.node_id_path):
            gone.append("node-id")
        directories = (self.data_dir.proxy_dir, self.data_dir.logs_dir, self.data_dir.pids_dir)
        gone.extend(
            os.path.relpath(directory, self.data_dir.root) + "/"
            for directory in directories
            if not os.path.isdir(directory)
        )
        return gone

    def repair(self, allocations: Mapping[str, Allocation], running: Mapping[str, int]) -> Repair:
        """If anything is missing, rebuild it: directories, node-id, the lock, the proxies'
        tokens and ports (``allocations``) and pid files (``running``: proxy ID -> PID).
        The caller rewrites the record and has the control plane save its stores."""
        gone = self.missing()
        if not gone and not self._unfinished:
            return Repair.INTACT
        self._unfinished = True
        log.error(
            "data_dir %s was damaged while the agent runs (missing: %s); re-creating it from what "
            "the agent holds in memory",
            self.data_dir.root,
            ", ".join(gone) or "files not yet rewritten",
        )
        try:
            self.restore()
        except AgentLockedError as exc:
            log.error("%s; this agent stops and leaves its proxies running for that agent", exc)
            return Repair.TAKEN_OVER
        except DataDirError as exc:
            log.error("cannot re-create data_dir: %s; trying again shortly", exc)
            return Repair.RETRY
        try:
            self.data_dir.save_allocations(allocations)
            for proxy_id, pid in running.items():
                self.data_dir.write_pid_file(proxy_id, pid)
        except (DataDirError, OSError) as exc:
            log.error("cannot restore proxy tokens and pid files: %s; trying again shortly", exc)
            return Repair.RETRY
        self._unfinished = False
        if "proxy/logs/" in gone and running:
            log.warning(
                "the proxy logs directory was removed: running proxies keep writing into the removed "
                "files; `proxy-supervisor restart -all` gives them new log files"
            )
        return Repair.RESTORED

    def restore(self) -> None:
        """Re-create the directories, node-id and lock. Raises DataDirError (cannot write)
        or AgentLockedError (another agent took data_dir over in the meantime)."""
        self.data_dir.prepare()
        self.data_dir.write_node_id(self.node_id)
        if not self.lock.in_place():
            self.lock.reacquire()


class _RemovalHandler(FileSystemEventHandler):
    def __init__(self, on_removal: Callable[[str], None]) -> None:
        self.on_removal = on_removal

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("deleted", "moved"):
            return
        path = os.fsdecode(event.src_path)
        if not os.path.basename(path).startswith(".tmp-"):  # our own atomic writes
            self.on_removal(path)


class DataDirWatcher:
    """Reports removals in data_dir and data_dir/proxy on watchdog's observer thread."""

    def __init__(self, data_dir: DataDir, on_removal: Callable[[str], None]) -> None:
        self.data_dir = data_dir
        self.on_removal = on_removal
        self._observer: Any = None

    def start(self) -> None:
        observer = Observer()
        handler = _RemovalHandler(self.on_removal)
        for directory in (self.data_dir.root, self.data_dir.proxy_dir):
            if os.path.isdir(directory):
                observer.schedule(handler, directory, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        seal_inherited_fds()  # watchdog's inotify descriptors are inheritable

    def restart(self) -> None:
        """Watch the re-created directories (a watch dies with the directory it watched)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
