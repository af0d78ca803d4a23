"""Reusable tunnels between two built-in proxies (``builtin_proxy/frames.py``,
``tunnels.py``) on a real agent: client connections reuse a pooled mutual-TLS tunnel
instead of a handshake each, every connection is still authorized (a new deny stops the
next one on an established tunnel, before the app is dialled), and ``tunnels: false``
falls back to one TLS connection per client connection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers.mesh import Mesh, talk
from tests.helpers.processes import wait_until
from tests.test_proxy_metrics import scrape, series

UPSTREAM = {"listener": "upstream", "destination": "db"}


def mesh_with(tmp_path: Path, **web_config: Any) -> Mesh:
    m = Mesh(tmp_path, db_config={"telemetry": f"127.0.0.1:{free_port()}"})
    m.web_metrics = f"127.0.0.1:{free_port()}"  # type: ignore[attr-defined]
    upstreams = [{"destination_name": "db", "local_bind_port": m.upstream_port}]
    m.write_web(upstreams, telemetry=m.web_metrics, **web_config)  # type: ignore[attr-defined]
    return m


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = mesh_with(tmp_path)
    try:
        m.start()
        yield m
    finally:
        m.close()


def test_sequential_connections_reuse_one_tunnel(mesh: Mesh) -> None:
    for index in range(30):
        assert talk(mesh.upstream_port, f"hello {index}".encode()) == f"hello {index}|db".encode()
    web = scrape(mesh.web_metrics)  # type: ignore[attr-defined]
    handshakes = web[series("proxy_supervisor_proxy_handshake_seconds_count", **UPSTREAM)]
    reuses = web[series("proxy_supervisor_proxy_tunnel_reuses_total")]
    assert reuses >= 25 and handshakes <= 5, (reuses, handshakes)
    db = scrape(mesh.db_config["telemetry"])
    assert db[series("proxy_supervisor_proxy_connections_accepted_total")] >= 30  # counted per stream
    assert db[series("proxy_supervisor_proxy_tunnels_public")] >= 1


def test_a_new_deny_stops_the_next_connection_on_an_established_tunnel(mesh: Mesh) -> None:
    assert talk(mesh.upstream_port) == b"ping|db"  # a tunnel is now pooled
    deny = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    mesh.agent.http("POST", "/v1/connect/intentions", deny)
    wait_until(lambda: talk(mesh.upstream_port) == b"", timeout=5, message="the deny to take effect")
    reached = mesh.app.accepted
    for _ in range(5):
        assert talk(mesh.upstream_port, b"secret") == b""
    assert mesh.app.accepted == reached  # denied before the app was dialled
    (intention,) = mesh.agent.get("/v1/connect/intentions")
    mesh.agent.http("DELETE", f"/v1/connect/intentions/{intention['ID']}")
    wait_until(lambda: talk(mesh.upstream_port) == b"ping|db", timeout=5, message="allowed again")
    web = scrape(mesh.web_metrics)  # type: ignore[attr-defined]
    assert web[series("proxy_supervisor_proxy_tunnel_reuses_total")] >= 5


def test_half_close_both_ways_over_a_tunnel(mesh: Mesh) -> None:
    # talk() ends its side first; the app answers after that end: both halves cross.
    for _ in range(3):
        assert talk(mesh.upstream_port, b"x" * 100_000) == b"x" * 100_000 + b"|db"


def test_tunnels_off_means_one_handshake_per_connection(tmp_path: Path) -> None:
    m = mesh_with(tmp_path, tunnels=False)
    try:
        m.start()
        for _ in range(10):
            assert talk(m.upstream_port) == b"ping|db"
        web = scrape(m.web_metrics)  # type: ignore[attr-defined]
        assert web[series("proxy_supervisor_proxy_tunnel_reuses_total")] == 0
        assert web[series("proxy_supervisor_proxy_handshake_seconds_count", **UPSTREAM)] >= 10
    finally:
        m.close()
