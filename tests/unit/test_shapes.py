"""Domain objects to Consul's wire JSON (``api/shapes.py``, ``api/catalog_shapes.py``,
``api/connect_shapes.py``) and the per-query result index of ``api/results.py``.

Inputs are real: a configuration parsed by ``supervisor.config``, proxies planned by
``plan_proxies``, catalog instances from ``instances_of``, intentions and prepared queries
parsed as the API parses them. Every shape is taken through ``Response.json`` and read
back, so what is checked is what a Consul client decodes: Consul 1.3-1.5 field names,
and JSON types (a check status is a string, tags a list, a port a number).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import itertools
import json
import random
from typing import Any

from supervisor.api.blocking import content_hash
from supervisor.api.catalog_shapes import catalog_entry_json, check_json, health_entry_json, node_json
from supervisor.api.connect_shapes import intention_json, query_json
from supervisor.api.http import Response
from supervisor.api.results import Results
from supervisor.api.shapes import (
    CONSUL_COMPATIBLE_VERSION,
    agent_self_json,
    agent_services,
    managed_proxy_service_json,
    proxy_config_json,
    proxy_status_json,
    service_json,
)
from supervisor.catalog.catalog import Sources, instances_of
from supervisor.catalog.index import Index
from supervisor.catalog.intentions import Action, Intention
from supervisor.catalog.model import CheckResult, Entry, Node
from supervisor.catalog.queries import PreparedQuery, parse_query
from supervisor.catalog.status import CheckStatus
from supervisor.config.build import build_config
from supervisor.config.model import AgentConfig
from supervisor.config.registrations import build_service
from supervisor.config.sources import Source
from supervisor.supervision.desired import plan_proxies
from supervisor.supervision.machine import State
from supervisor.supervision.view import AgentView, ProxyStatus

API_ADDRESS = "127.0.0.1:8500"
NODE = Node("4b8c0a9e-1111-2222-3333-444455556666", "node-1", "10.1.2.3", "dc1", {"rack": "r1"})

SERVICES: list[dict[str, Any]] = [
    {
        "name": "web",
        "port": 8080,
        "tags": ["v1"],
        "connect": {
            "proxy": {
                "command": ["/usr/bin/my-proxy", "-v"],
                "config": {"timeout_ms": 500},
                "upstreams": [
                    {"destination_name": "db", "local_bind_port": 9191, "config": {"retries": [1, 2]}}
                ],
            }
        },
    },
    {"name": "pinned", "port": 8081, "connect": {"proxy": {"config": {"bind_address": "127.0.0.2"}}}},
    {
        "id": "db-1",
        "name": "db",
        "address": "10.0.0.5",
        "port": 5432,
        "tags": ["primary", "eu"],
        "meta": {"version": "11"},
        "weights": {"passing": 3, "warning": 2},
        "check": {"id": "db-ttl", "ttl": "30s"},
    },
    {"name": "native", "port": 7000, "connect": {"native": True}},
    {
        "name": "legacy-proxy",
        "kind": "connect-proxy",
        "port": 21000,
        "proxy": {"destination_service_name": "legacy", "local_service_port": 7001},
    },
]


def wire(data: Any) -> Any:
    """What a client reads: the JSON body the API would send."""
    return json.loads(Response.json(data).body)


def make_config(services: list[dict[str, Any]] = SERVICES, **settings: Any) -> AgentConfig:
    document = {"node_name": "node-1", "bind_addr": "10.1.2.3", "services": services, **settings}
    return build_config([Source("agent.json", "json", json.dumps(document))], dev=True)


def make_view(config: AgentConfig | None = None) -> AgentView:
    config = config or make_config()
    tokens = itertools.count(1)
    plan = plan_proxies(
        config,
        API_ADDRESS,
        {},
        lambda host, port: True,
        new_token=lambda: f"token-{next(tokens)}",
        rng=random.Random(7),  # the same ports on every planning
    )
    return AgentView(config=config, node_id=NODE.node_id, api_address=API_ADDRESS, proxies=plan.proxies)


def check_result(status: CheckStatus = CheckStatus.PASSING) -> CheckResult:
    return CheckResult("db-ttl", "DB alive", status, "ok", "a note", "db-1", "db", ("primary", "eu"), 11, 12)


# -- /v1/agent/services --------------------------------------------------------------------------


def test_an_agent_service_has_consuls_field_names_and_types() -> None:
    view = make_view()
    data = wire(agent_services(view)["db-1"])
    without_hash = {key: value for key, value in data.items() if key != "ContentHash"}
    assert without_hash == {
        "Kind": "",
        "ID": "db-1",
        "Service": "db",
        "Tags": ["primary", "eu"],
        "Meta": {"version": "11"},
        "Port": 5432,
        "Address": "10.0.0.5",
        "Weights": {"Passing": 3, "Warning": 2},
        "EnableTagOverride": False,
    }
    # ContentHash is the hash of everything else (what ?hash= blocking compares): it
    # moves with the registration, and only with it.
    assert data["ContentHash"] == content_hash(without_hash)
    service = view.config.service("db-1")
    assert service is not None
    assert service_json(dataclasses.replace(service), None)["ContentHash"] == data["ContentHash"]
    retagged = dataclasses.replace(service, tags=("primary",))
    assert service_json(retagged, None)["ContentHash"] != data["ContentHash"]


def test_a_service_with_a_managed_proxy_shows_the_proxy_under_connect() -> None:
    view = make_view()
    planned = view.proxies["web-proxy"]
    proxy = wire(agent_services(view)["web"])["Connect"]["Proxy"]
    assert proxy["ExecMode"] == "daemon"
    assert proxy["Command"] == ["/usr/bin/my-proxy", "-v"]
    assert proxy["Config"] == {
        "timeout_ms": 500,
        "bind_port": planned.port,
        "bind_address": "10.1.2.3",
        "local_service_address": "127.0.0.1:8080",
    }
    assert proxy["Upstreams"] == [
        {
            "DestinationType": "service",
            "DestinationNamespace": "",
            "DestinationName": "db",
            "Datacenter": "",
            "LocalBindAddress": "127.0.0.1",
            "LocalBindPort": 9191,
            "Config": {"retries": [1, 2]},
        }
    ]


def test_the_managed_proxy_registration_points_back_at_its_service() -> None:
    view = make_view()
    planned = view.proxies["web-proxy"]
    data = wire(managed_proxy_service_json(planned))
    assert (data["Kind"], data["ID"], data["Service"]) == ("connect-proxy", "web-proxy", "web-proxy")
    assert data["Port"] == planned.port and isinstance(data["Port"], int) and data["Port"] > 0
    assert data["ProxyDestination"] == "web"
    assert data["Proxy"]["DestinationServiceName"] == "web"
    assert data["Proxy"]["DestinationServiceID"] == "web"
    # local_service_address "127.0.0.1:8080" is split in Consul's two fields.
    assert (data["Proxy"]["LocalServiceAddress"], data["Proxy"]["LocalServicePort"]) == ("127.0.0.1", 8080)
    assert data["Address"] == "10.1.2.3"  # the proxy's bind address (the agent's bind_addr here)
    # A proxy bound to a wildcard address registers none.
    wildcard = make_view(make_config(bind_addr="0.0.0.0"))
    assert wire(managed_proxy_service_json(wildcard.proxies["web-proxy"]))["Address"] == ""
    assert wire(managed_proxy_service_json(wildcard.proxies["pinned-proxy"]))["Address"] == "127.0.0.2"


def test_native_apps_and_hand_registered_connect_proxies_have_their_own_blocks() -> None:
    services = wire(agent_services(make_view()))
    assert services["native"]["Connect"] == {"Native": True}
    legacy = services["legacy-proxy"]
    assert legacy["Kind"] == "connect-proxy" and legacy["ProxyDestination"] == "legacy"
    assert legacy["Proxy"]["DestinationServiceName"] == "legacy"
    assert legacy["Proxy"]["LocalServicePort"] == 7001
    assert "Connect" not in services["db-1"] and "Proxy" not in services["db-1"]


def test_agent_services_lists_configured_registered_and_managed_proxies_by_id() -> None:
    view = make_view()
    registered = build_service(
        {"ID": "cache-2", "Name": "cache", "Port": 6379}, "request body", view.config.proxy_defaults
    )
    services = agent_services(view, (registered,))
    assert set(services) == {
        "web",
        "web-proxy",
        "pinned",
        "pinned-proxy",
        "db-1",
        "native",
        "legacy-proxy",
        "cache-2",
    }
    assert all(services[service_id]["ID"] == service_id for service_id in services)


def test_the_proxy_config_endpoint_shape_and_its_hash() -> None:
    view = make_view()
    data = wire(proxy_config_json(view.proxies["web-proxy"]))
    assert (data["ProxyServiceID"], data["TargetServiceID"], data["TargetServiceName"]) == (
        "web-proxy",
        "web",
        "web",
    )
    assert data["Config"]["bind_port"] == view.proxies["web-proxy"].port
    assert data["Upstreams"][0]["DestinationName"] == "db"
    # A proxy blocks on this hash: the same plan gives the same hash, a config change another.
    assert proxy_config_json(make_view().proxies["web-proxy"])["ContentHash"] == data["ContentHash"]
    web = copy.deepcopy(SERVICES[0])
    web["connect"]["proxy"]["config"]["timeout_ms"] = 900
    changed = make_view(make_config([web, *SERVICES[1:]]))
    assert changed.proxies["web-proxy"].port == view.proxies["web-proxy"].port
    assert proxy_config_json(changed.proxies["web-proxy"])["ContentHash"] != data["ContentHash"]


# -- discovery -------------------------------------------------------------------------------------


def test_a_check_has_consuls_field_names_and_a_string_status() -> None:
    assert wire(check_json(check_result(CheckStatus.WARNING), "node-1")) == {
        "Node": "node-1",
        "CheckID": "db-ttl",
        "Name": "DB alive",
        "Status": "warning",
        "Notes": "a note",
        "Output": "ok",
        "ServiceID": "db-1",
        "ServiceName": "db",
        "ServiceTags": ["primary", "eu"],
        "Definition": {},
        "CreateIndex": 11,
        "ModifyIndex": 12,
    }


def entry_of(service_id: str, index: int = 42) -> Entry:
    instances, _, _ = instances_of(make_view(), Sources())
    return Entry(NODE, instances[service_id], (check_result(),), index)


def test_a_health_entry_is_node_service_and_checks() -> None:
    data = wire(health_entry_json(entry_of("db-1", index=42)))
    assert set(data) == {"Node", "Service", "Checks"}
    assert data["Node"] == wire(node_json(NODE))
    assert data["Node"]["TaggedAddresses"] == {"lan": "10.1.2.3", "wan": "10.1.2.3"}
    assert data["Node"]["Meta"] == {"consul-network-segment": "", "rack": "r1"}
    service = data["Service"]
    assert (service["ID"], service["Service"], service["Port"]) == ("db-1", "db", 5432)
    assert (service["CreateIndex"], service["ModifyIndex"]) == (42, 42)
    assert "ContentHash" not in service  # only the agent endpoints carry one
    assert [check["CheckID"] for check in data["Checks"]] == ["db-ttl"]
    assert data["Checks"][0]["Node"] == "node-1" and data["Checks"][0]["Status"] == "passing"


def test_a_catalog_entry_is_consuls_flat_catalog_service() -> None:
    data = wire(catalog_entry_json(entry_of("db-1", index=43)))
    assert data == {
        "ID": NODE.node_id,
        "Node": "node-1",
        "Address": "10.1.2.3",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "10.1.2.3", "wan": "10.1.2.3"},
        "NodeMeta": {"consul-network-segment": "", "rack": "r1"},
        "ServiceKind": "",
        "ServiceID": "db-1",
        "ServiceName": "db",
        "ServiceTags": ["primary", "eu"],
        "ServiceAddress": "10.0.0.5",
        "ServiceWeights": {"Passing": 3, "Warning": 2},
        "ServiceMeta": {"version": "11"},
        "ServicePort": 5432,
        "ServiceEnableTagOverride": False,
        "ServiceProxyDestination": "",
        "ServiceProxy": {},
        "ServiceConnect": {},
        "CreateIndex": 43,
        "ModifyIndex": 43,
    }


def test_a_managed_proxy_in_the_catalog_names_the_service_it_fronts() -> None:
    data = wire(catalog_entry_json(entry_of("web-proxy")))
    assert (data["ServiceKind"], data["ServiceID"], data["ServiceName"]) == (
        "connect-proxy",
        "web-proxy",
        "web-proxy",
    )
    assert data["ServiceProxyDestination"] == "web"
    assert data["ServiceProxy"]["DestinationServiceName"] == "web"
    assert data["ServicePort"] == make_view().proxies["web-proxy"].port


# -- intentions and prepared queries ------------------------------------------------------------


def intention(source: str, destination: str, action: Action = Action.ALLOW, **fields: Any) -> Intention:
    return Intention(
        id=f"{source}->{destination}",
        source_name=source,
        destination_name=destination,
        action=action,
        **fields,
    )


def test_an_intention_has_consuls_fields_and_precedence() -> None:
    denied = intention(
        "web", "db", Action.DENY, description="no", meta={"owner": "ops"}, create_index=3, modify_index=4
    )
    data = wire(intention_json(denied))
    assert {key: data[key] for key in data if key != "Hash"} == {
        "ID": "web->db",
        "Description": "no",
        "SourceNS": "default",
        "SourceName": "web",
        "DestinationNS": "default",
        "DestinationName": "db",
        "SourceType": "consul",
        "Action": "deny",
        "DefaultAddr": "",
        "DefaultPort": 0,
        "Meta": {"owner": "ops"},
        "Precedence": 9,
        "CreatedAt": "",
        "UpdatedAt": "",
        "CreateIndex": 3,
        "ModifyIndex": 4,
    }
    precedences = [
        wire(intention_json(intention(s, d)))["Precedence"]
        for s, d in [("*", "db"), ("web", "*"), ("*", "*")]
    ]
    assert precedences == [8, 6, 5]


def test_an_intentions_hash_is_base64_of_32_bytes_and_follows_the_action() -> None:
    allow = intention_json(intention("web", "db", Action.ALLOW))["Hash"]
    assert len(base64.b64decode(allow, validate=True)) == 32
    assert intention_json(intention("web", "db", Action.ALLOW))["Hash"] == allow
    assert intention_json(intention("web", "db", Action.DENY))["Hash"] != allow


def test_a_prepared_query_hides_its_token_unless_told_to_show_it() -> None:
    query = PreparedQuery(
        "q-1", parse_query({"Name": "db-near", "Token": "s3cret", "Service": {"Service": "db"}}), 5, 6
    )
    shown, hidden = wire(query_json(query, show_token=True)), wire(query_json(query, show_token=False))
    assert (shown["Token"], hidden["Token"]) == ("s3cret", "<hidden>")
    assert "s3cret" not in json.dumps(hidden)
    tokenless = PreparedQuery("q-2", parse_query({"Service": {"Service": "db"}}), 7, 7)
    assert wire(query_json(tokenless, show_token=False))["Token"] == ""


def test_a_prepared_query_shows_unset_fields_as_consul_does() -> None:
    definition = parse_query(
        {
            "Name": "db-",
            "Service": {"Service": "${name.suffix}", "Tags": ["primary"], "OnlyPassing": True},
            "Template": {"Type": "name_prefix_match"},
            "DNS": {"TTL": "10s"},
        }
    )
    data = wire(query_json(PreparedQuery("q-3", definition, 8, 9), show_token=False))
    assert data["Service"] == {
        "Service": "${name.suffix}",
        "Failover": {"NearestN": 0, "Datacenters": None},
        "OnlyPassing": True,
        "IgnoreCheckIDs": None,
        "Near": "",
        "Tags": ["primary"],
        "NodeMeta": None,
        "ServiceMeta": None,
        "Connect": False,
    }
    assert data["Template"] == {"Type": "name_prefix_match", "Regexp": "", "RemoveEmptyTags": False}
    assert (data["ID"], data["Name"], data["DNS"], data["CreateIndex"], data["ModifyIndex"]) == (
        "q-3",
        "db-",
        {"TTL": "10s"},
        8,
        9,
    )
    plain = wire(
        query_json(PreparedQuery("q-4", parse_query({"Service": {"Service": "db"}}), 1, 1), show_token=True)
    )
    assert plain["Template"] == {"Type": "", "Regexp": "", "RemoveEmptyTags": False}


# -- the agent's own endpoints ---------------------------------------------------------------------


def test_a_proxy_status_reports_uptime_and_the_next_attempt_relative_to_now() -> None:
    status = ProxyStatus(
        proxy_id="web-proxy",
        service_id="web",
        state=State.BACKOFF,
        pid=None,
        generation=3,
        restarts=2,
        adopted=False,
        last_exit="exited with code 1",
        started_monotonic=100.0,
        started_wall=1_700_000_000.0,
        next_attempt_monotonic=104.5,
        blocked_reason=None,
        port=21000,
        command=("/bin/true",),
        stdout_log="/logs/web-proxy.out",
        stderr_log=None,
    )
    data = wire(proxy_status_json(status, now_monotonic=102.25, check=check_result(CheckStatus.CRITICAL)))
    assert (data["State"], data["Generation"], data["Restarts"], data["Pid"]) == ("backoff", 3, 2, None)
    assert data["UptimeSeconds"] == 2.25 and data["NextAttemptInSeconds"] == 2.25
    assert data["StartedAt"] == "2023-11-14T22:13:20Z"
    assert data["Check"] == {"Status": "critical", "Output": "ok"}
    overdue = wire(proxy_status_json(status, now_monotonic=110.0))
    assert overdue["NextAttemptInSeconds"] == 0.0 and overdue["Check"] is None


def test_agent_self_reports_the_consul_version_it_speaks_and_the_acl_setting() -> None:
    view = make_view(make_config(datacenter="eu-west", acl={"enabled": True}))
    data = wire(agent_self_json(view))
    assert data["Config"]["Datacenter"] == "eu-west" and data["Config"]["NodeName"] == "node-1"
    assert data["Config"]["NodeID"] == NODE.node_id and data["Config"]["Version"] == CONSUL_COMPATIBLE_VERSION
    assert data["DebugConfig"]["ACLsEnabled"] is True
    assert data["Member"]["Tags"]["dc"] == "eu-west"
    assert data["Stats"]["agent"]["managed_proxies"] == "2"  # Consul's stats are strings
    assert data["Stats"]["proxy-supervisor"]["api_address"] == API_ADDRESS


# -- results: when an answer's index moves ------------------------------------------------------------


class Answer:
    def __init__(self, value: Any) -> None:
        self.value = value
        self.computed = 0

    def __call__(self) -> Any:
        self.computed += 1
        return self.value


def test_an_answers_index_moves_only_when_the_answer_does() -> None:
    index = Index()
    results = Results(index)
    answer = Answer(["web"])
    _, first = results.get("services", answer)
    index.next()  # something else changed
    data, unchanged = results.get("services", answer)
    assert (data, unchanged) == (["web"], first)
    answer.value = ["web", "db"]
    index.next()
    data, moved = results.get("services", answer)
    assert data == ["web", "db"] and moved == index.value > first


def test_waiters_of_one_query_share_one_computation_while_nothing_changes() -> None:
    index = Index()
    results = Results(index)
    answer = Answer({"a": 1})
    for _ in range(100):
        results.get(("health", "web"), answer)
    assert answer.computed == 1
    index.next()
    results.get(("health", "web"), answer)
    assert answer.computed == 2


def test_the_least_recently_used_answers_are_forgotten_beyond_capacity() -> None:
    index = Index()
    results = Results(index, capacity=2)
    answers = {key: Answer(key) for key in ("a", "b", "c")}
    for key in ("a", "b"):
        results.get(key, answers[key])
    results.get("a", answers["a"])  # "a" is used again: "b" is now the oldest
    results.get("c", answers["c"])
    for key in ("a", "c", "b"):
        results.get(key, answers[key])
    assert {key: answer.computed for key, answer in answers.items()} == {"a": 1, "b": 2, "c": 1}
