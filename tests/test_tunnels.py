"""Reusable tunnels between two built-in proxies (``builtin_proxy/frames.py``,
``tunnels.py``) on a real agent: client connections reuse a pooled mutual-TLS tunnel
instead of a handshake each, every connection is still authorized (a new deny stops the
next one on an established tunnel, before the app is dialled), and ``tunnels: false``
falls back to one TLS connection per client connection."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builtin_proxy.frames import ALPN, Frame, FrameReader, header
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
    # (the first denied connection rode the pooled tunnel; the denied peer was then told to go)
    assert web[series("proxy_supervisor_proxy_tunnel_reuses_total")] >= 1


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


class Banner:
    """An app that speaks first and closes at once (so its side of a stream ends first)."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.served += 1
            conn.sendall(b"hi")
            conn.close()

    def close(self) -> None:
        self.sock.close()


def tunnel_peer(mesh: Mesh, tmp_path: Path) -> ssl.SSLSocket:
    """A raw tunnel to db's public listener, as web's proxy would open one."""
    leaf = mesh.agent.get("/v1/agent/connect/ca/leaf/web")
    roots = mesh.agent.get("/v1/agent/connect/ca/roots")
    (tmp_path / "web.pem").write_text(leaf["CertPEM"])
    (tmp_path / "web.key").write_text(leaf["PrivateKeyPEM"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata="".join(r["RootCert"] for r in roots["Roots"]))
    context.load_cert_chain(tmp_path / "web.pem", tmp_path / "web.key")
    context.set_alpn_protocols([ALPN])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", mesh.public_port()), timeout=5))
    assert sock.selected_alpn_protocol() == ALPN
    return sock


def read_stream(sock: ssl.SSLSocket) -> tuple[bytes, str]:
    """The data of one stream from the public side, until its FIN or RESET."""
    reader, data, end = FrameReader(), bytearray(), ""

    def frame(kind: Frame) -> bool:
        nonlocal end
        end = kind.name
        return True

    while not end:
        chunk = sock.recv(65536)
        assert chunk, "the tunnel closed"
        reader.feed(memoryview(chunk), lambda payload: data.extend(payload), frame)
    return bytes(data), end


def test_the_next_open_in_the_same_read_as_the_last_fin_is_served(mesh: Mesh, tmp_path: Path) -> None:
    banner = Banner()
    try:
        mesh.write_db({}, app_port=banner.port)
        wait_until(lambda: talk(mesh.upstream_port) == b"hi", timeout=10, message="db pointed at the banner")
        peer = tunnel_peer(mesh, tmp_path)
        peer.sendall(header(Frame.OPEN))
        assert read_stream(peer) == (b"hi", "FIN")  # the app ended its side first
        # Our FIN ends the stream; the next OPEN rides in the same write (and read).
        peer.sendall(header(Frame.FIN) + header(Frame.OPEN) + header(Frame.FIN))
        assert read_stream(peer) == (b"hi", "FIN")
        peer.close()
    finally:
        banner.close()


def test_open_data_and_fin_in_one_write_are_served_and_leak_nothing(mesh: Mesh, tmp_path: Path) -> None:
    """A peer that writes a whole short stream at once (a hostile test's find: the FIN was
    taken before the DATA and the tunnel and the app connection stayed open for good)."""
    pid = mesh.agent.proxies()["db-proxy"]["Pid"]
    peer = tunnel_peer(mesh, tmp_path)
    stream = header(Frame.OPEN) + header(Frame.DATA, 4) + b"ping" + header(Frame.FIN)
    try:
        for _ in range(3):
            peer.sendall(stream)
            assert read_stream(peer) == (b"ping|db", "FIN")  # served; the tunnel reusable after it
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        for _ in range(30):
            peer.sendall(stream)
            assert read_stream(peer) == (b"ping|db", "FIN")
        wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds, timeout=5, message="no fd kept")
    finally:
        peer.close()


def test_a_denied_peer_cannot_hold_a_tunnel_open(mesh: Mesh, tmp_path: Path) -> None:
    deny = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    mesh.agent.http("POST", "/v1/connect/intentions", deny)
    wait_until(lambda: talk(mesh.upstream_port) == b"", timeout=5, message="the deny to take effect")
    peer = tunnel_peer(mesh, tmp_path)
    peer.settimeout(5)
    assert peer.recv(1) == b""  # closed by the public side without an OPEN even being sent
    peer.close()


def test_a_peer_denied_on_an_established_tunnel_is_told_to_go(mesh: Mesh, tmp_path: Path) -> None:
    peer = tunnel_peer(mesh, tmp_path)  # (made while web => db is allowed)
    try:
        peer.sendall(header(Frame.OPEN) + header(Frame.DATA, 4) + b"ping" + header(Frame.FIN))
        assert read_stream(peer) == (b"ping|db", "FIN")
        deny = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
        mesh.agent.http("POST", "/v1/connect/intentions", deny)
        wait_until(lambda: talk(mesh.upstream_port) == b"", timeout=5, message="the deny to take effect")
        peer.sendall(header(Frame.OPEN))
        assert read_stream(peer) == (b"", "RESET")  # refused, the app never dialled
        peer.sendall(header(Frame.RESET))
        assert read_stream(peer) == (b"", "GOAWAY")  # and the denied peer may not keep the tunnel
    finally:
        peer.close()


def test_an_oversized_frame_closes_the_tunnel(mesh: Mesh, tmp_path: Path) -> None:
    peer = tunnel_peer(mesh, tmp_path)
    peer.sendall(header(Frame.OPEN) + header(Frame.DATA, 1 << 23))
    peer.settimeout(5)
    received = b""
    while chunk := peer.recv(65536):
        received += chunk
    assert Frame.RESET not in received[:1]  # no stream was served: the tunnel just closed
    peer.close()


def test_a_pooled_tunnel_to_a_hung_peer_fails_like_a_dial(tmp_path: Path) -> None:
    m = Mesh(tmp_path)
    upstream = {
        "destination_name": "db",
        "local_bind_port": m.upstream_port,
        "config": {"connect_timeout_ms": 1000},
    }
    m.write_web([upstream])
    try:
        m.start()
        assert talk(m.upstream_port) == b"ping|db"  # a tunnel is pooled now
        db = m.agent.proxies()["db-proxy"]["Pid"]
        os.kill(db, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert talk(m.upstream_port, timeout=10) == b""
            assert time.monotonic() - started < 4  # connect_timeout_ms, not for ever
        finally:
            os.kill(db, signal.SIGCONT)
        wait_until(lambda: talk(m.upstream_port) == b"ping|db", timeout=15, message="traffic again")
    finally:
        m.close()


@pytest.mark.parametrize("tunnels", [True, False])
def test_an_unreachable_app_is_a_dial_rejection(tmp_path: Path, tunnels: bool) -> None:
    m = mesh_with(tmp_path, tunnels=tunnels)
    try:
        m.start()
        m.write_db(m.db_config, app_port=free_port())  # nothing listens there
        wait_until(lambda: talk(m.upstream_port) == b"", timeout=10, message="db pointed at nothing")
        rejected = series("proxy_supervisor_proxy_connections_rejected_total", reason="dial")
        assert scrape(m.db_config["telemetry"])[rejected] >= 1
        assert "cannot reach the local service" in m.proxy_log("db-proxy")
    finally:
        m.close()
