"""Starting proxy processes.

A proxy is started with ``posix_spawn`` in a new session (so signals to the agent's
terminal or process group never reach it), with stdin from /dev/null and stdout/stderr opened O_APPEND on
its log files and handed to it directly: its output keeps flowing while the agent is
down and after it re-adopts the process. No ``preexec_fn`` (unsafe in a threaded
program); the working directory is the agent's.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from supervisor.errors import SpawnError
from supervisor.process.handle import ProcessHandle
from supervisor.process.identity import ProcessIdentity, boot_id, open_pidfd, read_stat

LOG_FILE_MODE = 0o600
LOG_DIR_MODE = 0o700


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one proxy process."""

    proxy_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    stdout_path: str | None = None  # None: inherit the agent's stdout (dev mode)
    stderr_path: str | None = None


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


class PosixSpawner:
    """The real spawner (``posix_spawn``: no fork of the whole agent, no ``preexec_fn``)."""

    def spawn(self, launch: LaunchSpec, generation: int) -> ProcessHandle:
        argv = list(launch.argv)
        program = resolve_program(argv[0], launch.env)
        stdout = stderr = None
        try:
            if launch.stdout_path:
                stdout = open_log(launch.stdout_path)
            if launch.stderr_path:
                stderr = open_log(launch.stderr_path)
        except OSError as exc:
            _close_all(stdout, stderr)
            raise SpawnError(f"cannot open log file {exc.filename}: {exc.strerror}") from exc
        file_actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
        ]
        if stdout is not None:
            file_actions.append((os.POSIX_SPAWN_DUP2, stdout, 1))
        if stderr is not None:
            file_actions.append((os.POSIX_SPAWN_DUP2, stderr, 2))
        try:
            pid = os.posix_spawn(
                program,
                argv,
                dict(launch.env),
                file_actions=file_actions,
                setsid=True,
                setsigmask=(),
                # Python ignores SIGPIPE and SIGXFSZ for itself; a proxy gets the defaults.
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except PermissionError as exc:
            raise SpawnError(f"command {program!r} is not executable: {exc.strerror}") from exc
        except FileNotFoundError as exc:
            raise SpawnError(f"command {program!r} does not exist") from exc
        except OSError as exc:
            raise SpawnError(f"cannot start {program!r}: {exc.strerror or exc}") from exc
        finally:
            _close_all(stdout, stderr)
        return handle_for_child(pid, generation)


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
