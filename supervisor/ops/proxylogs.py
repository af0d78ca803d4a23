"""Size-based rotation of the proxies' stdout/stderr files, done by the agent.

A proxy holds its log files open (``O_APPEND``) for its whole life, and a re-adopted proxy
was started by an earlier agent: nobody can make it reopen a file. So rotation is
copy-then-truncate: the file's content is copied to ``<name>.1`` (older copies shift to
``.2`` … ``.N``) and the live file is truncated to zero. Because the proxy appends, its
next write lands at the new end of the file, not at its old offset (no sparse holes).

The one window: bytes written between the copy's final read and the truncate are lost,
as with logrotate's ``copytruncate``. The copy reads to end-of-file twice, back to back,
just before truncating, so the window is the time of one ``ftruncate`` call (microseconds).

Checks run every ``CHECK_INTERVAL`` seconds on a thread of their own (one ``stat`` per file;
copying a large file must not delay the supervision loop). A file can therefore grow past
``max_bytes`` by what its proxy writes in one interval before it is rotated.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger("supervisor.proxylogs")

CHECK_INTERVAL = 5.0
LOG_SUFFIXES = ("-stdout.log", "-stderr.log")
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class RotationPolicy:
    max_bytes: int  # rotate a file once it is larger than this; 0 turns rotation off
    max_files: int  # rotated copies kept (<name>.1 is the newest); 0 keeps none

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0


def rotate(path: str, max_files: int) -> int:
    """Copy ``path`` to ``path.1`` (shifting older copies), then truncate it. Returns the
    number of bytes moved out of the live file. Raises OSError (the live file is untouched
    unless the copy is complete)."""
    for index in range(max_files - 1, 0, -1):
        older = f"{path}.{index}"
        if os.path.exists(older):
            os.replace(older, f"{path}.{index + 1}")
    with open(path, "r+b") as live:
        if max_files <= 0:
            size = os.fstat(live.fileno()).st_size
            live.truncate(0)
            return size
        partial = f"{path}.1.tmp"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as copy:
                copied = _copy_to_end(live, copy)
                copied += _copy_to_end(live, copy)  # what arrived while the bulk was copied
                live.truncate(0)
                copy.flush()
        except BaseException:
            os.unlink(partial)
            raise
    os.replace(partial, f"{path}.1")
    return copied


def _copy_to_end(source: BinaryIO, target: BinaryIO) -> int:
    copied = 0
    while chunk := source.read(_COPY_CHUNK):
        target.write(chunk)
        copied += len(chunk)
    return copied


def rotate_due(logs_dir: str, policy: RotationPolicy) -> list[tuple[str, int]]:
    """Rotate every proxy log in ``logs_dir`` larger than the policy allows."""
    rotated: list[tuple[str, int]] = []
    if not policy.enabled:
        return rotated
    try:
        entries = list(os.scandir(logs_dir))
    except FileNotFoundError:
        return rotated  # nothing written yet (or the directory was removed: spawning re-creates it)
    for entry in entries:
        if not entry.name.endswith(LOG_SUFFIXES):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_size <= policy.max_bytes or entry.is_symlink():
                continue
            rotated.append((entry.path, rotate(entry.path, policy.max_files)))
        except FileNotFoundError:
            continue  # removed while we looked
        except OSError as exc:
            log.error("cannot rotate %s: %s; it keeps growing until this is fixed", entry.path, exc)
    return rotated


class ProxyLogRotator:
    """Rotates proxy logs in the background until ``stop``; ``configure`` on reload."""

    def __init__(self, logs_dir: str, policy: RotationPolicy, interval: float = CHECK_INTERVAL) -> None:
        self.logs_dir = logs_dir
        self.interval = interval
        self._policy = policy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, policy: RotationPolicy) -> None:
        self._policy = policy  # a reference swap: the thread reads it once per pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="proxy-log-rotation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def run_once(self) -> list[tuple[str, int]]:
        rotated = rotate_due(self.logs_dir, self._policy)
        kept = self._policy.max_files
        for path, size in rotated:
            where = f"moved to {os.path.basename(path)}.1" if kept > 0 else "dropped (log_max_files = 0)"
            log.info("rotated %s: %d bytes %s", path, size, where)
        return rotated

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # the rotator must never die silently and leave logs growing
                log.exception("proxy log rotation failed; trying again in %.0fs", self.interval)
