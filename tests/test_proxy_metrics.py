"""Prometheus metrics of the built-in proxy (``telemetry`` in its proxy config): a real
mesh on a real agent, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.helpers.mesh import Mesh, talk
from tests.helpers.processes import wait_until


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path, db_config={"telemetry": f"127.0.0.1:{free_port()}"})
    m.db_metrics = m.db_config["telemetry"]  # type: ignore[attr-defined]
    m.web_metrics = f"127.0.0.1:{free_port()}"  # type: ignore[attr-defined]
    upstreams = [{"destination_name": "db", "local_bind_port": m.upstream_port}]
    m.write_web(upstreams, telemetry={"prometheus_bind_addr": m.web_metrics})  # type: ignore[attr-defined]
    try:
        m.start()
        yield m
    finally:
        m.close()


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "le" in sample.labels:
                continue  # (histogram buckets: the counts and sums are enough here)
            own = {k: v for k, v in sample.labels.items() if k not in ("service", "proxy_id")}
            samples[series(sample.name, **own)] = sample.value
    return samples


def series(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key of a series: of the public listener unless the labels say otherwise."""
    return name, tuple(sorted({"listener": "public", "destination": "", **labels}.items()))


def test_the_public_listener_counts_connections_bytes_rejections_and_latency(mesh: Mesh) -> None:
    address = mesh.db_metrics  # type: ignore[attr-defined]
    before = scrape(address)
    accepted = before[series("proxy_supervisor_proxy_connections_accepted_total")]
    for _ in range(5):
        assert talk(mesh.upstream_port, b"x" * 1000) == b"x" * 1000 + b"|db"
    after = scrape(address)
    assert after[series("proxy_supervisor_proxy_connections_accepted_total")] >= accepted + 5
    assert after[series("proxy_supervisor_proxy_bytes_total", direction="in")] >= 5000
    assert after[series("proxy_supervisor_proxy_bytes_total", direction="out")] >= 5 * 1003
    # One handshake (the tunnel web's proxy reuses), then an authorization and a dial per connection.
    assert after[series("proxy_supervisor_proxy_handshake_seconds_count")] >= 1
    assert after[series("proxy_supervisor_proxy_authorization_seconds_count")] >= 5
    assert after[series("proxy_supervisor_proxy_dial_seconds_count")] >= 5

    deny = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    mesh.agent.http("POST", "/v1/connect/intentions", deny)
    wait_until(lambda: talk(mesh.upstream_port) == b"", timeout=5, message="the deny to take effect")
    denied = scrape(address)[
        series("proxy_supervisor_proxy_connections_rejected_total", reason="authorization")
    ]
    assert denied >= 1
    wait_until(
        lambda: scrape(address)[series("proxy_supervisor_proxy_connections_active")] == 0,
        timeout=5,
        message="no connection left open",
    )


def test_an_upstream_listener_counts_its_own(mesh: Mesh) -> None:
    for _ in range(3):
        assert talk(mesh.upstream_port, b"abc") == b"abc|db"
    found = scrape(mesh.web_metrics)  # type: ignore[attr-defined]
    upstream = {"listener": "upstream", "destination": "db"}
    assert found[series("proxy_supervisor_proxy_connections_accepted_total", **upstream)] >= 3
    assert found[series("proxy_supervisor_proxy_bytes_total", direction="in", **upstream)] >= 9
    assert found[series("proxy_supervisor_proxy_bytes_total", direction="out", **upstream)] >= 18
    assert found[series("proxy_supervisor_proxy_handshake_seconds_count", **upstream)] >= 1


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    plain = Mesh(tmp_path)
    try:
        plain.start()
        assert "metrics on http" not in plain.proxy_log("db-proxy")
    finally:
        plain.close()
