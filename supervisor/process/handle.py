"""A supervised process, held through a pidfd: watched and signalled without PID races.

Own children (spawned by this agent) are reaped and their exit status recorded.
Adopted processes (spawned by an earlier agent run) are not our children: we learn
*that* they exited, within milliseconds, but not their exit status.
"""

from __future__ import annotations

import errno
import os
import select
import signal
from dataclasses import dataclass

from supervisor.process.identity import ProcessIdentity


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended. ``code``/``signum`` are None when the status is unknown."""

    code: int | None = None
    signum: int | None = None

    @property
    def known(self) -> bool:
        return self.code is not None or self.signum is not None

    def describe(self) -> str:
        if self.signum is not None:
            try:
                name = signal.Signals(self.signum).name
            except ValueError:
                name = f"signal {self.signum}"
            return f"killed by {name}"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "exited (status unknown: adopted from an earlier agent run)"

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        if returncode < 0:
            return cls(signum=-returncode)
        return cls(code=returncode)


class ProcessHandle:
    """One process of one proxy generation."""

    def __init__(
        self,
        identity: ProcessIdentity,
        pidfd: int,
        generation: int,
        *,
        is_child: bool = False,
    ) -> None:
        self.identity = identity
        self.pidfd = pidfd
        self.generation = generation
        self.is_child = is_child
        self._reaped = False
        self._exit: ExitStatus | None = None
        # Set for a process held by the exec wrapper until the agent has recorded it.
        self.release_fd: int | None = None

    @property
    def pid(self) -> int:
        return self.identity.pid

    def fileno(self) -> int:
        """The pidfd: readable once the process has exited (for selectors)."""
        return self.pidfd

    def has_exited(self) -> bool:
        """Non-blocking: has the process terminated? Does not reap it (see ``reap``)."""
        if self._exit is not None or self.pidfd < 0:
            return True
        readable, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(readable)

    def reap(self) -> ExitStatus:
        """Collect the exit of a process that ``has_exited``; kill what it left in its group.

        For an own child the group is killed *before* reaping: until then the zombie
        leader pins its PID, so the group ID cannot belong to anyone else yet.
        """
        if self._exit is not None:
            return self._exit
        if not self.is_child:
            self._exit = ExitStatus()
            return self._exit
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _, status = os.waitpid(self.pid, 0)
        self._reaped = True
        self._exit = ExitStatus.from_returncode(os.waitstatus_to_exitcode(status))
        return self._exit

    def send_signal(self, signum: int) -> bool:
        """Signal the process through its pidfd; False if it has already exited."""
        if self.pidfd < 0 or self._exit is not None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
            return True
        except ProcessLookupError:
            return False

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Signal the proxy's whole process group (its session, which it leads).

        Safe against PID reuse: the leader itself is signalled through its pidfd, and
        the group only while the leader is still unreaped (a live or zombie leader keeps
        its PID, and so the group ID, from being recycled).
        """
        leader_alive = self.send_signal(signum)
        if self.is_child and not self._reaped:
            leader_alive = True  # an unreaped child pins its PID even as a zombie
        if not leader_alive:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            pass  # a member changed credentials; the leader was still signalled

    @property
    def held(self) -> bool:
        return self.release_fd is not None

    def release(self) -> None:
        """Let a held process go on to run the proxy (it is in the record now)."""
        if self.release_fd is not None:
            try:
                os.write(self.release_fd, b"1")
            except OSError:
                pass  # it is gone already; its exit is seen through the pidfd
            os.close(self.release_fd)
            self.release_fd = None

    def close(self) -> None:
        if self.release_fd is not None:  # never released: the wrapper exits without running
            os.close(self.release_fd)
            self.release_fd = None
        if self.pidfd >= 0:
            try:
                os.close(self.pidfd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
            self.pidfd = -1

    def __repr__(self) -> str:
        kind = "child" if self.is_child else "adopted"
        return f"<ProcessHandle pid={self.pid} gen={self.generation} {kind}>"
