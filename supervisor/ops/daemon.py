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

import os
import select
import time
from dataclasses import dataclass
from types import TracebackType
from typing import IO

import daemon

from supervisor.errors import DaemonError
from supervisor.state.lock import Held, LockedFile

READY = b"READY "
FAILED = b"FAILED "
# How long the launcher waits for the daemon to be ready. Adoption of hundreds of proxies
# takes well under a second; this only bounds a daemon stuck before its first log line.
READY_TIMEOUT = 120.0


class PidFile(LockedFile):
    """``-pid-file``: locked while the daemon lives (a context manager, as python-daemon's
    ``DaemonContext(pidfile=…)`` expects)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode=0o644)

    def check_free(self) -> None:
        """Raise DaemonError if a live agent holds the pid file (checked before forking,
        so the error reaches the operator's terminal)."""
        self.acquire(write=False)
        self.release(remove=False)

    def acquire(self, *, write: bool = True) -> None:
        try:
            self.lock(write_pid=write)
        except Held as held:
            raise DaemonError(
                f"the pid file {self.path} is locked by a running agent (pid {held.holder or 'unknown'}); "
                "stop it first (proxy-supervisor leave, or kill -TERM that pid)"
            ) from None
        except OSError as exc:
            raise DaemonError(f"cannot lock the pid file {self.path}: {exc.strerror}") from None

    def release(self, *, remove: bool = True) -> None:
        self.unlock(remove=remove)

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


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
        working_directory=_working_directory(),
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


def _working_directory() -> str:
    """Where the daemon runs: here, or "/" when here was deleted (no relative path can
    resolve in a vanished directory anyway, and a traceback about it helps no one)."""
    try:
        return os.getcwd()
    except OSError:  # (deleted, or no longer searchable)
        return "/"
