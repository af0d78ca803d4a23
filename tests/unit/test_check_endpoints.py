"""The agent's check endpoints in-process: registering checks of the node and of services,
script checks and who may run them, alias checks, maintenance mode, a service's local
health as load balancers read it, and DeregisterCriticalServiceAfter."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from tests.helpers.inprocess_api import Agent, text

REGISTER = "/v1/agent/check/register"


def checks(agent: Agent) -> dict[str, Any]:
    return agent.get("/v1/agent/checks")  # type: ignore[no-any-return]


def status(agent: Agent, check_id: str) -> str:
    return str(checks(agent)[check_id]["Status"])


def test_a_node_check_is_registered_shown_on_every_instance_and_deregistered(agent: Agent) -> None:
    body = {"Name": "disk", "TTL": "60s", "Notes": "df", "ServiceID": None, "Namespace": ""}
    assert agent.call("PUT", REGISTER, body).status == 200
    assert (checks(agent)["disk"]["ServiceID"], status(agent, "disk")) == ("", "critical")
    [entry] = agent.get("/v1/health/service/db")
    assert {"serfHealth", "disk", "db-ttl"} == {c["CheckID"] for c in entry["Checks"]}  # node checks too
    assert "disk" in {c["CheckID"] for c in agent.get("/v1/health/node/node-1")}
    assert agent.call("PUT", "/v1/agent/check/pass/disk").status == 200
    assert status(agent, "disk") == "passing"
    assert agent.call("PUT", "/v1/agent/check/deregister/disk").status == 200
    assert "disk" not in checks(agent)
    assert agent.call("PUT", "/v1/agent/check/deregister/disk").status == 200  # unknown: no error


def test_a_service_check_needs_its_service_and_goes_with_it(agent: Agent) -> None:
    orphan = agent.call("PUT", REGISTER, {"Name": "x", "TTL": "10s", "ServiceID": "nope"})
    assert orphan.status == 404 and "ServiceID 'nope' does not exist" in text(orphan)
    assert agent.call("PUT", "/v1/agent/service/register", {"Name": "cache", "Port": 6379}).status == 200
    body = {"ID": "cache-alive", "Name": "cache alive", "TTL": "10s", "ServiceID": "cache"}
    assert agent.call("PUT", REGISTER, body).status == 200
    [entry] = agent.get("/v1/health/service/cache")
    assert "cache-alive" in {c["CheckID"] for c in entry["Checks"]}
    assert checks(agent)["cache-alive"]["ServiceName"] == "cache"
    assert agent.call("PUT", "/v1/agent/service/deregister/cache").status == 200
    assert "cache-alive" not in checks(agent)


def test_bad_check_registrations_are_400s_naming_the_problem(agent: Agent) -> None:
    for body, says in (
        ({"TTL": "10s"}, "Missing check name"),
        ({"Name": "x"}, "a check needs exactly one of"),
        ({"Name": "x", "TTL": "10s", "Interval": "5s"}, "Interval and TTL cannot both be specified"),
        ({"Name": "x", "HTTP": "http://127.0.0.1:9/"}, "needs an interval"),
        ({"Name": "x", "GRPC": "127.0.0.1:9", "Interval": "5s"}, "grpc checks are not run"),
        ({"Name": "x", "DockerContainerID": "c1", "Interval": "5s"}, "docker checks are not run"),
        ({"Name": "x", "TTL": "10s", "Status": "fine"}, "'fine' is not one of"),
        ({"Name": "_node_maintenance", "TTL": "10s"}, "reserved for maintenance"),
    ):
        response = agent.call("PUT", REGISTER, body)
        assert response.status == 400 and says in text(response), (body, text(response))


def test_script_checks_run_only_where_enable_script_checks_allows(agents: Callable[..., Agent]) -> None:
    script = {"Name": "script", "Args": [sys.executable, "-c", "print('slow'); raise SystemExit(1)"]}
    plain = agents()
    refused = plain.call("PUT", REGISTER, {**script, "Interval": "10s"})
    assert refused.status == 400 and "Scripts are disabled on this agent from remote calls" in text(refused)
    local_only = agents(enable_local_script_checks=True)  # config files may, the API still may not
    assert local_only.call("PUT", REGISTER, {**script, "Interval": "10s"}).status == 400
    allowed = agents(enable_script_checks=True)
    assert allowed.call("PUT", REGISTER, {**script, "Interval": "10s"}).status == 200
    allowed.wait_for(lambda: status(allowed, "script") == "warning")  # exit 1: warning, as Consul
    assert checks(allowed)["script"]["Output"].strip() == "slow"


def test_an_alias_check_follows_the_service_it_names(agent: Agent) -> None:
    body = {"ID": "db-alias", "Name": "db's health", "AliasService": "db", "ServiceID": "web"}
    assert agent.call("PUT", REGISTER, body).status == 200
    assert status(agent, "db-alias") == "critical"  # db-ttl has not been updated yet
    assert agent.call("PUT", "/v1/agent/check/pass/db-ttl").status == 200
    assert status(agent, "db-alias") == "passing"
    assert agent.call("PUT", "/v1/agent/check/warn/db-ttl?note=slow").status == 200
    assert status(agent, "db-alias") == "warning" and "db-ttl" in checks(agent)["db-alias"]["Output"]
    nothing = {"ID": "ghost-alias", "Name": "ghost", "AliasService": "ghost"}
    assert agent.call("PUT", REGISTER, nothing).status == 200
    assert (status(agent, "ghost-alias"), checks(agent)["ghost-alias"]["Output"]) == (
        "passing",
        "No checks found.",
    )
    timed = agent.call("PUT", REGISTER, {"Name": "a", "AliasService": "db", "Interval": "5s"})
    assert timed.status == 400 and "Interval cannot be set for Alias checks" in text(timed)


def test_maintenance_mode_of_the_node_and_of_a_service(agent: Agent) -> None:
    assert agent.call("PUT", "/v1/agent/check/pass/db-ttl").status == 200
    assert len(agent.get("/v1/health/service/db?passing")) == 1
    assert agent.call("PUT", "/v1/agent/maintenance?enable=true&reason=patching").status == 200
    node = checks(agent)["_node_maintenance"]
    assert (node["Status"], node["Notes"], node["Name"]) == ("critical", "patching", "Node Maintenance Mode")
    assert agent.call("PUT", "/v1/agent/maintenance?enable=true&reason=other").status == 200
    assert checks(agent)["_node_maintenance"]["Notes"] == "patching"  # enabling twice: the first reason
    assert agent.get("/v1/health/service/db?passing") == []  # the whole node leaves discovery
    assert agent.call("PUT", "/v1/agent/maintenance?enable=false").status == 200
    assert "_node_maintenance" not in checks(agent)
    assert len(agent.get("/v1/health/service/db?passing")) == 1

    assert agent.call("PUT", "/v1/agent/service/maintenance/db?enable=True").status == 200
    service = checks(agent)["_service_maintenance:db"]
    assert (service["ServiceID"], service["Status"]) == ("db", "critical")
    assert "no reason was provided" in service["Notes"]
    assert agent.call("PUT", "/v1/agent/service/maintenance/db?enable=0").status == 200
    assert "_service_maintenance:db" not in checks(agent)

    assert agent.call("PUT", "/v1/agent/maintenance").status == 400  # Missing value for enable
    assert agent.call("PUT", "/v1/agent/maintenance?enable=maybe").status == 400
    unknown = agent.call("PUT", "/v1/agent/service/maintenance/nope?enable=true")
    assert unknown.status == 404 and "No service registered with ID" in text(unknown)


def test_a_services_local_health_as_load_balancers_read_it(agent: Agent) -> None:
    critical = agent.call("GET", "/v1/agent/health/service/id/db")
    data = json.loads(critical.body)
    assert (critical.status, data["AggregatedStatus"], critical.headers["X-Consul-Reason"]) == (
        503,
        "critical",
        "critical",
    )
    assert data["Service"]["ID"] == "db" and {c["CheckID"] for c in data["Checks"]} == {"db-ttl"}
    assert "Definition" not in data["Checks"][0]
    agent.call("PUT", "/v1/agent/check/warn/db-ttl")
    assert agent.call("GET", "/v1/agent/health/service/id/db").status == 429
    agent.call("PUT", "/v1/agent/check/pass/db-ttl")
    text_form = agent.call("GET", "/v1/agent/health/service/name/db?format=text")
    assert (text_form.status, text(text_form)) == (200, "passing")
    by_name = json.loads(agent.call("GET", "/v1/agent/health/service/name/db").body)
    assert [entry["Service"]["ID"] for entry in by_name] == ["db"]
    agent.call("PUT", "/v1/agent/service/maintenance/db?enable=true")
    assert (
        json.loads(agent.call("GET", "/v1/agent/health/service/id/db").body)["AggregatedStatus"]
        == "maintenance"
    )
    missing = agent.call("GET", "/v1/agent/health/service/id/nope")
    assert (missing.status, json.loads(missing.body)) == (
        404,
        {"AggregatedStatus": "critical", "Service": None, "Checks": None},
    )
    none = agent.call("GET", "/v1/agent/health/service/name/nope")
    assert (none.status, json.loads(none.body), none.headers["X-Consul-Reason"]) == (
        404,
        [],
        "ServiceName nope Not Found",
    )


def test_a_service_critical_too_long_is_deregistered(agent: Agent) -> None:
    registration = {
        "Name": "flaky",
        "Port": 7000,
        "Check": {"TTL": "30s", "DeregisterCriticalServiceAfter": "10ms", "Status": "passing"},
    }
    assert agent.call("PUT", "/v1/agent/service/register", registration).status == 200
    agent.wait_for(lambda: "service:flaky" in checks(agent))
    assert agent.call("PUT", "/v1/agent/check/fail/service:flaky").status == 200
    # The floor (Consul's one minute) is 50 ms in this harness.
    agent.wait_for(lambda: "flaky" not in agent.get("/v1/agent/services"))
    assert agent.get("/v1/catalog/service/flaky") == [] and "service:flaky" not in checks(agent)


def test_a_passing_result_in_time_stops_the_countdown(agent: Agent) -> None:
    registration = {
        "Name": "wobbly",
        "Port": 7001,
        "Check": {"TTL": "30s", "DeregisterCriticalServiceAfter": "10ms"},  # critical at first
    }
    assert agent.call("PUT", "/v1/agent/service/register", registration).status == 200
    assert agent.call("PUT", "/v1/agent/check/pass/service:wobbly").status == 200
    # Had the countdown gone on, it would fire 50 ms after the registration: give it three times that.
    agent.loop.run_until_complete(asyncio.sleep(0.15))
    assert "wobbly" in agent.get("/v1/agent/services")
