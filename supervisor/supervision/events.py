"""What the supervision loop reacts to: events posted from other threads, the clock it
reads, the debounce of config-file events, and hooks for the service manager.

Everything here is plain data or a tiny helper; ``supervisor.supervision.manager`` acts on it.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Protocol

from supervisor.config.model import AgentConfig
from supervisor.errors import ConfigError
from supervisor.process.marker import MarkedProcess


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


# -- events posted to the loop --------------------------------------------------------------


@dataclass(frozen=True)
class ReloadRequested:
    """Re-read the configuration (SIGHUP, ``reload``, the API)."""

    reason: str
    reply: concurrent.futures.Future[None] | None = None


@dataclass(frozen=True)
class FilesChanged:
    """A config drop-in changed on disk; reloaded after a quiet period."""

    path: str


@dataclass(frozen=True)
class ServicesChanged:
    """A service registered through the API with a managed proxy came or went."""


@dataclass(frozen=True)
class SweepScanned:
    """The /proc scan for leftovers of exited proxies finished (posted by the scan thread)."""

    proxy_ids: frozenset[str]
    found: tuple[MarkedProcess, ...]


@dataclass(frozen=True)
class ShutdownRequested:
    """Stop the loop. ``stop_proxies``: stop every proxy first (``leave``, ``-dev``)."""

    stop_proxies: bool
    reason: str
    reply: concurrent.futures.Future[None] | None = None


@dataclass(frozen=True)
class RestartRequested:
    """An operator asked for one proxy to be restarted (``restart``, rolling ``restart -all``).
    ``reply`` gets the generation being replaced, or an exception (unknown proxy)."""

    proxy_id: str
    reply: concurrent.futures.Future[int]


@dataclass(frozen=True)
class DataDirChanged:
    """Something in data_dir or data_dir/proxy was removed or renamed (maybe by an operator)."""

    path: str


@dataclass(frozen=True)
class ConfigLoaded:
    """The configuration was read on a worker: ``config``, or the ``error`` that stopped it.
    ``replies`` are the callers of ``reload`` waiting for this read."""

    reason: str
    config: AgentConfig | None
    error: ConfigError | None
    replies: tuple[concurrent.futures.Future[None], ...] = ()


Event = (
    ReloadRequested
    | FilesChanged
    | ShutdownRequested
    | SweepScanned
    | ServicesChanged
    | RestartRequested
    | DataDirChanged
    | ConfigLoaded
)


@dataclass
class Debounce:
    """Config-file events are applied after ``quiet`` seconds without events, but at most
    ``cap`` seconds after the first one (editors save in bursts of events)."""

    quiet: float = 0.2
    cap: float = 2.0
    first: float | None = None
    due: float | None = None

    def poke(self, now: float) -> float:
        """Another event at ``now``; returns when to act."""
        if self.first is None:
            self.first = now
        self.due = min(now + self.quiet, self.first + self.cap)
        return self.due

    def fire(self, now: float) -> bool:
        if self.due is not None and now >= self.due:
            self.first = self.due = None
            return True
        return False


class LoopHooks:
    """Called on the supervision loop at the moments a service manager cares about.

    The default does nothing; the agent plugs in systemd notification. ``heartbeat`` runs
    every ``heartbeat_interval`` seconds from the loop itself, so a stuck loop stops the
    heartbeat (that is the point of a watchdog).
    """

    heartbeat_interval: float | None = None

    def reloading(self) -> None:
        """A reload starts."""

    def reloaded(self) -> None:
        """A reload finished (applied, or failed and the running config was kept)."""

    def stopping(self) -> None:
        """A shutdown was requested."""

    def heartbeat(self) -> None:
        """The loop is alive."""

    def data_dir_restored(self) -> None:
        """data_dir was re-created from memory: the rest of the agent must save its part."""
