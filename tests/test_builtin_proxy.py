"""The built-in proxy end to end: real agents, real proxy processes, mutual TLS on loopback.

Services ``web`` (an upstream to ``db`` on a local port) and ``db`` (an echo app), both
with default managed proxies: bytes sent to web's upstream port come back from db's app.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.config.model import CAConfig
from supervisor.connect.ca import CertificateAuthority
from tests.conftest import free_port
from tests.helpers.agent import AgentProcess
from tests.helpers.apps import EchoApp, SinkSource, pattern_block, send_pattern
from tests.helpers.mesh import ALLOW, Mesh, talk
from tests.helpers.processes import pid_alive, wait_until
from tests.test_ca import operator_root


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        m.start()
        yield m
    finally:
        m.close()


def leaf_files(agent: AgentProcess, service: str, directory: Path) -> tuple[Path, Path, Path]:
    leaf = agent.get(f"/v1/agent/connect/ca/leaf/{service}")
    roots = agent.get("/v1/agent/connect/ca/roots")
    cert, key, ca = directory / f"{service}.crt", directory / f"{service}.key", directory / "roots.pem"
    cert.write_text(leaf["CertPEM"])
    key.write_text(leaf["PrivateKeyPEM"])
    ca.write_text("".join(root["RootCert"] for root in roots["Roots"]))
    return cert, key, ca


def tls_client(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if ca is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def tls_exchange(port: int, context: ssl.SSLContext, payload: bytes = b"hello") -> bytes:
    """A TLS round trip to a public listener; b"" when the proxy refuses it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(payload)
                # SSLSocket.shutdown would drop the TLS state; end only our TCP direction.
                socket.socket.shutdown(tls, socket.SHUT_WR)
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return data
    except (OSError, ssl.SSLError):
        return b""


# -- the mesh ----------------------------------------------------------------------------------


