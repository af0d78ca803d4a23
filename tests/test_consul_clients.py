"""Consul's client libraries, unchanged, against a real agent: py-consul (Python) and the
npm ``consul`` package (Node.js) -- the clients people run today. Every endpoint either
library has and this agent serves is called; the endpoints this agent does not implement
must be a 501 the clients report as an error, never a 404 read as "absent".

The Node.js client is installed by ``scripts/test`` (``npm ci`` in tests/clients/node);
where npm is missing the Node.js test is skipped, unless PROXY_SUPERVISOR_REQUIRE_NODE=1
(set by scripts/test once it installed the client) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest
from consul.exceptions import BadRequest

from tests.helpers.agent import AgentProcess, fake_proxy
from tests.helpers.processes import wait_until

NODE_CLIENT = Path(__file__).resolve().parent / "clients" / "node"
SETTINGS = {
    "node_name": "node-1",
    "enable_script_checks": True,
    "connect": {"proxy": {"allow_managed_root": True}},  # CI runs as root: the fake proxy may run
}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(tmp_path, extra=SETTINGS)
    proxy = {"command": fake_proxy("run", tmp_path / "web.state"), "config": {"disable_tcp_check": True}}
    agent.write(
        "services.json",
        {
            "services": [
                {"name": "db", "port": 5432, "tags": ["primary"], "check": {"id": "db-ttl", "ttl": "300s"}},
                {"name": "web", "port": 8080, "connect": {"proxy": proxy}},
            ]
        },
    )
    try:
        agent.start()
        agent.wait_state("web-proxy", "running")
        yield agent
    finally:
        agent.kill_everything()


def test_py_consul_against_the_agent(agent: AgentProcess) -> None:
    client = consul.Consul(host="127.0.0.1", port=agent.port)

    # -- the agent ---------------------------------------------------------------------------
    assert client.agent.self()["Config"]["NodeName"] == "node-1"
    assert [member["Name"] for member in client.agent.members()] == ["node-1"]
    assert set(client.agent.services()) == {"db", "web", "web-proxy"}
    assert set(client.agent.services(filter_expr='Service == "db"')) == {"db"}
    assert client.agent.service_definition("db")["Tags"] == ["primary"]
    assert client.agent.reload() is True

    # -- registrations, checks, maintenance --------------------------------------------------
    assert client.agent.service.register(
        "cache",
        service_id="cache-1",
        port=6379,
        tags=["lru"],
        meta={"team": "core"},
        weights={"passing": 2, "warning": 1},
        check=consul.Check.ttl("30s"),
        replace_existing_checks=True,
    )
    assert client.agent.service.register(
        "api",
        port=9000,
        check=consul.Check.tcp("127.0.0.1", 9, "10s"),
        extra_checks=[consul.Check.http("http://127.0.0.1:9/health", "10s", timeout="1s", deregister="90s")],
    )
    assert client.agent.check.register("disk", check=consul.Check.ttl("60s"), check_id="disk", notes="df")
    assert client.agent.check.register(
        "cache alive", check=consul.Check.ttl("60s"), check_id="cache-alive", service_id="cache-1"
    )
    assert client.agent.check.register(
        "true", check=consul.Check.script(["/bin/true"], "10s"), check_id="true"
    )
    with pytest.raises(BadRequest, match="grpc checks are not run"):
        client.agent.check.register("g", check=consul.Check.grpc("127.0.0.1:9", "10s"), check_id="g")
    assert {"disk", "cache-alive", "true", "service:cache-1"} <= set(client.agent.checks())
    assert client.agent.check.ttl_pass("service:cache-1", "ok")
    assert client.agent.check.ttl_warn("disk", "80%")
    assert client.agent.checks()["disk"]["Status"] == "warning"
    assert client.agent.check.ttl_fail("disk", "95%")
    assert client.agent.check.deregister("disk") and "disk" not in client.agent.checks()
    assert client.agent.maintenance(True, "patching")
    assert client.agent.checks()["_node_maintenance"]["Notes"] == "patching"
    assert client.agent.maintenance(False) and "_node_maintenance" not in client.agent.checks()
    assert client.agent.service.maintenance("cache-1", True, "draining")
    assert client.agent.checks()["_service_maintenance:cache-1"]["Status"] == "critical"
    assert client.agent.service.maintenance("cache-1", False)

    # -- catalog and health --------------------------------------------------------------------
    assert client.catalog.datacenters() == ["dc1"]
    assert [node["Node"] for node in client.catalog.nodes()[1]] == ["node-1"]
    assert client.catalog.services()[1]["cache"] == ["lru"]
    assert {"cache-1", "db", "web", "web-proxy"} <= set(client.catalog.node("node-1")[1]["Services"])
    assert client.catalog.node("elsewhere")[1] is None
    [cached] = client.catalog.service("cache")[1]
    assert (cached["ServiceID"], cached["ServicePort"], cached["ServiceMeta"]) == (
        "cache-1",
        6379,
        {"team": "core"},
    )
    assert [entry["ServiceID"] for entry in client.catalog.connect("web")[1]] == ["web-proxy"]
    assert client.agent.check.ttl_pass("cache-alive")
    index, entries = client.health.service("cache", passing=True)
    assert [entry["Service"]["ID"] for entry in entries] == ["cache-1"]
    assert [entry["Service"]["ID"] for entry in client.health.connect("web")[1]] == ["web-proxy"]
    assert [check["CheckID"] for check in client.health.checks("db")[1]] == ["db-ttl"]
    assert "db-ttl" in {check["CheckID"] for check in client.health.state("critical")[1]}
    assert "serfHealth" in {check["CheckID"] for check in client.health.node("node-1")[1]}
    # A blocking query returns when the answer changes.
    assert client.agent.check.ttl_fail("service:cache-1")
    later, entries = client.health.service("cache", passing=True, index=index, wait="5s")
    assert int(later) > int(index) and entries == []

    # -- Connect -------------------------------------------------------------------------------
    roots = client.connect.ca.roots()
    assert len(roots["Roots"]) == 1 and client.agent.connect.ca.roots()["TrustDomain"] == roots["TrustDomain"]
    assert client.connect.ca.configuration()["Provider"] == "consul"
    leaf = client.agent.connect.ca.leaf("web")
    assert leaf["Service"] == "web" and leaf["CertPEM"].startswith("-----BEGIN CERTIFICATE-----")
    assert client.connect.intentions.upsert("api", "web", action="deny", description="not yet")
    assert client.connect.intentions.read("api", "web")["Action"] == "deny"
    assert [(i["SourceName"], i["DestinationName"]) for i in client.connect.intentions.list()] == [
        ("api", "web")
    ]
    assert client.connect.intentions.check("api", "web") is False
    assert list(client.connect.intentions.match("destination", "web")) == ["web"]
    uri = f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/api"
    assert client.agent.connect.authorize("web", uri, "01")["Authorized"] is False
    assert client.connect.intentions.delete("api", "web")
    assert client.agent.connect.authorize("web", uri, "01")["Authorized"] is True

    # -- prepared queries --------------------------------------------------------------------
    created = client.query.create("db", name="primary-db", onlypassing=True, tags=["primary"], ttl="10s")
    assert [query["Name"] for query in client.query.list()] == ["primary-db"]
    assert client.query.get(created["ID"])[0]["Name"] == "primary-db"
    assert client.query.execute("primary-db")["Service"] == "db"
    assert client.query.explain("primary-db")["Query"]["Service"]["Service"] == "db"
    assert client.query.update(created["ID"], "db", name="primary-db")
    assert client.query.delete(created["ID"]) and client.query.list() == []

    # -- the rest --------------------------------------------------------------------------------
    assert client.status.leader() == agent.address and client.status.peers() == [agent.address]
    metrics = client.agent.metrics()
    assert any(gauge["Name"] == "proxy_supervisor.proxies" for gauge in metrics["Gauges"])
    assert "proxy_supervisor_proxies" in client.agent.metrics(format_prometheus=True)
    for unimplemented in (lambda: client.kv.get("config/db"), client.session.list, client.event.list):
        with pytest.raises(consul.ConsulException, match="501 proxy-supervisor does not implement"):
            unimplemented()
    assert client.agent.service.deregister("cache-1") and "cache-1" not in client.agent.services()


def _node_client() -> str:
    if not (NODE_CLIENT / "node_modules" / "consul").is_dir() or shutil.which("node") is None:
        if os.environ.get("PROXY_SUPERVISOR_REQUIRE_NODE") == "1":
            pytest.fail(
                "the Node.js client is not installed in tests/clients/node (scripts/test installs it)"
            )
        pytest.skip("the Node.js client is not installed: run npm ci in tests/clients/node")
    node = shutil.which("node")
    assert node is not None
    return node


def test_the_node_consul_client_against_the_agent(agent: AgentProcess) -> None:
    node = _node_client()
    run = subprocess.run(
        [node, "exercise.js", str(agent.port), "node-1"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert run.returncode == 0, run.stderr
    calls: dict[str, dict[str, Any]] = {}
    for line in run.stdout.splitlines():
        answer = json.loads(line)
        calls[answer.pop("call")] = answer
    failed = {name: answer for name, answer in calls.items() if "error" in answer}
    # Exactly the endpoints this agent does not implement fail, and with a 501.
    assert set(failed) == {"kv.get", "session.list"}, failed
    assert all(answer["status"] == 501 for answer in failed.values())

    def ok(name: str) -> Any:
        return calls[name]["ok"]

    assert ok("agent.self") == "node-1" and ok("agent.members") == ["node-1"]
    assert {"cache-1", "api", "db", "web", "web-proxy"} <= set(ok("agent.service.list"))
    assert {"service:cache-1", "service:api:1", "service:api:2", "db-ttl"} <= set(ok("agent.check.list"))
    assert ok("catalog.datacenters") == ["dc1"] and ok("catalog.node.list") == ["node-1"]
    assert {"cache-1", "db", "web", "web-proxy"} <= set(ok("catalog.node.services"))
    assert ok("catalog.service.list")["cache"] == ["lru"]
    assert ok("catalog.service.nodes") == [["cache-1", 6379, ["lru"]]]
    assert ok("catalog.connect.nodes") == ["web-proxy"]
    assert {"serfHealth", "db-ttl", "service:cache-1"} <= set(ok("health.node"))
    assert ok("health.checks") == ["service:cache-1"]
    assert ok("health.service") == ["cache-1"]  # passed by the client before it asked
    assert ok("health.service.filter") == ["cache-1"]
    assert "db-ttl" in ok("health.state")
    assert ok("query.create") == 36 and ok("query.list") == ["caches"]
    assert ok("query.execute") == ["cache-1"]
    assert ok("query.get+update+destroy") == [False, 0]
    assert ok("status.leader") == agent.address
    assert "cache-1" not in ok("agent.service.list.after")
    wait_until(lambda: "script" in agent.get("/v1/agent/checks"), 5, message="the script check from Node")
