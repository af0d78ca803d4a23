"""Discovery endpoints Consul's clients call, in-process: node and state health, a node's
services, ``?filter=`` and ``?node-meta=``, and the headers Consul puts on reads."""

from __future__ import annotations

import json

import pytest

from tests.helpers.inprocess_api import Agent, text


def register(agent: Agent, body: dict[str, object]) -> None:
    response = agent.call("PUT", "/v1/agent/service/register", body)
    assert response.status == 200, text(response)


def test_health_by_state_lists_node_and_service_checks(agent: Agent) -> None:
    register(agent, {"Name": "cache", "Port": 6379, "Check": {"CheckID": "cache-ttl", "TTL": "60s"}})
    every = agent.get("/v1/health/state/any")
    ids = {check["CheckID"] for check in every}
    assert {"serfHealth", "db-ttl", "cache-ttl"} <= ids
    assert [c["CheckID"] for c in every].count("serfHealth") == 1  # the node's check once, not per instance
    critical = {check["CheckID"] for check in agent.get("/v1/health/state/critical")}
    assert {"db-ttl", "cache-ttl"} <= critical and "serfHealth" not in critical
    assert agent.call("PUT", "/v1/agent/check/pass/cache-ttl").status == 200
    passing = {check["CheckID"] for check in agent.get("/v1/health/state/passing")}
    assert "cache-ttl" in passing and "serfHealth" in passing
    bad = agent.call("GET", "/v1/health/state/sick")
    assert bad.status == 400 and "any, passing, warning or critical" in text(bad)


def test_health_of_a_node_and_the_services_of_a_node(agent: Agent) -> None:
    checks = agent.get("/v1/health/node/node-1")
    assert checks[0]["CheckID"] == "serfHealth" and "db-ttl" in {c["CheckID"] for c in checks}
    assert all(check["Node"] == "node-1" for check in checks)
    assert agent.get("/v1/health/node/elsewhere") == []  # an unknown node: empty, not an error
    node = agent.get("/v1/catalog/node/node-1")
    assert node["Node"]["Node"] == "node-1"
    assert {"web", "web-proxy", "db"} <= set(node["Services"])
    assert node["Services"]["db"]["Tags"] == ["primary"]
    unknown = agent.call("GET", "/v1/catalog/node/elsewhere")
    assert (unknown.status, json.loads(unknown.body)) == (200, None)  # Consul's null
    filtered = agent.get("/v1/catalog/node/node-1?filter=" + "Port%20%3D%3D%205432")
    assert list(filtered["Services"]) == ["db"]  # the filter narrows the services map


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v1/agent/services?filter=Service%20%3D%3D%20db", {"db"}),
        ("/v1/agent/services?filter=%22primary%22%20in%20Tags", {"db"}),
        ("/v1/agent/checks?filter=ServiceID%20%3D%3D%20db", {"db-ttl"}),
    ],
)
def test_agent_maps_are_filtered_by_their_values(agent: Agent, target: str, expected: set[str]) -> None:
    assert set(agent.get(target)) == expected


def test_lists_are_filtered_and_a_bad_filter_is_a_400(agent: Agent) -> None:
    register(agent, {"Name": "db", "ID": "db-2", "Port": 5433, "Tags": ["replica"]})
    replicas = agent.get("/v1/health/service/db?filter=" + "%22replica%22%20in%20Service.Tags")
    assert [entry["Service"]["ID"] for entry in replicas] == ["db-2"]
    catalog = agent.get("/v1/catalog/service/db?filter=ServicePort%20%3D%3D%205432")
    assert [entry["ServiceID"] for entry in catalog] == ["db"]
    bad = agent.call("GET", "/v1/health/service/db?filter=Service%20%3D%3D")
    assert bad.status == 400 and "Failed to create filter" in text(bad) and "1:11" in text(bad)
    unknown = agent.call("GET", "/v1/catalog/service/db?filter=Colour%20%3D%3D%20red")
    assert unknown.status == 400 and 'Selector "Colour" is not valid' in text(unknown)


def test_node_meta_narrows_by_the_node(agent: Agent) -> None:
    segment = "node-meta=consul-network-segment:"
    assert [n["Node"] for n in agent.get(f"/v1/catalog/nodes?{segment}")] == ["node-1"]
    assert agent.get("/v1/catalog/nodes?node-meta=rack:r1") == []
    assert agent.get("/v1/health/service/db?node-meta=rack:r1") == []
    assert agent.get("/v1/catalog/services?node-meta=rack:r1") == {}
    assert agent.call("GET", "/v1/catalog/nodes?node-meta=nocolon").status == 400


def test_reads_carry_consuls_headers_and_refuse_conflicting_modes(agent: Agent) -> None:
    response = agent.call("GET", "/v1/health/service/db")
    headers = response.headers
    assert headers["X-Consul-KnownLeader"] == "true" and headers["X-Consul-LastContact"] == "0"
    assert headers["X-Consul-Effective-Consistency"] == "leader" and int(headers["X-Consul-Index"]) > 0
    assert (
        agent.call("GET", "/v1/catalog/services?stale").headers["X-Consul-Effective-Consistency"] == "stale"
    )
    cached = agent.call("GET", "/v1/health/service/db?cached").headers
    assert (cached["X-Cache"], cached["Age"]) == ("HIT", "0")
    both = agent.call("GET", "/v1/catalog/nodes?stale&consistent")
    assert both.status == 400 and "conflicting semantics" in text(both)
    created = agent.call("POST", "/v1/query", {"Name": "q", "Service": {"Service": "db"}})
    assert created.status == 200
    listed = agent.call("GET", "/v1/query")
    assert int(listed.headers["X-Consul-Index"]) > 0 and listed.headers["X-Consul-KnownLeader"] == "true"
