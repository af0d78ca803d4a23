"""One agent per data_dir: an flock on ``data_dir/agent.lock``, released by the kernel on exit."""

from __future__ import annotations

import fcntl
import os

from supervisor.errors import AgentLockedError, DataDirError


class AgentLock:
    """Holds the exclusive lock for as long as the object (and its fd) lives.

    The fd is close-on-exec, so proxies never inherit it: a proxy outliving the agent
    must not keep the data_dir locked.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DataDirError(f"cannot open lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder_pid(self.path)
            os.close(fd)
            raise AgentLockedError(self.path, holder) from None
        # The PID inside is for humans and error messages only; the flock is the truth.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def in_place(self) -> bool:
        """Is the locked file still the one at ``path`` (not deleted or replaced)?"""
        if self._fd is None:
            return False
        try:
            held, named = os.fstat(self._fd), os.stat(self.path)
        except OSError:
            return False
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    def reacquire(self) -> None:
        """Lock a new file at ``path`` (the old one was deleted); the old lock is kept
        until the new one is held, so there is never a moment without either."""
        old, self._fd = self._fd, None
        try:
            self.acquire()
        except BaseException:
            self._fd = old
            raise
        if old is not None:
            os.close(old)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def read_holder_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip() or "0") or None
    except (OSError, ValueError):
        return None
