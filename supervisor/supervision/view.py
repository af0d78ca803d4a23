"""Read-only snapshots the supervision loop publishes for everyone else (HTTP API, CLI).

The loop owns all mutable supervision state; after every change it publishes a new,
immutable ``AgentView``. Readers on other threads just take the current reference --
no locks, no torn reads -- and listeners are told that something changed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from supervisor.config.model import AgentConfig
from supervisor.supervision.desired import PlannedProxy
from supervisor.supervision.machine import State


@dataclass(frozen=True)
class ProxyStatus:
    """How one managed proxy is doing, for ``/v1/agent/connect/proxies`` and ``proxies``."""

    proxy_id: str
    service_id: str
    state: State
    pid: int | None
    generation: int
    restarts: int
    adopted: bool
    last_exit: str | None
    started_monotonic: float | None  # time.monotonic() of the start; uptime = now - this
    started_wall: float | None
    next_attempt_monotonic: float | None
    blocked_reason: str | None
    port: int
    command: tuple[str, ...]
    stdout_log: str | None
    stderr_log: str | None


@dataclass(frozen=True)
class Totals:
    """Counts since the agent started (for ``/v1/agent/metrics``)."""

    starts: int = 0  # proxy processes started
    exits: int = 0  # proxy processes that exited (stopped ones included)
    unexpected_exits: int = 0  # exits the agent did not ask for
    adopted: int = 0  # proxies of an earlier agent run taken over at start-up
    reloads: int = 0
    failed_reloads: int = 0


@dataclass(frozen=True)
class AgentView:
    config: AgentConfig
    node_id: str
    api_address: str
    proxies: Mapping[str, PlannedProxy] = field(default_factory=dict)
    statuses: Mapping[str, ProxyStatus] = field(default_factory=dict)
    reload_error: str | None = None
    version: int = 0
    totals: Totals = field(default_factory=Totals)


class ViewBoard:
    """Holds the current view; ``publish`` is called by the loop, ``current`` by anyone."""

    def __init__(self, initial: AgentView) -> None:
        self._current = initial
        self._listeners: list[Callable[[AgentView], None]] = []
        self._lock = threading.Lock()

    @property
    def current(self) -> AgentView:
        return self._current

    def subscribe(self, listener: Callable[[AgentView], None]) -> None:
        """``listener`` runs on the publishing thread: it must only hand the news on."""
        with self._lock:
            self._listeners.append(listener)

    def publish(self, view: AgentView) -> None:
        self._current = view
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(view)