def test_bytes_cross_the_mesh_and_intentions_decide(mesh: Mesh) -> None:
    assert talk(mesh.upstream_port, b"hello over mTLS") == b"hello over mTLS|db"
    assert "TLS identity updated" in mesh.proxy_log("db-proxy")
    mesh.agent.http(
        "POST", "/v1/connect/intentions", {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    )
    wait_until(lambda: talk(mesh.upstream_port) == b"", timeout=5, message="the deny to take effect")
    reached = mesh.app.accepted
    for _ in range(5):
        assert talk(mesh.upstream_port) == b""
    assert mesh.app.accepted == reached  # denied before the app saw a connection
    assert "Matched intention: web => db (deny)" in mesh.proxy_log("db-proxy")
    (ixn,) = mesh.agent.get("/v1/connect/intentions")
    mesh.agent.http("DELETE", f"/v1/connect/intentions/{ixn['ID']}")
    wait_until(
        lambda: talk(mesh.upstream_port) == b"ping|db", timeout=5, message="traffic after allowing again"
    )


def test_prepared_query_upstream(mesh: Mesh) -> None:
    query_port = free_port()
    mesh.agent.http("POST", "/v1/query", {"Name": "db-query", "Service": {"Service": "db"}})
    mesh.write_web(
        [
            {"destination_name": "db", "local_bind_port": mesh.upstream_port},
            {
                "destination_name": "db-query",
                "destination_type": "prepared_query",
                "local_bind_port": query_port,
            },
        ]
    )
    wait_until(lambda: talk(query_port) == b"ping|db", timeout=15, message="the prepared-query upstream")
    mesh.agent.http(
        "POST", "/v1/connect/intentions", {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    )
    wait_until(lambda: talk(query_port) == b"", timeout=5, message="the deny through the query upstream")


# -- the public listener ---------------------------------------------------------------------------


def test_public_listener_requires_an_authorized_client_certificate(mesh: Mesh, tmp_path: Path) -> None:
    port = mesh.public_port()
    reached = mesh.app.accepted
    cert, key, ca = leaf_files(mesh.agent, "curious", tmp_path)

    assert tls_exchange(port, tls_client(ca)) == b""  # no client certificate
    counter = itertools.count(1)
    stranger = CertificateAuthority(None, "dc1", lambda: next(counter))
    stranger.start(CAConfig())
    foreign = stranger.sign_leaf("web")
    (tmp_path / "f.crt").write_text(foreign.cert_pem)
    (tmp_path / "f.key").write_text(foreign.key_pem)
    assert tls_exchange(port, tls_client(ca, tmp_path / "f.crt", tmp_path / "f.key")) == b""  # another CA
    assert mesh.app.accepted == reached

    # a valid identity is allowed by default, denied by an intention
    assert tls_exchange(port, tls_client(ca, cert, key)) == b"hello|db"
    mesh.agent.http(
        "POST", "/v1/connect/intentions", {"SourceName": "curious", "DestinationName": "db", "Action": "deny"}
    )
    wait_until(lambda: tls_exchange(port, tls_client(ca, cert, key)) == b"", timeout=5)
    denied_from = mesh.app.accepted
    for _ in range(3):
        assert tls_exchange(port, tls_client(ca, cert, key)) == b""
    assert mesh.app.accepted == denied_from  # a denied identity never reaches the app


def test_no_alpn_h2(mesh: Mesh, tmp_path: Path) -> None:
    cert, key, ca = leaf_files(mesh.agent, "web", tmp_path)
    context = tls_client(ca, cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", mesh.public_port()), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            assert tls.selected_alpn_protocol() is None
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_external_tls_client_with_an_agent_leaf(mesh: Mesh, tmp_path: Path) -> None:
    cert, key, ca = leaf_files(mesh.agent, "web", tmp_path)
    client = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{mesh.public_port()}",
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-CAfile",
            str(ca),
            "-verify_return_error",
            "-quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"from openssl\n")
        client.stdin.flush()
        assert client.stdout.readline() == b"from openssl\n"  # echoed by db's app through the proxy
    finally:
        client.kill()
        client.wait()
        for stream in (client.stdin, client.stdout, client.stderr):
            if stream is not None:
                stream.close()


def test_handshake_timeout_drops_silent_clients(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, db_config={"handshake_timeout_ms": 300})
    try:
        mesh.start()
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", mesh.public_port()), timeout=5) as silent:
            assert silent.recv(10) == b""  # the proxy hung up on us
        assert 0.25 <= time.monotonic() - started < 3
        assert "TLS handshake took longer than allowed" in mesh.proxy_log("db-proxy")
    finally:
        mesh.close()


# -- upstreams -------------------------------------------------------------------------------------


def register_sidecar(agent: AgentProcess, name: str, port: int, destination: str, **extra: Any) -> None:
    body = {
        "Name": name,
        "Kind": "connect-proxy",
        "Port": port,
        "Address": "127.0.0.1",
        "Proxy": {"DestinationServiceName": destination, **extra.pop("proxy", {})},
        **extra,
    }
    status, _, message = agent.http("PUT", "/v1/agent/service/register", body)
    assert status == 200, message


def test_upstream_checks_the_server_identity(tmp_path: Path) -> None:
    # Bound first: a port picked for the agent afterwards cannot be this one.
    impostor = socket.socket()
    impostor.bind(("127.0.0.1", 0))
    impostor.listen()
    agent = AgentProcess(tmp_path, extra={**ALLOW, "bind_addr": "127.0.0.1"})
    upstream_port = free_port()
    agent.write(
        "web.json",
        {
            "service": {
                "name": "web",
                "port": 8080,
                "connect": {
                    "proxy": {"upstreams": [{"destination_name": "db", "local_bind_port": upstream_port}]}
                },
            }
        },
    )
    try:
        agent.start()
        agent.wait_state("web-proxy", "running")
        cert, key, ca = leaf_files(agent, "cache", tmp_path)  # a real leaf, but for "cache"
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(str(cert), str(key))
        server.load_verify_locations(str(ca))
        server.verify_mode = ssl.CERT_REQUIRED

        def serve() -> None:
            try:
                conn, _ = impostor.accept()
                with server.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"secret from the impostor")
            except (OSError, ssl.SSLError):
                pass

        threading.Thread(target=serve, daemon=True).start()
        register_sidecar(agent, "db-impostor", int(impostor.getsockname()[1]), "db")
        log = agent.data_dir / "proxy" / "logs" / "web-proxy-stderr.log"  # type: ignore[operator]
        wait_until(
            lambda: talk(upstream_port) == b"" and "peer certificate mismatch" in log.read_text(), timeout=15
        )
        assert "/svc/cache" in log.read_text()
    finally:
        impostor.close()
        agent.kill_everything()


def test_connect_timeout_is_one_budget(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, extra={**ALLOW, "bind_addr": "127.0.0.1"})
    upstream_port = free_port()
    upstream = {
        "destination_name": "db",
        "local_bind_port": upstream_port,
        "config": {"connect_timeout_ms": 400},
    }
    agent.write(
        "web.json",
        {"service": {"name": "web", "port": 8080, "connect": {"proxy": {"upstreams": [upstream]}}}},
    )
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts TCP, never speaks TLS
    try:
        agent.start()
        agent.wait_state("web-proxy", "running")
        register_sidecar(agent, "db-silent", int(silent.getsockname()[1]), "db")
        wait_until(lambda: agent.get("/v1/health/connect/db?passing"), timeout=10)
        time.sleep(0.5)  # the proxy's discovery watch picks the instance up
        started = time.monotonic()
        assert talk(upstream_port) == b""
        assert 0.35 <= time.monotonic() - started < 3
    finally:
        silent.close()
        agent.kill_everything()


def test_random_healthy_instances_and_a_dead_one_drops_out(mesh: Mesh, tmp_path: Path) -> None:
    second_app = EchoApp(trailer=b"|db2")
    sidecar_port = free_port()
    register_sidecar(
        mesh.agent,
        "db2-sidecar",
        sidecar_port,
        "db",
        proxy={"LocalServicePort": second_app.port},
        Check={"TCP": f"127.0.0.1:{sidecar_port}", "Interval": "200ms"},
    )
    env = dict(os.environ, CONSUL_HTTP_ADDR=mesh.agent.address)
    with open(tmp_path / "sidecar.log", "wb") as sidecar_log:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "connect", "proxy", "-proxy-id", "db2-sidecar"],
            env=env,
            stderr=sidecar_log,
            start_new_session=True,
        )
    try:
        wait_until(lambda: len(mesh.agent.get("/v1/health/connect/db?passing")) == 2, timeout=15)
        answers = {talk(mesh.upstream_port) for _ in range(40)}
        assert answers == {b"ping|db", b"ping|db2"}  # a random instance per connection
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(10) == 0  # clean exit
        wait_until(lambda: len(mesh.agent.get("/v1/health/connect/db?passing")) == 1, timeout=5)
        time.sleep(0.3)
        assert {talk(mesh.upstream_port) for _ in range(20)} == {b"ping|db"}
        assert "stopping (SIGTERM)" in (tmp_path / "sidecar.log").read_text()
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
        sidecar.wait()
        second_app.close()


