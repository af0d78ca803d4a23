"""Watch config drop-ins and tell the supervision loop when one changes.

Directories are watched (not files): editors save by writing a temp file and renaming
it over the original, which replaces the inode a file watch would follow. Events are
only a hint -- the loop debounces them and then re-reads the whole configuration -- so
this module just filters out names that can never be config (swap files, backups).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from supervisor.config.sources import is_config_name

log = logging.getLogger("supervisor.watch")


class _Handler(FileSystemEventHandler):
    def __init__(self, wanted: Callable[[str], bool], on_change: Callable[[str], None]) -> None:
        self.wanted = wanted
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(raw) if raw else ""
            if path and self.wanted(path):
                self.on_change(path)
                return


class ConfigWatcher:
    """Runs watchdog's observer thread; ``on_change`` is called on that thread."""

    def __init__(
        self, config_dirs: Sequence[str], config_files: Sequence[str], on_change: Callable[[str], None]
    ):
        self.config_dirs = [os.path.abspath(directory) for directory in config_dirs]
        self.config_files = {os.path.abspath(path) for path in config_files}
        self.on_change = on_change
        self._observer: Any = None

    def _wanted(self, path: str) -> bool:
        path = os.path.abspath(path)
        if path in self.config_files:
            return True
        return os.path.dirname(path) in self.config_dirs and is_config_name(os.path.basename(path))

    def start(self) -> None:
        observer = Observer()
        handler = _Handler(self._wanted, self.on_change)
        watched = set(self.config_dirs) | {os.path.dirname(path) for path in self.config_files}
        for directory in sorted(watched):
            if os.path.isdir(directory):
                observer.schedule(handler, directory, recursive=False)
            else:
                log.warning("cannot watch %s for config changes: not a directory", directory)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
