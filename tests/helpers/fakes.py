"""Fakes for driving the supervision loop without processes or waiting: a clock that
moves only when told, and a spawner whose "processes" are pipes.

A ``FakeProcess`` is a real ``ProcessHandle`` whose pidfd is the read end of a pipe:
``exit()`` writes to the pipe, so the loop sees the exit exactly as it sees a real one
(the fd turns readable), with no process and no delay.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from supervisor.errors import SpawnError
from supervisor.process.handle import ExitStatus, ProcessHandle
from supervisor.process.identity import ProcessIdentity
from supervisor.process.spawn import LaunchSpec


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_pids = itertools.count(40_000)


class FakeProcess(ProcessHandle):
    """A supervised "process": signals are recorded, and it exits when told to
    (``exit``), or on SIGINT/SIGKILL unless ``ignores_sigint``."""

    def __init__(self, launch: LaunchSpec | None, generation: int, *, ignores_sigint: bool = False) -> None:
        read_end, self._write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pid = next(_pids)
        super().__init__(ProcessIdentity(pid, start_ticks=pid, boot_id="fake-boot"), read_end, generation)
        self.launch = launch
        self.ignores_sigint = ignores_sigint
        self.signals: list[int] = []
        self.outcome: ExitStatus | None = None

    def exit(self, code: int = 0) -> None:
        if self.outcome is None:
            self.outcome = ExitStatus(code=code)
            os.write(self._write_end, b"x")

    @property
    def running(self) -> bool:
        return self.outcome is None

    def has_exited(self) -> bool:
        return self.outcome is not None

    def reap(self) -> ExitStatus:
        assert self.outcome is not None
        return self.outcome

    def send_signal(self, signum: int) -> bool:
        if self.outcome is not None:
            return False
        self.signals.append(signum)
        if signum == signal.SIGKILL or (signum == signal.SIGINT and not self.ignores_sigint):
            self.exit(-signum)
        return True

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        self.send_signal(signum)

    def close(self) -> None:
        super().close()
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1


@dataclass
class FakeSpawner:
    """Starts FakeProcesses; ``fail`` makes the next spawns of a proxy raise SpawnError."""

    started: list[FakeProcess] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)
    configure: Callable[[FakeProcess], None] = lambda process: None

    def spawn(self, launch: LaunchSpec, generation: int) -> ProcessHandle:
        if launch.proxy_id in self.fail:
            raise SpawnError(f"command {launch.argv[0]!r} does not exist")
        process = FakeProcess(launch, generation)
        self.configure(process)
        self.started.append(process)
        return process

    def of(self, proxy_id: str) -> list[FakeProcess]:
        return [p for p in self.started if p.launch is not None and p.launch.proxy_id == proxy_id]

    def current(self, proxy_id: str) -> FakeProcess:
        return self.of(proxy_id)[-1]

    def close_all(self) -> None:
        for process in self.started:
            process.close()