# -- live changes ----------------------------------------------------------------------------------


def test_live_upstream_and_listener_changes_without_restart(mesh: Mesh) -> None:
    web_pid, db_pid = mesh.agent.proxies()["web-proxy"]["Pid"], mesh.agent.proxies()["db-proxy"]["Pid"]
    cache = EchoApp(trailer=b"|cache")
    try:
        mesh.agent.write(
            "cache.json", {"service": {"name": "cache", "port": cache.port, "connect": {"proxy": {}}}}
        )
        extra_port, moved_port = free_port(), free_port()
        base = {"destination_name": "db", "local_bind_port": mesh.upstream_port}
        # added
        mesh.write_web([base, {"destination_name": "cache", "local_bind_port": extra_port}])
        wait_until(lambda: talk(extra_port) == b"ping|cache", timeout=20, message="the added upstream")
        # re-pointed: the same port now leads to db
        mesh.write_web([base, {"destination_name": "db", "local_bind_port": extra_port}])
        wait_until(lambda: talk(extra_port) == b"ping|db", timeout=10, message="the re-pointed upstream")
        # re-ported
        mesh.write_web([base, {"destination_name": "db", "local_bind_port": moved_port}])
        wait_until(lambda: talk(moved_port) == b"ping|db", timeout=10, message="the re-ported upstream")
        assert talk(extra_port, timeout=2) == b""
        # removed
        mesh.write_web([base])
        wait_until(lambda: talk(moved_port, timeout=2) == b"", timeout=10, message="the removed upstream")
        # the public listener moves
        old_public, new_public = mesh.public_port(), free_port()
        mesh.write_db({"bind_port": new_public})
        wait_until(
            lambda: mesh.public_port() == new_public and talk(mesh.upstream_port) == b"ping|db", timeout=10
        )
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", old_public), timeout=2).close()
        proxies = mesh.agent.proxies()
        assert (proxies["web-proxy"]["Pid"], proxies["db-proxy"]["Pid"]) == (web_pid, db_pid)
        assert proxies["web-proxy"]["Restarts"] == 0 and proxies["db-proxy"]["Restarts"] == 0
    finally:
        cache.close()


