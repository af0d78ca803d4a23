"""``GET /v1/agent/metrics``: the supervisor's own figures, in Consul's JSON shape (its
go-metrics in-memory sink) or, with ``?format=prometheus``, Prometheus' text format
(written by prometheus_client, not by hand).

Gauges: proxies by state, adopted, blocked, held blocking queries, open API connections,
the agent's RSS and open files. Counters: proxy starts, exits (and the unexpected ones),
restarts, reloads (and failed ones), adoptions at start-up, API requests by status.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil

from supervisor.api.auth import identify, require_operator
from supervisor.api.http import Handler, HttpError, Request, Response
from supervisor.api.limits import ConnectionBook
from supervisor.api.router import READ_METHODS, Router
from supervisor.changes import ChangeSignal
from supervisor.supervision.machine import State
from supervisor.supervision.view import ViewBoard

PREFIX = "proxy_supervisor"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ApiStats:
    """Requests answered, by status code (kept by ``counting``)."""

    responses: Counter[int] = field(default_factory=Counter)
    book: ConnectionBook | None = None  # set once the server runs


def counting(handler: Handler, stats: ApiStats) -> Handler:
    async def counted(request: Request) -> Response:
        try:
            response = await handler(request)
        except HttpError as exc:
            stats.responses[exc.status] += 1
            raise
        stats.responses[response.status] += 1
        return response

    return counted


@dataclass(frozen=True)
class Figure:
    name: str  # dotted, as Consul names its metrics
    kind: str  # "gauge" | "counter"
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class MetricsEndpoints:
    board: ViewBoard
    changes: ChangeSignal
    stats: ApiStats

    def register(self, router: Router) -> None:
        router.add(READ_METHODS, "/v1/agent/metrics", self.metrics)

    def figures(self) -> list[Figure]:
        view = self.board.current
        states = Counter(status.state for status in view.statuses.values())
        figures = [
            Figure(f"{PREFIX}.proxies", "gauge", states.get(state, 0), (("state", state.value),))
            for state in State
        ]
        totals = view.totals
        figures += [
            Figure(f"{PREFIX}.proxies.adopted", "gauge", sum(s.adopted for s in view.statuses.values())),
            Figure(f"{PREFIX}.proxies.blocked", "gauge", states.get(State.BLOCKED, 0)),
            Figure(f"{PREFIX}.proxy.starts", "counter", totals.starts),
            Figure(f"{PREFIX}.proxy.exits", "counter", totals.exits),
            Figure(f"{PREFIX}.proxy.unexpected_exits", "counter", totals.unexpected_exits),
            Figure(f"{PREFIX}.proxy.restarts", "counter", sum(s.restarts for s in view.statuses.values())),
            Figure(f"{PREFIX}.adopted_at_start", "counter", totals.adopted),
            Figure(f"{PREFIX}.reloads", "counter", totals.reloads),
            Figure(f"{PREFIX}.reloads.failed", "counter", totals.failed_reloads),
            Figure(f"{PREFIX}.api.blocking_queries", "gauge", self.changes.held),
        ]
        figures += [
            Figure(f"{PREFIX}.api.requests", "counter", count, (("code", str(code)),))
            for code, count in sorted(self.stats.responses.items())
        ]
        if self.stats.book is not None:
            figures.append(Figure(f"{PREFIX}.api.connections", "gauge", self.stats.book.total))
        process = psutil.Process(os.getpid())
        figures += [
            Figure(f"{PREFIX}.runtime.rss_bytes", "gauge", process.memory_info().rss),
            Figure(f"{PREFIX}.runtime.open_files", "gauge", process.num_fds()),
        ]
        return figures

    async def metrics(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        figures = self.figures()
        form = request.arg("format")
        if form == "prometheus":
            from supervisor.api import prometheus_text  # prometheus_client only when asked for

            return Response(200, prometheus_text.render(figures), {"Content-Type": PROMETHEUS_TYPE})
        if form not in (None, ""):
            raise HttpError(400, f"Invalid format {form[:40]!r}: use prometheus, or leave it out for JSON")
        return Response.json(consul_json(figures))


def consul_json(figures: list[Figure]) -> dict[str, object]:
    """go-metrics' DisplayMetrics shape: gauges as values; a counter as the sampled value
    of its increments by one (counted since the agent started, not per ten-second interval)."""
    gauges = [
        {"Name": f.name, "Value": f.value, "Labels": dict(f.labels)} for f in figures if f.kind == "gauge"
    ]
    counters = [
        {
            "Name": f.name,
            "Count": int(f.value),
            "Sum": f.value,
            "Min": 1 if f.value else 0,
            "Max": 1 if f.value else 0,
            "Mean": 1 if f.value else 0,
            "Stddev": 0,
            "Labels": dict(f.labels),
        }
        for f in figures
        if f.kind == "counter"
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(int(time.time()) // 10 * 10))
    return {"Timestamp": stamp, "Gauges": gauges, "Points": [], "Counters": counters, "Samples": []}
