"""Watch config drop-ins and tell the supervision loop when one changes.

Directories are watched (not files): editors save by writing a temp file and renaming
it over the original, which replaces the inode a file watch would follow. Events are
only a hint -- the loop debounces them and then re-reads the whole configuration -- so
what matters is never missing a change, and these are the ways one hides:

* the config directory itself is deleted and re-created (or renamed into place): its
  parent directory is watched too, and the watches follow the new directory;
* a Kubernetes ConfigMap volume swaps a ``..data`` symlink to a new timestamped
  directory (names that start with ``..``): such names count as changes;
* a drop-in is a symlink and its *target* is edited: the directory of every
  symlinked drop-in's target is watched as well.

The set of watched directories is worked out again after every change (``WatchPlan``),
on a thread of the watcher's own: watchdog's observer must not be rescheduled from
inside its own event callback.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from supervisor.config.sources import is_config_name
from supervisor.process.spawn import seal_inherited_fds

log = logging.getLogger("supervisor.watch")

_ANY_CONFIG = "*config*"  # in a config dir: any config name, and Kubernetes' ``..`` entries


@dataclass(frozen=True)
class WatchPlan:
    """Which names matter in which directory (absolute paths)."""

    names: dict[str, frozenset[str]] = field(default_factory=dict)

    def wants(self, path: str) -> bool:
        directory, name = os.path.split(os.path.abspath(path))
        wanted = self.names.get(directory)
        if wanted is None:
            return False
        if name in wanted:
            return True
        return _ANY_CONFIG in wanted and (is_config_name(name) or name.startswith(".."))

    @property
    def directories(self) -> list[str]:
        return sorted(self.names)


def plan_watches(config_dirs: Iterable[str], config_files: Iterable[str]) -> WatchPlan:
    names: dict[str, set[str]] = {}

    def want(path: str, name: str) -> None:
        names.setdefault(path, set()).add(name)

    def follow_symlink(path: str) -> None:
        if os.path.islink(path):
            target = os.path.realpath(path)
            want(os.path.dirname(target), os.path.basename(target))

    for directory in (os.path.abspath(d) for d in config_dirs):
        want(directory, _ANY_CONFIG)
        want(os.path.dirname(directory), os.path.basename(directory))  # deleted and re-created
        try:
            entries = os.listdir(directory)
        except OSError:
            continue  # not there (yet): the parent's watch sees it arrive
        for entry in entries:
            if is_config_name(entry):
                follow_symlink(os.path.join(directory, entry))
    for path in (os.path.abspath(f) for f in config_files):
        want(os.path.dirname(path), os.path.basename(path))
        follow_symlink(path)
    return WatchPlan({directory: frozenset(wanted) for directory, wanted in names.items()})


def _inode(directory: str) -> tuple[int, int] | None:
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if os.path.isdir(directory) else None


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: ConfigWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.event_type in ("deleted", "moved"):
            # A watched directory deleted or renamed away takes its watch with it, even if
            # a new one appears at once (with, as likely as not, the same inode number).
            self.watcher.gone(os.fsdecode(event.src_path))
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(raw) if raw else ""
            if path and self.watcher.plan.wants(path):
                self.watcher.changed(path)
                return


class ConfigWatcher:
    """Runs watchdog's observer thread; ``on_change`` is called on that thread."""

    def __init__(
        self, config_dirs: Sequence[str], config_files: Sequence[str], on_change: Callable[[str], None]
    ):
        self.config_dirs = [os.path.abspath(directory) for directory in config_dirs]
        self.config_files = [os.path.abspath(path) for path in config_files]
        self.on_change = on_change
        self.plan = WatchPlan()
        self._observer: Any = None
        # directory -> (its inode, watchdog's ObservedWatch): a directory deleted and made
        # again is a new inode, and the old watch died with the old one
        self._watches: dict[str, tuple[tuple[int, int], Any]] = {}
        self._dead: set[str] = set()  # watched directories seen deleted: watch them anew
        self._replan = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        observer = Observer()
        observer.daemon = True
        self._observer = observer
        self._apply_plan()
        observer.start()
        self._thread = threading.Thread(target=self._follow, name="config-watch", daemon=True)
        self._thread.start()

    def changed(self, path: str) -> None:
        self.on_change(path)
        self._replan.set()

    def gone(self, path: str) -> None:
        if os.path.abspath(path) in self._watches:
            self._dead.add(os.path.abspath(path))
            self._replan.set()

    def _follow(self) -> None:
        while True:
            self._replan.wait()
            if self._stopping.is_set():
                return
            self._replan.clear()
            try:
                self._apply_plan()
            except Exception:  # a watch that cannot be placed must not end the watching
                log.exception("cannot update the watches on the config directories")

    def _apply_plan(self) -> None:
        """Watch what the plan names now. Watches that stay are left alone: tearing one
        down would drop the events it still buffers (watchdog holds a rename back for
        half a second to pair its two halves)."""
        plan = plan_watches(self.config_dirs, self.config_files)
        self.plan = plan
        existing = {directory: inode for directory in plan.directories if (inode := _inode(directory))}
        observer = self._observer
        dead, self._dead = self._dead, set()
        for directory, (inode, watch) in list(self._watches.items()):
            if existing.get(directory) != inode or directory in dead:
                del self._watches[directory]
                try:
                    observer.unschedule(watch)
                except (KeyError, OSError):
                    pass  # its directory is gone, and the watch with it
        added = sorted(set(existing) - set(self._watches))
        handler = _Handler(self)
        for directory in added:
            try:
                self._watches[directory] = (existing[directory], observer.schedule(handler, directory))
            except OSError as exc:
                log.warning("cannot watch %s for config changes: %s", directory, exc)
        if added:
            seal_inherited_fds()  # watchdog's inotify descriptors are inheritable
        for directory in sorted(set(self.config_dirs) - set(existing)):
            log.warning("config directory %s does not exist; its creation is watched for", directory)
        if added and observer.is_alive():
            # Something may have changed in a directory before its watch was in place.
            self.on_change(added[0])

    def stop(self) -> None:
        self._stopping.set()
        self._replan.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