class Chatter(threading.Thread):
    """A long-lived connection through the mesh that exchanges a message every 50 ms."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.exchanges = 0
        self.error: Exception | None = None
        self.running = True

    def run(self) -> None:
        try:
            while self.running:
                message = f"m{self.exchanges}".encode()
                self.sock.sendall(message)
                received = b""
                while len(received) < len(message):
                    received += self.sock.recv(64)
                assert received == message
                self.exchanges += 1
                time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    def stop(self) -> None:
        self.running = False
        self.join(5)
        self.sock.close()


def test_leaf_renewal_and_root_rotation_while_traffic_flows(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, extra={"connect": {**ALLOW["connect"], "ca_config": {"leaf_cert_ttl": "10s"}}})
    try:
        mesh.start()
        chatter = Chatter(mesh.upstream_port)
        chatter.start()
        renewals = mesh.proxy_log("web-proxy").count("TLS identity updated (leaf certificate)")
        wait_until(
            lambda: mesh.proxy_log("web-proxy").count("TLS identity updated (leaf certificate)") > renewals,
            timeout=15,
            message="a leaf renewal",
        )
        assert talk(mesh.upstream_port) == b"ping|db"  # new connections use the new leaf
        key, cert = operator_root()
        mesh.agent.write(
            "00-agent.json",
            {
                **mesh.agent.base,
                "connect": {
                    **ALLOW["connect"],
                    "ca_config": {"leaf_cert_ttl": "10s", "private_key": key, "root_cert": cert},
                },
            },
        )
        deadline = time.monotonic() + 4
        failures = 0
        while time.monotonic() < deadline:  # connections keep working through the rotation
            failures += talk(mesh.upstream_port) != b"ping|db"
        wait_until(lambda: "CA root rotated" in mesh.agent.current_log(), timeout=10)
        assert talk(mesh.upstream_port) == b"ping|db"
        assert failures == 0
        assert chatter.error is None and chatter.is_alive()
        before = chatter.exchanges
        wait_until(lambda: chatter.exchanges > before + 5, timeout=5)
        chatter.stop()
        assert chatter.error is None
    finally:
        mesh.close()


# -- the byte path ---------------------------------------------------------------------------------


def test_half_close_propagates_both_ways(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.upstream_port), timeout=5) as sock:
        sock.sendall(b"first")
        assert sock.recv(5) == b"first"  # the connection is open both ways
        sock.shutdown(socket.SHUT_WR)  # our end of stream reaches the app ...
        rest = b""
        while chunk := sock.recv(100):
            rest += chunk
        assert rest == b"|db"  # ... which still answers, and then its end reaches us


@pytest.mark.slow
def test_one_gib_each_way_with_matching_sha256(tmp_path: Path) -> None:
    size = 1 << 30
    app = SinkSource(size)
    mesh = Mesh(tmp_path)
    try:
        mesh.write_db({}, app_port=app.port)
        mesh.agent.start()
        mesh.agent.wait_state("web-proxy", "running")
        mesh.agent.wait_state("db-proxy", "running")
        wait_until(lambda: mesh.agent.get("/v1/health/connect/db?passing"), timeout=10)
        time.sleep(0.5)
        sock = socket.create_connection(("127.0.0.1", mesh.upstream_port), timeout=60)
        received: dict[str, Any] = {}

        def receive() -> None:
            digest, count = hashlib.sha256(), 0
            while data := sock.recv(1 << 20):
                digest.update(data)
                count += len(data)
            received.update(bytes=count, sha256=digest.hexdigest())

        reader = threading.Thread(target=receive)
        reader.start()
        sent = send_pattern(sock, size, b"client")
        reader.join(120)
        sock.close()
        wait_until(lambda: app.results, timeout=30)
        expected_from_app = hashlib.sha256()
        block = pattern_block(b"app")
        for _ in range(size // len(block)):
            expected_from_app.update(block)
        assert app.results[0] == {"bytes": size, "sha256": sent}
        assert received == {"bytes": size, "sha256": expected_from_app.hexdigest()}
    finally:
        mesh.close()
        app.close()


def test_thousand_concurrent_connections(mesh: Mesh) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    try:
        for index in range(1000):
            sock = socket.create_connection(("127.0.0.1", mesh.upstream_port), timeout=10)
            sock.sendall(f"c{index:04d}".encode())
            socks.append(sock)
        for index, sock in enumerate(socks):
            assert sock.recv(5) == f"c{index:04d}".encode()
        assert mesh.app.accepted >= 1000
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_clean_exit_and_bind_failure_is_fatal(mesh: Mesh) -> None:
    entry = mesh.agent.proxies()["db-proxy"]
    os.kill(entry["Pid"], signal.SIGTERM)
    mesh.agent.wait_proxy("db-proxy", lambda e: e["LastExit"] == "exited with code 0", timeout=10)
    assert "stopping (SIGTERM)" in mesh.proxy_log("db-proxy")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        mesh.write_db({"bind_port": int(holder.getsockname()[1])})
        mesh.agent.wait_proxy("db-proxy", lambda e: e["LastExit"] == "exited with code 1", timeout=15)
        assert "cannot listen on 127.0.0.1" in mesh.proxy_log("db-proxy")
        mesh.agent.wait_state("db-proxy", "backoff", timeout=15)
    finally:
        holder.close()


def test_idle_pid_stays_the_same_across_config_reads(mesh: Mesh) -> None:
    pid = mesh.agent.proxies()["web-proxy"]["Pid"]
    assert pid_alive(pid)
    mesh.agent.cli("reload")
    time.sleep(0.5)
    assert mesh.agent.proxies()["web-proxy"]["Pid"] == pid
    assert json.loads(json.dumps(mesh.agent.proxies()))["web-proxy"]["Restarts"] == 0


def test_upstream_resumes_tls_sessions(tmp_path: Path) -> None:
    # Without tunnels (which need no second handshake at all), each connection dials.
    mesh = Mesh(tmp_path, extra={"log_level": "DEBUG"})
    mesh.write_web([{"destination_name": "db", "local_bind_port": mesh.upstream_port}], tunnels=False)
    try:
        mesh.start()
        for _ in range(5):
            assert talk(mesh.upstream_port) == b"ping|db"

        def resumed_dials() -> int:
            return mesh.proxy_log("web-proxy").count("(TLS session resumed: True)")

        # Tickets arrive after the first handshake; every later dial to the same instance
        # skips certificate signing and checking.
        wait_until(lambda: resumed_dials() >= 4, timeout=10, message="resumed upstream handshakes")
        full = mesh.proxy_log("web-proxy").count("(TLS session resumed: False)")
        assert full <= 2, f"{full} full handshakes for 6 connections to one instance"
    finally:
        mesh.close()


def test_a_stopped_proxy_leaves_discovery_and_shows_in_proxies(mesh: Mesh) -> None:
    """Regression (issue 9): after ``kill -STOP`` its listening check stayed passing (the
    kernel still completes handshakes into the backlog) and traffic blackholed."""
    pid = mesh.agent.proxies()["db-proxy"]["Pid"]

    def discoverable() -> bool:
        return bool(mesh.agent.get("/v1/health/connect/db?passing"))

    assert discoverable()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not discoverable(), timeout=12, interval=0.2, message="db to leave discovery")
        entry = mesh.agent.proxies()["db-proxy"]
        assert entry["State"] == "running" and entry["Check"]["Status"] == "critical"
        assert "is stopped" in entry["Check"]["Output"]
        row = next(
            line for line in mesh.agent.cli("proxies").stdout.splitlines() if line.startswith("db-proxy")
        )
        assert "NOT SERVING" in row
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(discoverable, timeout=12, interval=0.2, message="db to come back")
    assert talk(mesh.upstream_port) == b"ping|db"
