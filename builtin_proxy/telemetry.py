"""Prometheus metrics of one built-in proxy, on the address of its ``telemetry`` setting.

Served by prometheus_client's own HTTP server thread (imported only when telemetry is on);
the figures are read at scrape time from ``stats.ProxyStats``, which the event loop keeps.

    proxy_supervisor_proxy_connections_accepted_total{listener, destination}
    proxy_supervisor_proxy_connections_active{listener, destination}
    proxy_supervisor_proxy_connections_rejected_total{listener, destination, reason}
        reason: handshake | identity | authorization | dial
    proxy_supervisor_proxy_bytes_total{listener, destination, direction}
        direction: in (from the listener's client) | out (back to it)
    proxy_supervisor_proxy_<phase>_seconds{listener, destination}   (histograms)
        phase: handshake | authorization (public only) | dial

    proxy_supervisor_proxy_tunnels_idle, _tunnels_public                  (gauges)
    proxy_supervisor_proxy_tunnel_reuses_total, _tunnels_retired_total     (counters)

``listener`` is ``public`` or ``upstream``; ``destination`` names an upstream ("" for public).
Every series carries ``service`` (the proxied service) and ``proxy_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from builtin_proxy.stats import LATENCY_BUCKETS, Phase, ProxyStats, Rejection

log = logging.getLogger("builtin_proxy.telemetry")
PREFIX = "proxy_supervisor_proxy"


class _Collector(Collector):
    def __init__(self, stats: ProxyStats, service: str, proxy_id: str) -> None:
        self.stats = stats
        self.base = {"service": service, "proxy_id": proxy_id}

    def collect(self) -> Iterator[Metric]:
        names = ["service", "proxy_id", "listener", "destination"]
        accepted = CounterMetricFamily(f"{PREFIX}_connections_accepted", "Connections accepted", labels=names)
        active = GaugeMetricFamily(f"{PREFIX}_connections_active", "Connections open now", labels=names)
        rejected = CounterMetricFamily(
            f"{PREFIX}_connections_rejected", "Connections refused, by reason", labels=[*names, "reason"]
        )
        moved = CounterMetricFamily(f"{PREFIX}_bytes", "Bytes carried", labels=[*names, "direction"])
        latency = {
            phase: HistogramMetricFamily(f"{PREFIX}_{phase}_seconds", f"Time to {phase}", labels=names)
            for phase in Phase
        }
        for listener in list(self.stats.listeners()):
            values = [self.base["service"], self.base["proxy_id"], listener.kind, listener.destination]
            accepted.add_metric(values, listener.accepted)
            active.add_metric(values, listener.active)
            for reason in Rejection:
                rejected.add_metric([*values, reason.value], listener.rejected[reason])
            moved.add_metric([*values, "in"], listener.bytes_in)
            moved.add_metric([*values, "out"], listener.bytes_out)
            for phase, histogram in listener.latency.items():
                counts, running, buckets = list(histogram.counts), 0, []
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    running += count
                    buckets.append((_bound(bound), running))
                latency[phase].add_metric(values, buckets, histogram.total)
        yield from (accepted, active, rejected, moved, *latency.values())
        tunnels = self.stats.tunnels
        base = ["service", "proxy_id"]
        values = [self.base["service"], self.base["proxy_id"]]
        for name, kind, text, value in (
            ("tunnels_idle", GaugeMetricFamily, "Tunnels pooled at the upstreams, idle", tunnels.idle),
            ("tunnels_public", GaugeMetricFamily, "Tunnels held open at the public listener", tunnels.public),
            ("tunnel_reuses", CounterMetricFamily, "Streams carried by a pooled tunnel", tunnels.reused),
            (
                "tunnels_retired",
                CounterMetricFamily,
                "Pooled tunnels closed (age, GOAWAY, new certificates)",
                tunnels.retired,
            ),
        ):
            family = kind(f"{PREFIX}_{name}", text, labels=base)
            family.add_metric(values, value)
            yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class Telemetry:
    """The metrics endpoint; ``move`` follows a changed ``telemetry`` address."""

    def __init__(self, stats: ProxyStats, service: str, proxy_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(stats, service, proxy_id))
        self.address: tuple[str, int] | None = None
        self._server: Any = None

    def move(self, address: tuple[str, int] | None) -> None:
        if address == self.address:
            return
        self.stop()
        self.address = address
        if address is None:
            return
        try:
            self._server, _thread = start_http_server(address[1], address[0], registry=self.registry)
        except OSError as exc:
            log.error(
                "cannot serve metrics on %s:%d: %s; change telemetry in the proxy's config", *address, exc
            )
            return
        log.info("metrics on http://%s:%d/metrics", *address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
