"""The API endpoints in-process (``tests/helpers/inprocess_api.py``): registration,
discovery, checks, ACLs, reload, intentions and prepared queries, as clients call them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

from supervisor.api.agent_endpoints import MANAGED_API_DISALLOWED
from supervisor.api.http import Response
from supervisor.controlplane import MANAGED_DEREGISTER
from supervisor.errors import ConfigError, SupervisorError
from supervisor.supervision.events import ReloadRequested
from tests.helpers.inprocess_api import (
    ACL_ALLOW,
    ACL_DENY,
    ALLOW_MANAGED,
    MASTER,
    Agent,
    text,
)

# -- registration and discovery ----------------------------------------------------------------


def test_a_registered_service_is_discovered_until_it_is_deregistered(agent: Agent) -> None:
    registration = {"ID": "cache-1", "Name": "cache", "Port": 6379, "Tags": ["lru"]}
    assert agent.call("PUT", "/v1/agent/service/register", registration).status == 200
    [entry] = agent.get("/v1/catalog/service/cache")
    assert (entry["ServiceID"], entry["ServiceName"], entry["ServicePort"]) == ("cache-1", "cache", 6379)
    assert entry["ServiceTags"] == ["lru"] and entry["Node"] == "node-1"
    assert agent.get("/v1/catalog/services")["cache"] == ["lru"]
    [health] = agent.get("/v1/health/service/cache")
    assert [check["CheckID"] for check in health["Checks"]] == ["serfHealth"]
    assert "cache-1" in agent.get("/v1/agent/services")

    assert agent.call("PUT", "/v1/agent/service/deregister/cache-1").status == 200
    assert agent.get("/v1/catalog/service/cache") == []
    assert "cache" not in agent.get("/v1/catalog/services")
    again = agent.call("PUT", "/v1/agent/service/deregister/cache-1")
    assert again.status == 404 and "cache-1" in text(again)


def test_a_registration_is_decoded_as_consul_does_null_absent_unknown_skipped(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    # What Consul's Go client sends for a plain registration: every field, nulls included,
    # and fields newer than Consul 1.5 (Namespace, Partition, TaggedAddresses as a map).
    go_client = {
        "Kind": "",
        "ID": "",
        "Name": "cache",
        "Tags": None,
        "Port": 6379,
        "Address": "",
        "TaggedAddresses": None,
        "EnableTagOverride": False,
        "Meta": None,
        "Weights": None,
        "Check": None,
        "Checks": None,
        "Proxy": None,
        "Connect": None,
        "Namespace": "",
        "Partition": "",
        "SocketPath": "",
    }
    caplog.set_level(logging.DEBUG, "supervisor.config")
    response = agent.call("PUT", "/v1/agent/service/register", go_client)
    assert response.status == 200, text(response)
    service = agent.get("/v1/agent/services")["cache"]  # an empty ID means the name
    assert (service["Service"], service["Port"], service["Tags"]) == ("cache", 6379, [])
    assert "Partition" in caplog.text and "SocketPath" in caplog.text  # skipped, said at DEBUG
    nested = {
        "Name": "queue",
        "Port": 5672,
        "Check": {"TTL": "10s", "Status": None, "H2PING": "", "Body": ""},
    }
    assert agent.call("PUT", "/v1/agent/service/register", nested).status == 200
    [check] = [c for c in agent.get("/v1/agent/checks").values() if c["ServiceID"] == "queue"]
    assert check["Status"] == "critical"  # Status null: the default, as in Consul


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"Name": "cache", "Port": "6379x"}, "Port"),
        ({"Port": 6379}, "Name"),
        ({"Name": "cache", "Check": {"TTL": "soon"}}, "Check.TTL"),
        (b'{"Name": "cache",', "decode failed"),
    ],
    ids=["wrong-type", "missing-name", "nested-key", "broken-json"],
)
def test_a_registration_with_a_bad_body_is_400_naming_the_problem(
    agent: Agent, body: Any, named: str
) -> None:
    response = agent.call("PUT", "/v1/agent/service/register", body)
    assert response.status == 400
    assert named in text(response)
    assert set(agent.get("/v1/agent/services")) == {"web", "web-proxy", "db"}  # nothing registered


def test_a_registration_cannot_take_an_id_the_configuration_owns(agent: Agent) -> None:
    taken = agent.call("PUT", "/v1/agent/service/register", {"ID": "db", "Name": "other", "Port": 1})
    assert taken.status == 409 and "agent.json" in text(taken)
    proxy = agent.call("PUT", "/v1/agent/service/register", {"ID": "web-proxy", "Name": "other", "Port": 1})
    assert proxy.status == 409 and "managed proxy of web" in text(proxy)
    assert [entry["ServiceID"] for entry in agent.get("/v1/catalog/service/db")] == ["db"]


def test_a_configured_service_deregistered_through_the_api_is_gone_until_a_reload(agent: Agent) -> None:
    assert agent.call("PUT", "/v1/agent/service/deregister/db").status == 200  # as Consul
    assert "db" not in agent.get("/v1/agent/services")
    assert agent.get("/v1/catalog/service/db") == [] and "db-ttl" not in agent.get("/v1/agent/checks")
    agent.reload_config()  # a reload brings it back
    assert "db" in agent.get("/v1/agent/services") and agent.get("/v1/catalog/service/db") != []


def test_services_with_managed_proxies_and_the_proxies_are_not_deregistered_through_the_api(
    agent: Agent,
) -> None:
    managed = agent.call("PUT", "/v1/agent/service/deregister/web-proxy")
    assert (managed.status, text(managed)) == (400, MANAGED_DEREGISTER)
    parent = agent.call("PUT", "/v1/agent/service/deregister/web")
    assert parent.status == 400 and "supervised from agent.json" in text(parent)
    assert {"web", "web-proxy"} <= set(agent.get("/v1/agent/services"))


def test_managed_proxy_registration_needs_the_operator_to_allow_it(agents: Callable[..., Agent]) -> None:
    registration = {"Name": "api", "Port": 9090, "Connect": {"Proxy": {"Command": ["/bin/true"]}}}
    strict = agents()
    refused = strict.call("PUT", "/v1/agent/service/register", registration)
    assert (refused.status, text(refused)) == (400, MANAGED_API_DISALLOWED)
    assert strict.services_changed == 0
    lenient = agents(**ALLOW_MANAGED)
    assert lenient.call("PUT", "/v1/agent/service/register", registration).status == 200
    assert lenient.services_changed == 1  # the supervision loop is told to plan the new proxy
    assert "api" in lenient.get("/v1/agent/services")


def test_a_managed_proxy_cannot_take_the_id_of_a_registered_service(agents: Callable[..., Agent]) -> None:
    agent = agents(**ALLOW_MANAGED)
    assert agent.call("PUT", "/v1/agent/service/register", {"Name": "api-proxy", "Port": 7000}).status == 200
    managed = {"Name": "api", "Port": 9090, "Connect": {"Proxy": {"Command": ["/bin/true"]}}}
    response = agent.call("PUT", "/v1/agent/service/register", managed)
    assert response.status == 409, text(response)


def test_health_follows_ttl_check_updates(agent: Agent) -> None:
    before = agent.call("GET", "/v1/health/service/db")
    [entry] = json.loads(before.body)
    assert {check["CheckID"]: check["Status"] for check in entry["Checks"]} == {
        "serfHealth": "passing",
        "db-ttl": "critical",  # a TTL check starts critical until its first update
    }
    assert agent.get("/v1/health/service/db?passing") == []

    assert agent.call("PUT", "/v1/agent/check/pass/db-ttl?note=all+good").status == 200
    after = agent.call("GET", "/v1/health/service/db?passing")
    [entry] = json.loads(after.body)
    assert entry["Service"]["ID"] == "db"
    ttl = next(check for check in entry["Checks"] if check["CheckID"] == "db-ttl")
    assert (ttl["Status"], ttl["Output"]) == ("passing", "all good")
    assert int(after.headers["X-Consul-Index"]) > int(before.headers["X-Consul-Index"])
    assert [check["Status"] for check in agent.get("/v1/health/checks/db")] == ["passing"]


def test_a_blocking_health_query_returns_when_its_answer_changes_and_not_before(agent: Agent) -> None:
    first = agent.call("GET", "/v1/health/service/db")
    index = int(first.headers["X-Consul-Index"])
    held = agent.begin(f"/v1/health/service/db?index={index}&wait=10s")
    assert not held.done()
    # Another service changing moves the agent's index, not the answer to this query.
    assert agent.call("PUT", "/v1/agent/service/register", {"Name": "other", "Port": 1}).status == 200
    agent.settle()
    assert not held.done()
    assert agent.call("PUT", "/v1/agent/check/warn/db-ttl").status == 200
    answer = agent.finish(held)
    assert int(answer.headers["X-Consul-Index"]) > index
    [entry] = json.loads(answer.body)
    assert "warning" in [check["Status"] for check in entry["Checks"]]


def test_check_updates_are_validated(agent: Agent) -> None:
    update = "/v1/agent/check/update/db-ttl"
    bad_status = agent.call("PUT", update, {"Status": "fine"})
    assert bad_status.status == 400 and "passing, warning or critical" in text(bad_status)
    extra = agent.call("PUT", update, {"status": "passing", "Output": None, "Notes": "x"})
    assert extra.status == 200  # Consul's decoding: any case, null absent, others skipped
    unknown = agent.call("PUT", "/v1/agent/check/pass/no-such-check")
    assert unknown.status == 404 and "no-such-check" in text(unknown)
    assert agent.call("PUT", update, {"Status": "warning", "Output": "slow"}).status == 200
    check = agent.get("/v1/agent/checks")["db-ttl"]
    assert (check["Status"], check["Output"]) == ("warning", "slow")


@pytest.mark.parametrize(
    ("target", "status", "says"),
    [
        ("/v1/health/service/db?passing=perhaps", 400, "passing"),
        ("/v1/health/service/db?dc=eu-west", 503, "No path to datacenter"),
        (f"/v1/catalog/service/{quote('no such/name', safe='')}", 400, "Invalid service name"),
        ("/v1/kv/some-key", 501, "does not implement the KV store"),
        ("/v1/no/such/endpoint", 404, "/v1/no/such/endpoint"),
    ],
    ids=["bad-flag", "other-dc", "bad-name", "not-implemented", "no-such-endpoint"],
)
def test_discovery_requests_that_cannot_be_answered(
    agent: Agent, target: str, status: int, says: str
) -> None:
    response = agent.call("GET", target)
    assert response.status == status and says in text(response)


def test_a_write_endpoint_read_with_get_is_405(agent: Agent) -> None:
    response = agent.call("GET", "/v1/agent/reload")
    assert response.status == 405 and response.headers["Allow"] == "OPTIONS,POST,PUT"
    assert agent.supervisor.events == []


def test_with_acls_denying_discovery_needs_the_master_or_a_proxy_token(agents: Callable[..., Agent]) -> None:
    agent = agents(**ACL_DENY)
    assert agent.call("GET", "/v1/health/service/db").status == 403
    assert agent.call("GET", "/v1/catalog/services", token="guess").status == 403
    assert agent.call("GET", "/v1/health/service/db", token=MASTER).status == 200
    assert agent.call("GET", "/v1/health/service/db", token=agent.token("web-proxy")).status == 200
    # A proxy token opens discovery, not the agent's own endpoints.
    assert agent.call("GET", "/v1/agent/self", token=agent.token("web-proxy")).status == 403


def test_a_proxy_sees_only_its_own_service_and_its_own_configuration(agent: Agent) -> None:
    token = agent.token("web-proxy")
    assert set(agent.get("/v1/agent/services", token=token)) == {"web", "web-proxy"}
    assert agent.call("GET", "/v1/agent/service/db", token=token).status == 403
    own = agent.call("GET", "/v1/agent/connect/proxy/web-proxy", token=token)
    assert own.status == 200
    config = json.loads(own.body)
    assert (
        config["ProxyServiceID"] == "web-proxy"
        and own.headers["X-Consul-ContentHash"] == config["ContentHash"]
    )
    assert agent.call("GET", "/v1/agent/connect/proxy/db-proxy", token=token).status == 404


# -- the supervision loop's answers --------------------------------------------------------------


def test_reload_is_posted_to_the_supervision_loop_and_its_answer_reported(agent: Agent) -> None:
    assert agent.call("PUT", "/v1/agent/reload").status == 200
    [event] = agent.supervisor.events
    assert isinstance(event, ReloadRequested) and "API" in event.reason

    agent.supervisor.failure = ConfigError.single("agent.json", "ports.http", "expected an integer")
    invalid = agent.call("PUT", "/v1/agent/reload")
    assert invalid.status == 400
    assert "running configuration is kept" in text(invalid) and "ports.http" in text(invalid)

    agent.supervisor.failure = SupervisorError("the agent is shutting down")
    assert agent.call("POST", "/v1/agent/reload").status == 503


# -- intentions ------------------------------------------------------------------------------------


def test_intentions_create_read_update_delete(agent: Agent) -> None:
    created = agent.call(
        "POST",
        "/v1/connect/intentions",
        # Newer clients add namespaces and partitions (empty: the default) and nulls.
        {
            "SourceName": "web",
            "DestinationName": "db",
            "Action": "allow",
            "SourcePartition": "",
            "DestinationPartition": "",
            "Meta": None,
            "Description": None,
        },
    )
    assert created.status == 200
    intention_id = json.loads(created.body)["ID"]
    stored = agent.get(f"/v1/connect/intentions/{intention_id}")
    assert (stored["SourceName"], stored["DestinationName"], stored["Action"]) == ("web", "db", "allow")

    duplicate = agent.call(
        "POST", "/v1/connect/intentions", {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    )
    assert duplicate.status == 409 and intention_id in text(duplicate)

    change = {"SourceName": "web", "DestinationName": "db", "Action": "deny", "Description": "closed"}
    assert agent.call("PUT", f"/v1/connect/intentions/{intention_id}", change).status == 200
    exact = agent.get("/v1/connect/intentions/exact?source=web&destination=db")
    assert (exact["ID"], exact["Action"], exact["Description"]) == (intention_id, "deny", "closed")
    assert exact["ModifyIndex"] > exact["CreateIndex"]
    assert [ixn["ID"] for ixn in agent.get("/v1/connect/intentions")] == [intention_id]

    assert agent.call("DELETE", f"/v1/connect/intentions/{intention_id}").status == 200
    assert agent.call("GET", f"/v1/connect/intentions/{intention_id}").status == 404
    assert agent.call("DELETE", f"/v1/connect/intentions/{intention_id}").status == 404
    assert agent.get("/v1/connect/intentions") == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"SourceName": "web", "DestinationName": "db", "Action": "maybe"}, "Action"),
        ({"SourceName": "web", "Action": "allow"}, "DestinationName"),
    ],
    ids=["bad-action", "missing-destination"],
)
def test_an_invalid_intention_is_400_naming_the_field(agent: Agent, body: dict[str, Any], named: str) -> None:
    response = agent.call("POST", "/v1/connect/intentions", body)
    assert response.status == 400
    assert text(response).startswith("Invalid intention") and named in text(response)


def test_intention_check_takes_the_most_precise_intention_then_the_acl_default(
    agents: Callable[..., Agent],
) -> None:
    open_agent = agents()
    check = "/v1/connect/intentions/check?source=web&destination=db"
    assert open_agent.get(check) == {"Allowed": True}  # no ACLs: allowed by default
    for source, action in [("*", "allow"), ("web", "deny")]:
        body = {"SourceName": source, "DestinationName": "db", "Action": action}
        assert open_agent.call("POST", "/v1/connect/intentions", body).status == 200
    assert open_agent.get(check) == {"Allowed": False}  # the exact deny beats the wildcard allow
    assert open_agent.get("/v1/connect/intentions/check?source=api&destination=db") == {"Allowed": True}
    missing = open_agent.call("GET", "/v1/connect/intentions/check?source=web")
    assert missing.status == 400 and "destination" in text(missing)

    denying = agents(**ACL_DENY)
    assert denying.get(check, token=MASTER) == {"Allowed": False}  # no intention: the default policy


def test_a_proxy_may_match_only_the_intentions_for_its_own_destination(agent: Agent) -> None:
    token = agent.token("web-proxy")
    body = {"SourceName": "api", "DestinationName": "web", "Action": "deny"}
    assert agent.call("POST", "/v1/connect/intentions", body).status == 200
    own = agent.get("/v1/connect/intentions/match?by=destination&name=web", token=token)
    assert [ixn["SourceName"] for ixn in own["web"]] == ["api"]
    for query in ("by=destination&name=db", "by=source&name=web", "by=destination&name=web&name=db"):
        assert agent.call("GET", f"/v1/connect/intentions/match?{query}", token=token).status == 403


def test_authorize_decides_by_intentions_for_the_proxys_own_service(agent: Agent) -> None:
    ca = agent.plane.ca
    assert ca is not None
    token = agent.token("web-proxy")
    client = f"spiffe://{ca.trust_domain}/ns/default/dc/dc1/svc/api"
    request = {"Target": "web", "ClientCertURI": client, "ClientCertSerial": "01"}

    def authorize(body: dict[str, Any]) -> Response:
        return agent.call("POST", "/v1/agent/connect/authorize", body, token=token)

    assert json.loads(authorize(request).body)["Authorized"] is True
    body = {"SourceName": "api", "DestinationName": "web", "Action": "deny"}
    assert agent.call("POST", "/v1/connect/intentions", body).status == 200
    denied = json.loads(authorize(request).body)
    assert denied["Authorized"] is False and "api => web" in denied["Reason"]

    foreign = json.loads(
        authorize({**request, "ClientCertURI": "spiffe://other.consul/ns/default/dc/dc1/svc/api"}).body
    )
    assert foreign["Authorized"] is False and "external trust domain" in foreign["Reason"]
    assert authorize({**request, "ClientCertURI": "https://example.com/"}).status == 400
    assert authorize({**request, "Target": "db"}).status == 403  # not this proxy's service


# -- prepared queries -----------------------------------------------------------------------------


def test_a_prepared_query_is_created_and_executed_by_name_or_id(agent: Agent) -> None:
    created = agent.call(
        "POST", "/v1/query", {"Name": "primary-db", "Service": {"Service": "db", "Tags": ["primary"]}}
    )
    assert created.status == 200
    query_id = json.loads(created.body)["ID"]
    [stored] = agent.get(f"/v1/query/{query_id}")
    assert (stored["ID"], stored["Name"], stored["Service"]["Service"]) == (query_id, "primary-db", "db")

    # Execution leaves critical instances out: db's TTL check has not passed yet.
    empty = agent.get("/v1/query/primary-db/execute")
    assert (empty["Service"], empty["Nodes"], empty["Datacenter"]) == ("db", [], "dc1")
    assert agent.call("PUT", "/v1/agent/check/pass/db-ttl").status == 200
    for name_or_id in ("primary-db", query_id):
        result = agent.get(f"/v1/query/{name_or_id}/execute")
        assert [node["Service"]["ID"] for node in result["Nodes"]] == ["db"]
        assert result["Nodes"][0]["Node"]["Node"] == "node-1"

    taken = agent.call("POST", "/v1/query", {"Name": "primary-db", "Service": {"Service": "web"}})
    assert taken.status == 409 and query_id in text(taken)
    assert agent.call("GET", "/v1/query/no-such-query/execute").status == 404
    assert agent.call("GET", "/v1/query/primary-db/execute?limit=few").status == 400
    assert agent.call("DELETE", f"/v1/query/{query_id}").status == 200
    assert agent.call("GET", "/v1/query/primary-db/execute").status == 404


def test_an_invalid_prepared_query_is_400_and_so_is_a_template_that_cannot_be_rendered(agent: Agent) -> None:
    missing = agent.call("POST", "/v1/query", {"Name": "q"})
    assert missing.status == 400 and "Invalid prepared query" in text(missing) and "Service" in text(missing)
    template = {
        "Name": "geo-",
        "Template": {"Type": "name_prefix_match"},
        "Service": {"Service": "${nonsense}"},
    }
    assert agent.call("POST", "/v1/query", template).status == 200
    # The expression is only resolved on execution: InvalidDefinition, mapped to 400 by the router.
    rendered = agent.call("GET", "/v1/query/geo-db/execute")
    assert rendered.status == 400 and "${nonsense}" in text(rendered)


def test_a_template_query_renders_the_name_it_was_called_by(agent: Agent) -> None:
    template = {
        "Name": "find-",
        "Template": {"Type": "name_prefix_match"},
        "Service": {"Service": "${name.suffix}"},
    }
    assert agent.call("POST", "/v1/query", template).status == 200
    assert agent.call("PUT", "/v1/agent/check/pass/db-ttl").status == 200
    assert agent.get("/v1/query/find-db/execute")["Service"] == "db"
    assert [node["Service"]["ID"] for node in agent.get("/v1/query/find-db/execute")["Nodes"]] == ["db"]
    assert agent.get("/v1/query/find-web/execute")["Service"] == "web"


def test_prepared_query_tokens_are_shown_only_to_the_master_when_acls_are_on(
    agents: Callable[..., Agent],
) -> None:
    agent = agents(**ACL_ALLOW)
    body = {"Name": "q", "Token": "query-secret", "Service": {"Service": "db"}}
    assert agent.call("POST", "/v1/query", body).status == 200
    assert [query["Token"] for query in agent.get("/v1/query")] == ["<hidden>"]
    assert [query["Token"] for query in agent.get("/v1/query", token=MASTER)] == ["query-secret"]
    assert agent.call("GET", "/v1/query", token=agent.token("web-proxy")).status == 403


def test_intentions_by_name_as_consul_1_9_clients_use_them(agent: Agent) -> None:
    exact = "/v1/connect/intentions/exact?source=web&destination=db"
    assert agent.call("GET", exact).status == 404
    created = agent.call("PUT", exact, {"Action": "deny", "Description": "not yet"})
    assert (created.status, json.loads(created.body)) == (200, True)
    stored = agent.get(exact)
    assert (stored["SourceName"], stored["DestinationName"], stored["Action"]) == ("web", "db", "deny")
    replaced = agent.call("PUT", exact, {"Action": "allow"})
    assert replaced.status == 200
    [only] = agent.get("/v1/connect/intentions")  # replaced in place, not a second one
    assert (only["ID"], only["Action"]) == (stored["ID"], "allow")
    assert json.loads(agent.call("DELETE", exact).body) is True
    assert agent.get("/v1/connect/intentions") == []
    assert agent.call("DELETE", exact).status == 200  # gone already: still true, as Consul
    assert agent.call("PUT", "/v1/connect/intentions/exact?source=web", {"Action": "allow"}).status == 400


@pytest.mark.parametrize(
    ("method", "target", "says"),
    [
        ("GET", "/v1/kv/app/db?recurse", "the KV store"),
        ("PUT", "/v1/session/create", "sessions"),
        ("PUT", "/v1/event/fire/deploy", "user events"),
        ("GET", "/v1/acl/tokens", "ACL management"),
        ("PUT", "/v1/txn", "transactions"),
        ("GET", "/v1/coordinate/nodes", "network coordinates"),
        ("GET", "/v1/operator/raft/configuration", "operator endpoints"),
        ("GET", "/v1/snapshot", "snapshots"),
        ("PUT", "/v1/catalog/register", "catalog registration"),
    ],
)
def test_what_this_agent_does_not_implement_is_a_501_that_says_so(
    agent: Agent, method: str, target: str, says: str
) -> None:
    response = agent.call(method, target, {} if method == "PUT" else None)
    assert response.status == 501
    assert says in text(response) and "proxy-supervisor does not implement" in text(response)


def test_paths_are_cleaned_and_options_names_the_methods(agent: Agent) -> None:
    assert json.loads(agent.call("GET", "//v1/agent//self").body)["Config"]["NodeName"] == "node-1"
    options = agent.call("OPTIONS", "/v1/agent/service/register")
    assert options.status == 200 and "PUT" in options.headers["Allow"]
    pretty = agent.call("GET", "/v1/catalog/datacenters?pretty")
    assert pretty.body == b'[\n    "dc1"\n]\n'


def test_other_datacenters_are_refused_only_where_consul_forwards(agent: Agent) -> None:
    for target in ("/v1/catalog/services?dc=eu", "/v1/query?dc=eu", "/v1/connect/intentions?dc=eu"):
        response = agent.call("GET", target)
        assert (response.status, text(response)) == (503, "No path to datacenter"), target
    assert agent.call("GET", "/v1/agent/services?dc=eu").status == 200  # the agent's own: dc ignored
    assert agent.call("GET", "/v1/catalog/services?dc=dc1").status == 200
