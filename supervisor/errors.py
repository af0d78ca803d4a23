"""Every error proxy-supervisor raises on purpose.

Library code raises these; only the CLI (``supervisor.cli``) turns them into a
message on stderr and an exit code (``exit_code`` below).

    SupervisorError            root of the tree
    ├── ConfigError            the configuration is invalid (exit 2); one line per problem
    ├── UsageError             the command line is invalid (exit 2)
    ├── DataDirError           data_dir cannot be used (exit 1)
    │   ├── AgentLockedError   another agent holds data_dir (exit 1)
    │   └── CorruptStateError  a file in data_dir is damaged; an operator must act (exit 2)
    ├── SpawnError             a proxy process could not be started
    ├── ListenError            the HTTP API could not bind its address (exit 1)
    ├── DaemonError            -daemon could not detach, or the daemon failed to start (exit 1)
    └── AgentRequestError      the CLI could not get an answer from the agent (exit 1)
        └── ReloadRefused      the agent found its new configuration invalid (exit 2)
"""

from __future__ import annotations

from dataclasses import dataclass


class SupervisorError(Exception):
    """Root of every error raised on purpose; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in one configuration source.

    ``source`` is the file (or "<api>" / "<command line>"), ``path`` the key path inside
    it such as ``services[0].connect.proxy.comand``; either may be empty.
    """

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.source, self.path) if part)
        return f"{where}: {self.message}" if where else self.message


class ConfigError(SupervisorError):
    """The configuration is invalid; nothing was started or changed."""

    exit_code = 2

    def __init__(self, problems: list[ConfigProblem]) -> None:
        if not problems:
            raise ValueError("ConfigError needs at least one problem")
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))

    @classmethod
    def single(cls, source: str, path: str, message: str) -> ConfigError:
        return cls([ConfigProblem(source, path, message)])


class UsageError(SupervisorError):
    """The command line is invalid."""

    exit_code = 2


class DataDirError(SupervisorError):
    """data_dir (or a file in it) cannot be created, read or written."""


class AgentLockedError(DataDirError):
    """Another agent process already holds the lock on data_dir."""

    def __init__(self, lock_path: str, holder_pid: int | None) -> None:
        self.lock_path = lock_path
        self.holder_pid = holder_pid
        holder = f"PID {holder_pid}" if holder_pid else "an unknown process"
        super().__init__(
            f"another agent ({holder}) is already running with this data_dir "
            f"(lock {lock_path} is held); stop it first, or use a different -data-dir"
        )


class CorruptStateError(DataDirError):
    """A file in data_dir that cannot be set aside safely (CA, intentions, queries) is damaged.

    Exit code 2, like a config error: restarting cannot fix it, so the systemd unit's
    ``RestartPreventExitStatus=2`` stops a crash loop and the message says what to do.
    """

    exit_code = 2


class SpawnError(SupervisorError):
    """A proxy process could not be started (missing binary, permissions, fork failure)."""


class ListenError(SupervisorError):
    """The agent could not listen on its HTTP address."""


class DaemonError(SupervisorError):
    """``agent -daemon`` could not detach, lock its pid file, or the daemon failed to start."""


class AgentRequestError(SupervisorError):
    """A CLI command could not talk to the agent, or the agent refused the request
    (``status``: the HTTP status of the refusal, None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ReloadRefused(AgentRequestError):
    """``reload``: the configuration on disk is invalid; the agent kept the running one."""

    exit_code = 2
