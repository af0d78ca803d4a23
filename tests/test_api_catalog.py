"""Discovery and health on a real agent: checks, managed-proxy listening checks, catalog
and health endpoints, the registration API, and prepared queries."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, fake_proxy
from tests.helpers.processes import wait_until

REPO = Path(__file__).resolve().parents[1]
FORWARDER = [sys.executable, str(REPO / "examples" / "custom-proxy" / "tcp_forward.py")]
ALLOW = {"connect": {"proxy": {"allow_managed_root": True, "allow_managed_api_registration": True}}}


class HttpApp:
    """A tiny HTTP app on loopback whose status code the test controls."""

    def __init__(self) -> None:
        self.status = 200
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"status {app.status}\n".encode()
                self.send_response(app.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app() -> Iterator[HttpApp]:
    server = HttpApp()
    yield server
    server.close()


@pytest.fixture
def agent(tmp_path: Path, app: HttpApp) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path, extra=ALLOW)
    process.write(
        "services.json",
        {
            "services": [
                {
                    "name": "web",
                    "port": app.port,
                    "tags": ["v1"],
                    "checks": [
                        {
                            "id": "web-http",
                            "http": f"http://127.0.0.1:{app.port}/health",
                            "interval": "200ms",
                        },
                        {"id": "web-tcp", "tcp": f"127.0.0.1:{app.port}", "interval": "200ms"},
                    ],
                    "connect": {"proxy": {"command": FORWARDER, "config": {"bind_address": "127.0.0.1"}}},
                },
                {"name": "batch", "port": 9, "check": {"id": "batch-ttl", "ttl": "2s"}},
                {
                    "name": "legacy-db-proxy",
                    "kind": "connect-proxy",
                    "port": 8181,
                    "proxy_destination": "legacy-db",
                },
            ]
        },
    )
    process.start()
    process.wait_state("web-proxy", "running")
    yield process
    process.kill_everything()


def statuses(agent: AgentProcess, path: str) -> dict[str, str]:
    return {check["CheckID"]: check["Status"] for entry in agent.get(path) for check in entry["Checks"]}


def test_tcp_http_and_ttl_checks(agent: AgentProcess, app: HttpApp) -> None:
    wait_until(lambda: statuses(agent, "/v1/health/service/web").get("web-http") == "passing")
    checks = agent.get("/v1/agent/checks")
    assert checks["web-tcp"]["Status"] == "passing" and "Success" in checks["web-tcp"]["Output"]
    assert checks["web-http"]["ServiceName"] == "web" and "200" in checks["web-http"]["Output"]
    app.status = 429
    wait_until(lambda: agent.get("/v1/agent/checks")["web-http"]["Status"] == "warning")
    app.status = 500
    wait_until(lambda: agent.get("/v1/agent/checks")["web-http"]["Status"] == "critical")
    assert agent.get("/v1/health/service/web?passing") == []
    app.status = 200
    wait_until(lambda: agent.get("/v1/health/service/web?passing") != [])

    # TTL: critical until reported, expires back to critical
    assert checks["batch-ttl"]["Status"] == "critical"
    assert agent.http("PUT", "/v1/agent/check/pass/batch-ttl?note=all%20good")[0] == 200
    check = agent.get("/v1/agent/checks")["batch-ttl"]
    assert (check["Status"], check["Output"]) == ("passing", "all good")
    assert agent.http("PUT", "/v1/agent/check/warn/batch-ttl")[0] == 200
    assert agent.get("/v1/agent/checks")["batch-ttl"]["Status"] == "warning"
    assert (
        agent.http("PUT", "/v1/agent/check/update/batch-ttl", {"Status": "passing", "Output": "ok"})[0] == 200
    )
    wait_until(lambda: agent.get("/v1/agent/checks")["batch-ttl"]["Output"] == "TTL expired", timeout=5)
    assert agent.get("/v1/agent/checks")["batch-ttl"]["Status"] == "critical"
    assert agent.http("PUT", "/v1/agent/check/pass/nope")[0] == 404
    assert agent.http("PUT", "/v1/agent/check/pass/web-tcp")[0] == 400
    assert agent.http("PUT", "/v1/agent/check/update/batch-ttl", {"Status": "great"})[0] == 400


def test_managed_proxy_check_follows_the_process(agent: AgentProcess) -> None:
    check_id = "service:web-proxy"
    wait_until(lambda: agent.get("/v1/agent/checks")[check_id]["Status"] == "passing", timeout=5)
    check = agent.get("/v1/agent/checks")[check_id]
    assert check["Name"] == "Connect Proxy Listening" and check["ServiceID"] == "web-proxy"
    connect = agent.get("/v1/health/connect/web?passing=1")
    assert [entry["Service"]["ID"] for entry in connect] == ["web-proxy"]

    pid = agent.proxies()["web-proxy"]["Pid"]
    os.kill(pid, signal.SIGKILL)
    # critical without waiting for the next 10 s probe ...
    wait_until(lambda: agent.get("/v1/agent/checks")[check_id]["Status"] == "critical", timeout=2)
    # ... and passing again as soon as the restarted proxy listens
    wait_until(lambda: agent.get("/v1/agent/checks")[check_id]["Status"] == "passing", timeout=5)
    assert agent.proxies()["web-proxy"]["Pid"] != pid


def test_health_and_catalog_shapes(agent: AgentProcess) -> None:
    wait_until(lambda: agent.get("/v1/health/connect/web?passing"))
    (entry,) = agent.get("/v1/health/connect/web?passing")
    assert entry["Node"]["Node"] and entry["Node"]["Datacenter"] == "dc1" and entry["Node"]["Address"]
    assert entry["Service"]["Kind"] == "connect-proxy" and entry["Service"]["ProxyDestination"] == "web"
    assert entry["Service"]["Proxy"]["DestinationServiceName"] == "web"
    assert entry["Checks"][0]["CheckID"] == "serfHealth"
    (service,) = agent.get("/v1/health/service/web")
    assert (
        service["Service"]["Tags"] == ["v1"]
        and service["Service"]["Connect"]["Proxy"]["ExecMode"] == "daemon"
    )
    assert agent.get("/v1/health/service/web?tag=v1") and agent.get("/v1/health/service/web?tag=v2") == []
    services = agent.get("/v1/catalog/services")
    assert services["web"] == ["v1"] and services["web-proxy"] == [] and "legacy-db-proxy" in services
    (catalog,) = agent.get("/v1/catalog/connect/web")
    assert catalog["ServiceID"] == "web-proxy" and catalog["ServiceProxyDestination"] == "web"
    assert catalog["ServicePort"] == agent.proxies()["web-proxy"]["Port"]
    assert agent.get("/v1/catalog/service/web")[0]["ServicePort"] > 0
    # a hand-registered connect-proxy (1.2's proxy_destination) is discoverable for its destination
    assert [e["Service"]["ID"] for e in agent.get("/v1/health/connect/legacy-db")] == ["legacy-db-proxy"]
    assert agent.http("GET", "/v1/health/service/web?dc=elsewhere")[0] == 503
    assert agent.http("GET", "/v1/health/service/web?passing=maybe")[0] == 400
    assert agent.get("/v1/catalog/datacenters") == ["dc1"]
    assert agent.get("/v1/status/leader") == agent.address


def test_index_blocking_only_returns_on_a_relevant_change(agent: AgentProcess) -> None:
    _, headers, _ = agent.http("GET", "/v1/health/service/batch")
    index = headers["X-Consul-Index"]
    result: dict[str, Any] = {}

    def blocked() -> None:
        started = time.monotonic()
        result["response"] = agent.http("GET", f"/v1/health/service/batch?index={index}&wait=20s", timeout=40)
        result["elapsed"] = time.monotonic() - started

    waiter = threading.Thread(target=blocked)
    waiter.start()
    time.sleep(0.5)  # the web checks keep flipping meanwhile: not batch's business
    assert "response" not in result
    agent.http("PUT", "/v1/agent/check/pass/batch-ttl")
    waiter.join(20)
    status, new_headers, entries = result["response"]
    assert status == 200 and int(new_headers["X-Consul-Index"]) > int(index)
    assert entries[0]["Checks"][1]["Status"] == "passing"
    assert result["elapsed"] < 10


def test_registration_api(agent: AgentProcess) -> None:
    registration = {
        "ID": "api-1",
        "Name": "api",
        "Port": 7000,
        "Tags": ["blue"],
        "Meta": {"team": "x"},
        "Check": {"TTL": "30s", "CheckID": "api-ttl"},
    }
    assert agent.http("PUT", "/v1/agent/service/register", registration)[0] == 200
    assert agent.get("/v1/agent/services")["api-1"]["Tags"] == ["blue"]
    assert agent.get("/v1/health/service/api")[0]["Service"]["Meta"] == {"team": "x"}
    assert "api-ttl" in agent.get("/v1/agent/checks")
    # POST works too; a re-registration replaces the service
    assert agent.http("POST", "/v1/agent/service/register", {**registration, "Tags": ["green"]})[0] == 200
    assert agent.get("/v1/agent/services")["api-1"]["Tags"] == ["green"]
    # persisted: a restarted agent still has it
    agent.kill9()
    agent.start()
    assert agent.get("/v1/agent/services")["api-1"]["Tags"] == ["green"]
    assert agent.http("PUT", "/v1/agent/service/deregister/api-1")[0] == 200
    assert "api-1" not in agent.get("/v1/agent/services")
    assert agent.http("PUT", "/v1/agent/service/deregister/api-1")[0] == 404


def test_api_registered_connect_proxy_is_discoverable(agent: AgentProcess) -> None:
    body = {
        "Name": "cache-sidecar",
        "Kind": "connect-proxy",
        "Port": 9999,
        "Proxy": {"DestinationServiceName": "cache"},
    }
    assert agent.http("PUT", "/v1/agent/service/register", body)[0] == 200
    (entry,) = agent.get("/v1/health/connect/cache")
    assert (
        entry["Service"]["ID"] == "cache-sidecar"
        and entry["Service"]["Proxy"]["DestinationServiceName"] == "cache"
    )
    legacy = {"Name": "old-sidecar", "Kind": "connect-proxy", "Port": 9998, "ProxyDestination": "old"}
    assert agent.http("PUT", "/v1/agent/service/register", legacy)[0] == 200
    assert [e["ServiceID"] for e in agent.get("/v1/catalog/connect/old")] == ["old-sidecar"]


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"Name": "x", "Port": "eighty"}, 400, "expected an integer"),
        ({"ID": "../etc", "Name": "x"}, 400, "cannot be used"),
        ({"Name": "a/b"}, 400, "cannot be used"),
        ({"Port": 1}, 400, "Name: required key is missing"),
        ({"Name": "web"}, 409, "already defined"),
        ({"Name": "x", "ID": "web-proxy"}, 409, "managed proxy of web"),
        ([], 400, "expected an object"),
    ],
)
def test_bad_registrations(agent: AgentProcess, body: Any, status: int, text: str) -> None:
    code, _, message = agent.http("PUT", "/v1/agent/service/register", body)
    assert code == status and text in message


def test_managed_proxy_registration_is_refused_unless_allowed(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, extra={"connect": {"proxy": {"allow_managed_root": True}}})
    try:
        agent.start()
        body = {"Name": "api", "Connect": {"Proxy": {"Command": fake_proxy("run", tmp_path / "s")}}}
        status, _, message = agent.http("PUT", "/v1/agent/service/register", body)
        assert (status, message) == (400, "Managed proxy registration via the API is disallowed.")
        assert agent.proxies() == {}
    finally:
        agent.kill_everything()


def test_api_registration_with_a_managed_proxy(agent: AgentProcess, tmp_path: Path) -> None:
    state = tmp_path / "api.state"
    body = {"Name": "api", "Port": 7000, "Connect": {"Proxy": {"Command": fake_proxy("run", state)}}}
    assert agent.http("PUT", "/v1/agent/service/register", body)[0] == 200
    entry = agent.wait_state("api-proxy", "running")
    assert agent.get("/v1/agent/services")["api-proxy"]["Kind"] == "connect-proxy"
    status, _, message = agent.http("PUT", "/v1/agent/service/deregister/api-proxy")
    assert status == 400 and message.startswith("Managed proxy service cannot be deregistered directly")
    # survives an agent restart: the same proxy process is adopted
    agent.kill9()
    agent.start()
    assert agent.wait_state("api-proxy", "running")["Pid"] == entry["Pid"]
    assert agent.http("PUT", "/v1/agent/service/deregister/api")[0] == 200
    wait_until(lambda: "api-proxy" not in agent.proxies())
    status, _, message = agent.http("PUT", "/v1/agent/service/deregister/web")
    assert status == 400 and "remove it there" in message


def test_prepared_queries(agent: AgentProcess) -> None:
    wait_until(lambda: agent.get("/v1/health/connect/web?passing"))
    status, _, created = agent.http(
        "POST", "/v1/query", {"Name": "web-q", "Service": {"Service": "web", "Tags": ["v1"]}}
    )
    assert status == 200
    query_id = created["ID"]
    (stored,) = agent.get(f"/v1/query/{query_id}")
    assert stored["Name"] == "web-q" and stored["Service"]["Tags"] == ["v1"]
    result = agent.get("/v1/query/web-q/execute")
    assert result["Service"] == "web" and [n["Service"]["ID"] for n in result["Nodes"]] == ["web"]
    assert result["Datacenter"] == "dc1"
    connect = agent.get("/v1/query/web-q/execute?connect=true")
    assert [n["Service"]["ID"] for n in connect["Nodes"]] == ["web-proxy"]
    excluded = agent.http(
        "PUT", f"/v1/query/{query_id}", {"Name": "web-q", "Service": {"Service": "web", "Tags": ["!v1"]}}
    )
    assert excluded[0] == 200 and agent.get("/v1/query/web-q/execute")["Nodes"] == []
    assert [q["ID"] for q in agent.get("/v1/query")] == [query_id]
    assert agent.http("POST", "/v1/query", {"Name": "web-q", "Service": {"Service": "x"}})[0] == 409
    assert agent.http("DELETE", f"/v1/query/{query_id}")[0] == 200
    assert agent.http("GET", "/v1/query/web-q/execute")[0] == 404
    assert agent.http("POST", "/v1/query", {"Service": {"Servce": "x"}})[0] == 400


def test_query_cli(agent: AgentProcess) -> None:
    wait_until(lambda: agent.get("/v1/health/connect/web?passing"))
    created = agent.cli("query", "create", "-name", "q1", "-service", "web", "-connect")
    assert created.returncode == 0 and created.stdout.startswith("Created prepared query ")
    listing = agent.cli("query", "list").stdout.splitlines()
    assert listing[0].split()[:3] == ["ID", "NAME", "SERVICE"] and "q1" in listing[1]
    executed = agent.cli("query", "execute", "q1").stdout.splitlines()
    assert executed[0].split() == ["SERVICE", "ID", "ADDRESS", "PORT", "KIND"]
    assert executed[1].split()[0] == "web-proxy" and executed[1].split()[-1] == "connect-proxy"
    assert agent.cli("query", "delete", "q1").returncode == 0
    assert agent.cli("query", "list").stdout == "No prepared queries.\n"


def test_discovery_is_served_while_a_client_misbehaves(agent: AgentProcess) -> None:
    # a client that opens a connection and sends half a request holds no agent resources
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as slow:
        slow.sendall(b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\n")
        assert agent.http("GET", "/v1/catalog/services")[0] == 200
