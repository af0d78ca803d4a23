"""The agent's figures in Prometheus' text format, written by prometheus_client.

Imported on the first ``/v1/agent/metrics?format=prometheus`` only: the client library
costs the agent several MiB it need not carry when nothing scrapes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class FigureLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...


def render(figures: Sequence[FigureLike]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Figures(figures))
    return generate_latest(registry)


class _Figures(Collector):
    """The figures as Prometheus metric families (dots become underscores, as Consul's
    Prometheus sink flattens names; counters get ``_total``)."""

    def __init__(self, figures: Sequence[FigureLike]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for figure in self._figures:
            name = figure.name.replace(".", "_")
            labels = [key for key, _ in figure.labels]
            family = families.get(name)
            if family is None:
                kind = CounterMetricFamily if figure.kind == "counter" else GaugeMetricFamily
                family = kind(name, f"{figure.name} ({figure.kind})", labels=labels)
                families[name] = family
            family.add_metric([value for _, value in figure.labels], figure.value)
        yield from families.values()
