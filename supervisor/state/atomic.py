"""Atomic file replacement: readers see the old file or the new one, never a torn write."""

from __future__ import annotations

import contextlib
import os
import tempfile


def atomic_write(path: str, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename.

    With ``durable`` the file and the directory entry are fsynced, so after a crash (or
    power loss) the file holds either the old or the new content. The temp file is
    created with ``mode`` from the start, so a secret is never briefly world-readable.
    """
    directory = os.path.dirname(path) or "."
    fd, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    if durable:
        fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(directory: str) -> list[str]:
    """Delete ``.tmp-*`` files a crash left behind in ``directory``; return their names."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(".tmp-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed
