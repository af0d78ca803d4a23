"""The agent HTTP API that supervision needs, against a real agent on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, fake_proxy
from tests.helpers.processes import pid_alive, wait_until

ALLOW_ROOT = {"connect": {"proxy": {"allow_managed_root": True}}}


def web_service(statefile: Path, **config: Any) -> dict[str, Any]:
    return {
        "service": {
            "name": "web",
            "port": 8080,
            "tags": ["v1"],
            "connect": {
                "proxy": {
                    "command": fake_proxy("run", statefile),
                    "config": config,
                    "upstreams": [{"destination_name": "db", "local_bind_port": 9191}],
                }
            },
        }
    }


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path, extra=ALLOW_ROOT)
    process.write("web.json", web_service(tmp_path / "web.state"))
    process.write(
        "db.json",
        {
            "service": {
                "name": "db",
                "port": 5432,
                "connect": {"proxy": {"command": fake_proxy("run", tmp_path / "db.state")}},
            }
        },
    )
    process.start()
    process.wait_state("web-proxy", "running")
    yield process
    process.kill_everything()


def token_of(agent: AgentProcess, proxy_id: str) -> str:
    assert agent.data_dir is not None
    allocations = json.loads((agent.data_dir / "proxy" / "allocations.json").read_text())
    return str(allocations["Proxies"][proxy_id]["Token"])


def test_agent_self(agent: AgentProcess) -> None:
    data = agent.get("/v1/agent/self")
    assert data["Config"]["Datacenter"] == "dc1"
    assert data["Config"]["NodeID"] == agent.node_id()
    assert data["Config"]["Version"].startswith("1.5")
    assert data["DebugConfig"]["ConnectEnabled"] is True


def test_services_list_the_service_and_its_proxy(agent: AgentProcess) -> None:
    services = agent.get("/v1/agent/services")
    assert set(services) == {"web", "web-proxy", "db", "db-proxy"}
    web = services["web"]
    assert (web["ID"], web["Service"], web["Port"], web["Tags"], web["Kind"]) == (
        "web",
        "web",
        8080,
        ["v1"],
        "",
    )
    assert web["Connect"]["Proxy"]["ExecMode"] == "daemon"
    assert web["Connect"]["Proxy"]["Upstreams"][0]["DestinationName"] == "db"
    proxy = services["web-proxy"]
    assert proxy["Kind"] == "connect-proxy" and proxy["Service"] == "web-proxy"
    assert proxy["Proxy"]["DestinationServiceName"] == "web"
    assert proxy["Proxy"]["LocalServicePort"] == 8080
    assert proxy["Port"] == agent.proxies()["web-proxy"]["Port"]


def test_proxy_config_shape_and_token_scope(agent: AgentProcess) -> None:
    web_token, db_token = token_of(agent, "web-proxy"), token_of(agent, "db-proxy")
    status, headers, data = agent.http("GET", "/v1/agent/connect/proxy/web-proxy", token=web_token)
    assert status == 200
    assert data["ProxyServiceID"] == "web-proxy" and data["TargetServiceName"] == "web"
    assert data["Config"]["bind_port"] == agent.proxies()["web-proxy"]["Port"]
    assert data["Config"]["local_service_address"] == "127.0.0.1:8080"
    assert data["Upstreams"][0]["LocalBindPort"] == 9191
    assert headers["X-Consul-ContentHash"] == data["ContentHash"]

    # another proxy's token may not read web's config, nor the agent's state
    assert agent.http("GET", "/v1/agent/connect/proxy/web-proxy", token=db_token)[0] == 403
    assert agent.http("GET", "/v1/agent/connect/proxies", token=db_token)[0] == 403
    assert agent.http("PUT", "/v1/agent/reload", token=db_token)[0] == 403
    # a proxy sees only its own registrations
    assert set(agent.get("/v1/agent/services", token=web_token)) == {"web", "web-proxy"}
    assert agent.http("GET", "/v1/agent/service/db", token=web_token)[0] == 403
    # Authorization: Bearer and ?token= work as in Consul
    status, _, _ = agent.http("GET", f"/v1/agent/connect/proxy/web-proxy?token={db_token}")
    assert status == 403


def test_errors_are_clear_4xx(agent: AgentProcess) -> None:
    status, _, body = agent.http("GET", "/v1/agent/connect/proxy/nope-proxy")
    assert status == 404 and body == "unknown proxy service ID: nope-proxy"
    assert agent.http("GET", "/v1/agent/service/nope")[0] == 404
    status, _, body = agent.http("GET", "/v1/agent/connect/proxy/web-proxy?hash=x&wait=soon")
    assert status == 400 and "Invalid wait time" in body
    status, _, body = agent.http("GET", "/v1/agent/service/web?index=-1")
    assert status == 400 and "Invalid index" in body
    status, headers, _ = agent.http("GET", "/v1/agent/reload")
    assert status == 405 and "PUT" in headers["Allow"]
    assert agent.http("GET", "/v1/nothing/here")[0] == 404


def test_hash_blocking_on_proxy_config(agent: AgentProcess, tmp_path: Path) -> None:
    _, _, first = agent.http("GET", "/v1/agent/connect/proxy/web-proxy")
    current = first["ContentHash"]

    # an unknown hash returns at once, even with a long wait
    started = time.monotonic()
    agent.http("GET", "/v1/agent/connect/proxy/web-proxy?hash=deadbeef&wait=10m")
    assert time.monotonic() - started < 2

    # an unchanged hash blocks for the wait time
    started = time.monotonic()
    _, _, same = agent.http("GET", f"/v1/agent/connect/proxy/web-proxy?hash={current}&wait=300ms")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 5 and same["ContentHash"] == current

    # a config change (no restart) wakes the blocked caller with the new content
    result: dict[str, Any] = {}

    def blocked_call() -> None:
        result["started"] = time.monotonic()
        result["response"] = agent.http("GET", f"/v1/agent/connect/proxy/web-proxy?hash={current}&wait=60s")
        result["ended"] = time.monotonic()

    caller = threading.Thread(target=blocked_call)
    caller.start()
    time.sleep(0.3)
    pid_before = agent.proxies()["web-proxy"]["Pid"]
    agent.write("web.json", web_service(tmp_path / "web.state", handshake_timeout_ms=2500))
    caller.join(30)
    status, headers, changed = result["response"]
    assert status == 200 and changed["Config"]["handshake_timeout_ms"] == 2500
    assert headers["X-Consul-ContentHash"] != current
    assert result["ended"] - result["started"] < 10
    assert agent.proxies()["web-proxy"]["Pid"] == pid_before  # config-only: no restart


def test_hash_blocking_on_agent_service(agent: AgentProcess) -> None:
    status, headers, data = agent.http("GET", "/v1/agent/service/web-proxy")
    assert status == 200 and headers["X-Consul-ContentHash"] == data["ContentHash"]
    started = time.monotonic()
    agent.http("GET", f"/v1/agent/service/web-proxy?hash={data['ContentHash']}&wait=200ms")
    assert time.monotonic() - started >= 0.2


def test_proxies_endpoint(agent: AgentProcess) -> None:
    entry = agent.proxies()["web-proxy"]
    assert entry["State"] == "running" and entry["TargetServiceID"] == "web"
    assert pid_alive(entry["Pid"]) and entry["Restarts"] == 0 and entry["LastExit"] is None
    assert entry["UptimeSeconds"] >= 0 and entry["StartedAt"].endswith("Z")
    assert entry["StdoutLog"].endswith("/proxy/logs/web-proxy-stdout.log")


def test_reload_accepts_put_and_post(agent: AgentProcess) -> None:
    assert agent.http("PUT", "/v1/agent/reload")[0] == 200
    assert agent.http("POST", "/v1/agent/reload")[0] == 200


def test_malformed_http_gets_a_4xx_and_the_agent_keeps_serving(agent: AgentProcess) -> None:
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"GET /v1/agent/self HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
            sock.sendall(raw)
            reply = sock.recv(4096)
        assert reply.split(b" ")[1][:1] in (b"4", b"5") and b" 500 " not in reply
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        sock.sendall(b"PUT /v1/agent/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        assert b" 413 " in sock.recv(4096)
    assert agent.http("GET", "/v1/agent/self")[0] == 200


def test_leave_stops_every_proxy_then_the_agent(agent: AgentProcess) -> None:
    pids = [entry["Pid"] for entry in agent.proxies().values()]
    result = agent.cli("leave")
    assert result.returncode == 0, result.stderr
    assert "Graceful leave complete" in result.stdout
    assert agent.wait_exit() == 0
    wait_until(lambda: not any(pid_alive(pid) for pid in pids))
