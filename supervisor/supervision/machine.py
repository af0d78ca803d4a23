"""The supervision decisions for one proxy, as a small state machine with no I/O.

Inputs are calls (``want``, ``exited``, ``tick`` …) that carry the current monotonic
time; outputs are actions (``Spawn``, ``Signal``, ``KillGroup``) for the I/O shell in
``supervisor.supervision.manager`` to carry out. Because time is an argument, the
backoff schedule is tested with a fake clock in microseconds.

States::

    starting  a process was started less than ``startup_grace`` ago
    running   the process has been up for at least ``startup_grace``
    backoff   the process died; the next attempt is scheduled (``retry_at``)
    stopping  SIGINT was sent; SIGKILL of the group follows after ``stop_timeout``
    stopped   no process and none wanted
    blocked   a process is wanted but may not be started (agent runs as root)

Every process gets a generation number; an exit reported for an older generation is
ignored, so a late event can never restart a healthy replacement (pm2 issue 6142).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    BLOCKED = "blocked"


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart. Defaults follow DESIGN section 4 (Consul's numbers, reset bug fixed)."""

    immediate_restarts: int = 3
    base_delay: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.25
    healthy_after: float = 10.0
    startup_grace: float = 1.0
    stop_timeout: float = 5.0

    def delay(self, failures: int, random_fraction: float) -> float:
        """Seconds to wait before the next start after ``failures`` quick exits in a row.

        The first ``immediate_restarts`` are immediate, then 2, 4, 8 … s capped at
        ``max_delay``. Jitter only shortens the wait (by up to ``jitter``), so the cap
        holds and proxies that failed together do not retry in lockstep.
        """
        if failures <= self.immediate_restarts:
            return 0.0
        exponent = min(failures - self.immediate_restarts - 1, 30)
        base = min(self.max_delay, self.base_delay * (2**exponent))
        return float(base * (1.0 - self.jitter * random_fraction))


@dataclass(frozen=True)
class Spawn:
    generation: int


@dataclass(frozen=True)
class Signal:
    generation: int
    signum: int


@dataclass(frozen=True)
class KillGroup:
    generation: int


Action = Spawn | Signal | KillGroup


class ProxyMachine:
    """Supervision state of one proxy. Not thread-safe: owned by the supervision loop."""

    def __init__(self, policy: RestartPolicy, random_fraction: Callable[[], float]) -> None:
        self.policy = policy
        self._random = random_fraction
        self.state = State.STOPPED
        self.generation = 0
        self.alive = False  # a process of ``generation`` exists (ours or adopted)
        self.wanted = False
        self.blocked_reason: str | None = None
        self.replace_requested = False
        self.failures = 0  # quick exits in a row; reset after ``healthy_after`` of running
        self.restarts = 0  # automatic restarts after unexpected exits, never decreases
        self.started_at: float | None = None
        self.retry_at: float | None = None
        self.stop_deadline: float | None = None
        self.kill_sent = False
        self.last_exit: str | None = None
        self._restart_pending = False

    # -- inputs ---------------------------------------------------------------------------

    def want(self, now: float, blocked_reason: str | None = None) -> list[Action]:
        """The configuration wants this proxy (``blocked_reason``: it may not be started)."""
        self.wanted = True
        self.blocked_reason = blocked_reason
        return self._converge(now)

    def unwant(self, now: float) -> list[Action]:
        """The proxy's service is gone: stop the process (if any) for good."""
        self.wanted = False
        return self._converge(now)

    def replace(self, now: float) -> list[Action]:
        """The spec changed (or an operator asked for a restart): stop, then start afresh."""
        self.replace_requested = True
        self.failures = 0
        self.retry_at = None
        return self._converge(now)

    def adopted(self, generation: int, now: float, age: float, restarts: int) -> None:
        """A process from an earlier agent run passed the identity check and is ours again."""
        self.generation = generation
        self.alive = True
        self.restarts = max(self.restarts, restarts)
        self.started_at = now - max(age, 0.0)
        self.state = State.RUNNING if age >= self.policy.startup_grace else State.STARTING

    def exited(self, generation: int, now: float, reason: str) -> list[Action]:
        """The process of ``generation`` is gone (``reason`` says how, for the operator)."""
        if generation != self.generation or not self.alive:
            return []  # a stale event from an older process
        self.alive = False
        self.last_exit = reason
        if self.state is State.STOPPING:
            self.stop_deadline = None
            self.kill_sent = False
            if self.replace_requested:
                self.replace_requested = False
                self.state = State.STOPPED
        else:
            self._count_failure(now)
        return self._converge(now)

    def spawn_failed(self, generation: int, now: float, reason: str) -> list[Action]:
        """Starting generation ``generation`` failed before a process existed."""
        return self.exited(generation, now, f"failed to start: {reason}")

    def tick(self, now: float) -> list[Action]:
        """Time passed; act on any deadline that is due."""
        if (
            self.state is State.STOPPING
            and self.alive
            and not self.kill_sent
            and self.stop_deadline is not None
            and now >= self.stop_deadline
        ):
            self.kill_sent = True
            return [KillGroup(self.generation)]
        return self._converge(now)

    # -- queries ----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The monotonic time at which ``tick`` has something to do, if any.

        A decision that is already due (a process adopted for a proxy nobody wants any
        more must be stopped) has a deadline in the past: 0.
        """
        if self.alive and (not self.wanted or self.replace_requested) and self.state is not State.STOPPING:
            return 0.0
        if self.state is State.STARTING and self.started_at is not None:
            return self.started_at + self.policy.startup_grace
        if self.state is State.BACKOFF:
            return self.retry_at
        if self.state is State.STOPPING and not self.kill_sent:
            return self.stop_deadline
        return None

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing is wanted: the supervision slot can be dropped."""
        return not self.wanted and not self.alive and self.state is State.STOPPED

    # -- internals ---------------------------------------------------------------------------

    def _count_failure(self, now: float) -> None:
        ran_for = now - self.started_at if self.started_at is not None else 0.0
        if ran_for >= self.policy.healthy_after:
            self.failures = 0
        self.failures += 1
        delay = self.policy.delay(self.failures, self._random())
        self.retry_at = now + delay
        self.state = State.BACKOFF
        self._restart_pending = True

    def _converge(self, now: float) -> list[Action]:
        if self.alive:
            if (not self.wanted or self.replace_requested) and self.state is not State.STOPPING:
                self.state = State.STOPPING
                self.stop_deadline = now + self.policy.stop_timeout
                self.kill_sent = False
                return [Signal(self.generation, signal.SIGINT)]
            if self.state is State.STARTING and self.started_at is not None:
                if now >= self.started_at + self.policy.startup_grace:
                    self.state = State.RUNNING
            return []
        if not self.wanted:
            self.state = State.STOPPED
            self.retry_at = None
            self._restart_pending = False
            return []
        if self.blocked_reason is not None:
            self.state = State.BLOCKED
            return []
        if self.state is State.BACKOFF and self.retry_at is not None and now < self.retry_at:
            return []
        return [self._spawn(now)]

    def _spawn(self, now: float) -> Spawn:
        if self._restart_pending:
            self.restarts += 1
            self._restart_pending = False
        self.generation += 1
        self.alive = True
        self.replace_requested = False
        self.started_at = now
        self.retry_at = None
        self.state = State.STARTING
        return Spawn(self.generation)
