"""Starting proxy processes.

A proxy is started with ``posix_spawn`` in a new session (so signals to the agent's
terminal or process group never reach it), with stdin from /dev/null and stdout/stderr opened O_APPEND on
its log files and handed to it directly: its output keeps flowing while the agent is
down and after it re-adopts the process. No ``preexec_fn`` (unsafe in a threaded
program); the working directory is the agent's.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from supervisor.errors import SpawnError
from supervisor.process.handle import ProcessHandle
from supervisor.process.identity import ProcessIdentity, boot_id, open_pidfd, read_stat
from supervisor.process.privileges import RunAs

LOG_FILE_MODE = 0o600
LOG_DIR_MODE = 0o700


EXECWRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "execwrap.py")
SECRET_FD = 3  # where a proxy finds the secret handed to it (the built-in proxy's token)
HOLD_FD = 4  # where the exec wrapper waits for the agent's go-ahead


@dataclass(frozen=True)
class Wrapping:
    """What the exec wrapper (``execwrap.py``) does before the proxy's own program runs.

    Wrapping also drops every capability and sets no_new_privs, unless the proxy is one
    allowed to run as root (``keep_privileges``)."""

    run_as: RunAs | None = None  # switch to this user and its groups
    die_with_agent: bool = False  # -dev: killed by the kernel when the agent dies
    hold: bool = False  # start only once the agent has recorded the process
    keep_privileges: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one proxy process."""

    proxy_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    stdout_path: str | None = None  # None: inherit the agent's stdout (dev mode)
    stderr_path: str | None = None
    wrapping: Wrapping | None = None  # None: exec the program directly
    secret: bytes | None = None  # delivered on a pipe at SECRET_FD, never in the environment


class Spawner(Protocol):
    """Starts processes; the real one uses subprocess, tests may inject failures."""

    def spawn(self, launch: LaunchSpec, generation: int) -> ProcessHandle: ...


def open_log(path: str) -> int:
    """Open a proxy log for appending (0600 in a 0700 directory), creating what is missing."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=LOG_DIR_MODE, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != LOG_FILE_MODE:
            os.fchmod(fd, LOG_FILE_MODE)  # an older file with looser permissions
    except OSError:
        os.close(fd)
        raise
    return fd


def resolve_program(program: str, env: Mapping[str, str]) -> str:
    """Find ``program`` the way a shell would: names without a slash are looked up on the
    PATH the proxy will get (Consul resolved them against the agent's working directory)."""
    if "/" in program:
        return program
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise SpawnError(f"command {program!r} was not found on PATH ({env.get('PATH', os.defpath)})")
    return found


def seal_inherited_fds() -> None:
    """Mark every descriptor above stderr close-on-exec, so a proxy gets only the ones it
    is handed. Python opens everything close-on-exec, but libraries need not: watchdog's
    inotify descriptors are inheritable, and every proxy used to hold a copy. Called
    where such descriptors appear (a watch placed) and when supervision starts, not per
    spawn: listing /proc/self/fd of an agent with hundreds of proxies costs milliseconds."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd <= 2:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # the listing's own descriptor, or one closed meanwhile


def wrapped_argv(program: str, argv: list[str], wrapping: Wrapping, hold_fd: int | None) -> list[str]:
    """The exec wrapper's command line around ``program argv[1:]``."""
    options: list[str] = []
    if wrapping.die_with_agent:
        options += ["--pdeathsig", "SIGKILL", "--parent", str(os.getpid())]
    if hold_fd is not None:
        options += ["--hold", str(hold_fd)]
    if wrapping.keep_privileges:
        options += ["--keep-privileges", "yes"]
    if wrapping.run_as is not None:
        run_as = wrapping.run_as
        groups = ",".join(str(group) for group in run_as.groups)
        options += ["--gid", str(run_as.gid), "--groups", groups, "--uid", str(run_as.uid)]
    return [sys.executable, "-I", "-S", EXECWRAP, *options, "--", program, *argv[1:]]


def _high_pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose ends are above the fds a proxy is handed (0-4)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        return fcntl.fcntl(read_end, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(
            write_end, fcntl.F_DUPFD_CLOEXEC, 10
        )
    finally:
        os.close(read_end)
        os.close(write_end)


class PosixSpawner:
    """The real spawner (``posix_spawn``: no fork of the whole agent, no ``preexec_fn``)."""

    def spawn(self, launch: LaunchSpec, generation: int) -> ProcessHandle:
        argv = list(launch.argv)
        program = resolve_program(argv[0], launch.env)
        if launch.wrapping is not None and not os.access(program, os.X_OK):
            raise SpawnError(f"command {program!r} does not exist or is not executable")
        opened: list[int] = []  # ours to close once the child has its copies
        hold_write: int | None = None
        try:
            stdout = open_log(launch.stdout_path) if launch.stdout_path else None
            stderr = open_log(launch.stderr_path) if launch.stderr_path else None
        except OSError as exc:
            raise SpawnError(f"cannot open log file {exc.filename}: {exc.strerror}") from exc
        opened += [fd for fd in (stdout, stderr) if fd is not None]
        file_actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
        ]
        if stdout is not None:
            file_actions.append((os.POSIX_SPAWN_DUP2, stdout, 1))
        if stderr is not None:
            file_actions.append((os.POSIX_SPAWN_DUP2, stderr, 2))
        if launch.secret is not None:
            secret_read, secret_write = _high_pipe()
            opened.append(secret_read)
            os.write(secret_write, launch.secret)  # a few bytes: the pipe buffer holds them
            os.close(secret_write)
            file_actions.append((os.POSIX_SPAWN_DUP2, secret_read, SECRET_FD))
        executable, run_argv = program, argv
        if launch.wrapping is not None:
            hold_fd = None
            if launch.wrapping.hold:
                hold_read, hold_write = _high_pipe()
                opened.append(hold_read)
                file_actions.append((os.POSIX_SPAWN_DUP2, hold_read, HOLD_FD))
                hold_fd = HOLD_FD
            executable = sys.executable
            run_argv = wrapped_argv(program, argv, launch.wrapping, hold_fd)
        try:
            pid = os.posix_spawn(
                executable,
                run_argv,
                dict(launch.env),
                file_actions=file_actions,
                setsid=True,
                setsigmask=(),
                # Python ignores SIGPIPE and SIGXFSZ for itself; a proxy gets the defaults.
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except PermissionError as exc:
            _close_all(hold_write)
            raise SpawnError(f"command {program!r} is not executable: {exc.strerror}") from exc
        except FileNotFoundError as exc:
            _close_all(hold_write)
            raise SpawnError(f"command {program!r} does not exist") from exc
        except OSError as exc:
            _close_all(hold_write)
            raise SpawnError(f"cannot start {program!r}: {exc.strerror or exc}") from exc
        finally:
            _close_all(*opened)
        handle = handle_for_child(pid, generation)
        handle.release_fd = hold_write
        return handle


def _close_all(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def handle_for_child(pid: int, generation: int) -> ProcessHandle:
    """Wrap a just-started child. Its PID cannot be recycled until we reap it, so the
    pidfd and the start time read here are certainly its own (even if it already exited)."""
    pidfd = open_pidfd(pid)
    proc_stat = read_stat(pid)
    if pidfd is None or proc_stat is None:  # pragma: no cover - only without procfs/pidfd
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise SpawnError(f"cannot watch new process {pid}: /proc or pidfd_open unavailable")
    identity = ProcessIdentity(pid=pid, start_ticks=proc_stat.start_ticks, boot_id=boot_id())
    return ProcessHandle(identity, pidfd, generation, is_child=True)
