"""The cluster member's state: a small machine fed by the outcome of each etcd call.

Pure (times are handed in), so its transitions are tested without etcd. Each transition
returns the line to log, once: joining, connected, degraded (with why), recovered, left.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ClusterState(enum.StrEnum):
    DISABLED = "disabled"  # no cluster block: the single-host agent
    JOINING = "joining"  # not yet through to etcd since the agent started
    CONNECTED = "connected"
    DEGRADED = "degraded"  # etcd calls failing: the last view is served, writes are queued
    LEFT = "left"  # deregistered (``leave``)


@dataclass
class MemberHealth:
    state: ClusterState = ClusterState.JOINING
    since: float = 0.0  # monotonic time of the last transition
    last_contact: float | None = None  # monotonic time of the last etcd answer
    error: str = ""
    joined_once: bool = False

    def reached(self, now: float) -> str | None:
        """An etcd call succeeded."""
        self.last_contact = now
        if self.state is ClusterState.CONNECTED or self.state is ClusterState.LEFT:
            return None
        previous, self.state, self.since, self.error = self.state, ClusterState.CONNECTED, now, ""
        if previous is ClusterState.DEGRADED and self.joined_once:
            return "etcd reachable again; connected (queued changes are being written)"
        self.joined_once = True
        return "joined"

    def failed(self, now: float, error: str) -> str | None:
        """An etcd call failed (``error`` says how)."""
        if self.state is ClusterState.LEFT:
            return None
        self.error = error
        if self.state is ClusterState.DEGRADED:
            return None  # (logged once per outage; /v1/agent/self shows the latest error)
        self.state, self.since = ClusterState.DEGRADED, now
        return f"degraded, serving the last view of the cluster: {error}"

    def left(self, now: float) -> str:
        self.state, self.since = ClusterState.LEFT, now
        return "left (this host's records deleted)"

    def known_leader(self) -> bool:
        return self.state is ClusterState.CONNECTED

    def contact_ms(self, now: float) -> int:
        """Milliseconds since etcd last answered (0 when connected and current)."""
        if self.last_contact is None:
            return 0
        return (
            max(0, int((now - self.last_contact) * 1000)) if self.state is not ClusterState.CONNECTED else 0
        )
