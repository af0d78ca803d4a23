"""Files locked with ``flock`` for the life of a process, with its PID inside.

One mechanism for both: the agent's ``data_dir/agent.lock`` (one agent per data_dir) and
``-pid-file`` (one daemon per pid file). The kernel drops the lock when the process dies,
however it dies, so a file left by a killed process is simply taken over. Descriptors
are close-on-exec: a proxy outliving the agent never keeps a lock alive.
"""

from __future__ import annotations

import errno
import fcntl
import os

from supervisor.config.limits import parse_uint
from supervisor.errors import AgentLockedError, DataDirError


class Held(Exception):
    """Another live process holds the lock (its PID, if the file says)."""

    def __init__(self, holder: int | None) -> None:
        super().__init__(f"held by {holder or 'an unknown process'}")
        self.holder = holder


class LockedFile:
    """Holds the exclusive lock on ``path`` for as long as the object (and its fd) lives."""

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = os.path.abspath(path)
        self.mode = mode
        self._fd: int | None = None

    def lock(self, *, write_pid: bool = True) -> None:
        """Take the lock; raises Held, or OSError when the file cannot be opened."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Held(holder) from None
            raise
        if write_pid:  # for humans and error messages only; the flock is the truth
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
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

    def unlock(self, *, remove: bool = False) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove and self._names(fd):
                os.unlink(self.path)
        finally:
            os.close(fd)  # closing drops the lock

    def _names(self, fd: int) -> bool:
        try:
            held, named = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    @property
    def held(self) -> bool:
        return self._fd is not None


def read_pid(fd: int) -> int | None:
    return parse_uint(os.pread(fd, 64, 0).decode("ascii", "replace").strip(), 10)


class AgentLock(LockedFile):
    """``data_dir/agent.lock``: one agent per data_dir."""

    def acquire(self) -> None:
        try:
            self.lock()
        except Held as held:
            raise AgentLockedError(self.path, held.holder) from None
        except OSError as exc:
            raise DataDirError(f"cannot open lock file {self.path}: {exc.strerror}") from exc

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
        self.unlock()
