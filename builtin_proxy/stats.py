"""What a built-in proxy counts about its connections (event-loop thread writes, the
telemetry thread reads).

Plain integers and lists, bumped in place on the loop: a counter costs one attribute
add, never a lock or a call into a metrics library on the byte path. ``telemetry.py``
turns them into Prometheus metrics when scraped (reading an int another thread is
bumping is safe under the GIL; a scrape sees a value that was true a moment before).
"""

from __future__ import annotations

import bisect
import enum
import time
from dataclasses import dataclass, field

# Seconds; the range of a loopback handshake (~1 ms) to a slow remote dial.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Rejection(enum.StrEnum):
    HANDSHAKE = "handshake"  # TLS failed or took too long
    IDENTITY = "identity"  # no Connect identity, or not the destination's
    AUTHORIZATION = "authorization"  # intentions denied it
    DIAL = "dial"  # the local service (or the upstream instance) could not be reached


class Phase(enum.StrEnum):
    HANDSHAKE = "handshake"
    AUTHORIZATION = "authorization"
    DIAL = "dial"


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


@dataclass
class ListenerStats:
    """One listener: the public one, or an upstream (``destination`` names it)."""

    kind: str  # "public" | "upstream"
    destination: str = ""
    accepted: int = 0
    active: int = 0
    rejected: dict[Rejection, int] = field(default_factory=lambda: dict.fromkeys(Rejection, 0))
    # bytes_in: from the client side of this listener into the proxy; bytes_out: back to it
    bytes_in: int = 0
    bytes_out: int = 0
    latency: dict[Phase, Histogram] = field(default_factory=lambda: {p: Histogram() for p in Phase})

    def reject(self, reason: Rejection) -> None:
        self.rejected[reason] += 1

    def phase_done(self, phase: Phase, since: float) -> float:
        """Record a phase of a new connection that began at ``since``; returns now (when
        the next phase begins)."""
        now = time.monotonic()
        self.latency[phase].observe(now - since)
        return now


@dataclass
class TunnelStats:
    idle: int = 0  # pooled at our upstreams now
    reused: int = 0  # streams carried by a pooled tunnel (no handshake)
    retired: int = 0  # pooled tunnels closed: expired, GOAWAY, certificates changed
    public: int = 0  # tunnels other proxies hold open at our public listener


@dataclass
class ProxyStats:
    public: ListenerStats = field(default_factory=lambda: ListenerStats("public"))
    upstreams: dict[str, ListenerStats] = field(default_factory=dict)
    tunnels: TunnelStats = field(default_factory=TunnelStats)

    def upstream(self, destination: str) -> ListenerStats:
        stats = self.upstreams.get(destination)
        if stats is None:
            stats = self.upstreams[destination] = ListenerStats("upstream", destination)
        return stats

    def listeners(self) -> list[ListenerStats]:
        return [self.public, *list(self.upstreams.values())]
