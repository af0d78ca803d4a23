"""``agent -daemon``: detach into the background on hosts without systemd.

The launching process does not exit as soon as it has forked: it waits until the
daemon says it is ready (config loaded, data_dir locked, API bound, proxies adopted) or
has failed, through a pipe, so that ``proxy-supervisor agent -daemon`` exits 0 only for
an agent that is actually up, and prints the daemon's start-up error otherwise, like
``systemctl start`` does for a ``Type=notify`` unit.

The pid file is ``flock``-ed by the daemon for its whole life: a pid file whose lock is
free is stale (its agent died, maybe with ``kill -9``) and is taken over; a locked one
belongs to a running agent, whose PID is in the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import time
from dataclasses import dataclass
from types import TracebackType
from typing import IO

import daemon

from supervisor.config.limits import parse_uint
from supervisor.errors import DaemonError

READY = b"READY "
FAILED = b"FAILED "
# How long the launcher waits for the daemon to be ready. Adoption of hundreds of proxies
# takes well under a second; this only bounds a daemon stuck before its first log line.
READY_TIMEOUT = 120.0


class PidFile:
    """A pid file locked with ``flock`` while its process lives (a context manager, as
    python-daemon's ``DaemonContext(pidfile=…)`` expects)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fd: int | None = None
        self.stale_pid: int | None = None

    def check_free(self) -> None:
        """Raise DaemonError if a live agent holds the pid file (checked before forking,
        so the error reaches the operator's terminal)."""
        self.acquire(write=False)
        self.release(remove=False)

    def acquire(self, *, write: bool = True) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DaemonError(f"cannot open the pid file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DaemonError(
                    f"the pid file {self.path} is locked by a running agent (pid {holder or 'unknown'}); "
                    "stop it first (proxy-supervisor leave, or kill -TERM that pid)"
                ) from None
            raise DaemonError(f"cannot lock the pid file {self.path}: {exc.strerror}") from None
        self._fd = fd
        self.stale_pid = _read_pid(fd)
        if write:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)

    def release(self, *, remove: bool = True) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove and _same_file(fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(fd)  # closing drops the lock

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return parse_uint(text, 10)


def _same_file(fd: int, path: str) -> bool:
    try:
        held, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


@dataclass
class Readiness:
    """The daemon's end of the pipe to the launcher: one line, then closed."""

    fd: int | None

    def ready(self) -> None:
        self._send(READY + str(os.getpid()).encode() + b"\n")

    def failed(self, message: str) -> None:
        self._send(FAILED + message.encode("utf-8", "replace") + b"\n")

    def _send(self, line: bytes) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.write(fd, line)
        except OSError:
            pass  # the launcher was killed: nobody is waiting
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Launched:
    """Returned in the launching process once the daemon is ready."""

    pid: int


def daemonize(
    pid_file: PidFile | None, output: IO[str], ready_timeout: float = READY_TIMEOUT
) -> Launched | Readiness:
    """Fork the daemon. In the launcher this waits and returns ``Launched`` (or raises
    DaemonError with the daemon's start-up error); in the daemon it returns ``Readiness``,
    which the agent signals once it is up. ``output`` becomes the daemon's stdout and
    stderr (the agent's log file), so even a crash before logging is set up is recorded.

    Call before any thread is started: only the forking thread survives a fork.
    """
    if pid_file is not None:
        pid_file.check_free()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    launcher_child = os.fork()
    if launcher_child:
        os.close(write_fd)
        try:
            return _wait_for_daemon(read_fd, launcher_child, ready_timeout)
        finally:
            os.close(read_fd)
    os.close(read_fd)
    context = daemon.DaemonContext(
        detach_process=True,
        # Relative paths in the config (data_dir, drop-in dirs) keep meaning what they meant.
        working_directory=os.getcwd(),
        umask=0o027,
        files_preserve=[write_fd, output],
        stdout=output,
        stderr=output,
        pidfile=pid_file,
        # The agent installs its own SIGTERM/SIGHUP/SIGINT handlers; keep python-daemon's
        # default of terminating on SIGTERM until then.
    )
    try:
        context.open()
    except BaseException as exc:  # noqa: BLE001 - this process must not return into the CLI
        Readiness(write_fd).failed(str(exc) or type(exc).__name__)
        os._exit(1)
    return Readiness(write_fd)


def _wait_for_daemon(read_fd: int, child: int, timeout: float) -> Launched:
    deadline = time.monotonic() + timeout
    received = b""
    while b"\n" not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DaemonError(f"the agent did not report ready within {timeout:.0f}s; see its log file")
        readable, _, _ = select.select([read_fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        received += chunk
    os.waitpid(child, 0)  # the intermediate process exits as soon as the daemon is detached
    if received.startswith(READY):
        return Launched(int(received[len(READY) :].strip() or 0))
    if received.startswith(FAILED):
        raise DaemonError(received[len(FAILED) :].decode("utf-8", "replace").strip())
    raise DaemonError("the agent exited during start-up; see its log file for why")
