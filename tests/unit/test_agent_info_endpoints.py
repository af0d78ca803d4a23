"""What the agent says about itself, in-process: ``/v1/agent/members``,
``/v1/connect/ca/configuration`` and ``/v1/agent/metrics`` (Consul's JSON and Prometheus')."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from supervisor.supervision.machine import State
from supervisor.supervision.view import AgentView, ProxyStatus, Totals
from tests.helpers.inprocess_api import Agent, text


def test_members_is_this_agent_as_a_lan_member(agent: Agent) -> None:
    [member] = agent.get("/v1/agent/members")
    assert (member["Name"], member["Status"], member["Tags"]["role"], member["Tags"]["dc"]) == (
        "node-1",
        1,
        "node",
        "dc1",
    )
    assert agent.get("/v1/agent/members?wan=1") == []  # not in a WAN pool
    assert agent.call("GET", "/v1/agent/members?wan=1&segment=alpha").status == 400
    assert agent.get("/v1/agent/self")["Member"] == member


def test_the_ca_configuration_shows_the_provider_and_hides_keys(agent: Agent) -> None:
    response = agent.call("GET", "/v1/connect/ca/configuration")
    data = json.loads(response.body)
    assert (data["Provider"], data["Config"]["LeafCertTTL"]) == ("consul", "72h0m0s")
    assert "PrivateKey" not in data["Config"] and int(response.headers["X-Consul-Index"]) > 0
    refused = agent.call("PUT", "/v1/connect/ca/configuration", {"Provider": "vault"})
    assert refused.status == 405 and "connect.ca_config" in text(refused)


def publish(agent: Agent, states: dict[str, State], totals: Totals) -> None:
    """A view as the supervision loop would publish it after starting and losing proxies."""
    current = agent.board.current
    statuses = {
        proxy_id: ProxyStatus(
            proxy_id,
            proxy_id,
            state,
            100,
            2,
            3,
            proxy_id == "a",
            None,
            None,
            None,
            None,
            None,
            0,
            (),
            None,
            None,
        )
        for proxy_id, state in states.items()
    }
    view = AgentView(
        current.config, current.node_id, current.api_address, current.proxies, statuses, totals=totals
    )
    agent.board.publish(view)


def test_metrics_carry_the_supervisors_figures_in_consuls_json(agent: Agent) -> None:
    totals = Totals(starts=7, exits=4, unexpected_exits=3, adopted=1, reloads=2, failed_reloads=1)
    publish(agent, {"a": State.RUNNING, "b": State.BACKOFF, "c": State.BLOCKED}, totals)
    agent.call("GET", "/v1/agent/nope")  # a 404, counted
    data = agent.get("/v1/agent/metrics")
    gauges = {(g["Name"], tuple(sorted(g["Labels"].items()))): g["Value"] for g in data["Gauges"]}
    assert gauges[("proxy_supervisor.proxies", (("state", "running"),))] == 1
    assert gauges[("proxy_supervisor.proxies", (("state", "blocked"),))] == 1
    assert gauges[("proxy_supervisor.proxies.adopted", ())] == 1
    counters = {(c["Name"], tuple(sorted(c["Labels"].items()))): c["Count"] for c in data["Counters"]}
    assert counters[("proxy_supervisor.proxy.starts", ())] == 7
    assert counters[("proxy_supervisor.proxy.unexpected_exits", ())] == 3
    assert counters[("proxy_supervisor.proxy.restarts", ())] == 9  # three proxies, three each
    assert counters[("proxy_supervisor.reloads.failed", ())] == 1
    assert counters[("proxy_supervisor.api.requests", (("code", "404"),))] == 1
    assert set(data) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    assert data["Timestamp"].endswith("+0000 UTC")


def test_metrics_in_prometheus_format_parse_as_prometheus(agent: Agent) -> None:
    publish(agent, {"a": State.RUNNING}, Totals(starts=2))
    index = agent.call("GET", "/v1/catalog/services").headers["X-Consul-Index"]
    blocking = agent.begin(f"/v1/catalog/services?index={index}&wait=5s")  # held: nothing changes
    response = agent.call("GET", "/v1/agent/metrics?format=prometheus")
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(response.body.decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("proxy_supervisor_proxies", (("state", "running"),))] == 1
    assert samples[("proxy_supervisor_proxy_starts_total", ())] == 2
    assert samples[("proxy_supervisor_api_blocking_queries", ())] == 1  # the query held above
    assert families["proxy_supervisor_proxy_starts"].type == "counter"
    blocking.cancel()
    assert agent.call("GET", "/v1/agent/metrics?format=xml").status == 400
