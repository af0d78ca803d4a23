"""``connect.sidecar_service`` (Consul 1.3+): Consul 1.3-1.5's defaults and refusals in
config files (``supervisor/config/sidecars.py`` via ``build_config``), API registrations
with their sidecar (kept with the assigned port, removed with the parent), discovery of
sidecars, and supervision of config-file sidecars when ``supervise_sidecars`` is set."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.catalog.registry import Registry
from supervisor.catalog.status import CheckKind
from supervisor.config.build import build_config
from supervisor.config.model import AgentConfig, ServiceDef, thaw
from supervisor.config.registrations import build_registration, registration_builder
from supervisor.config.sidecars import SidecarPorts
from supervisor.config.sources import Source
from supervisor.errors import ConfigError
from supervisor.supervision.desired import plan_proxies
from tests.helpers.inprocess_api import Agent, text

WEB: dict[str, Any] = {
    "name": "web",
    "port": 8080,
    "tags": ["v1"],
    "meta": {"team": "a"},
    "connect": {
        "sidecar_service": {"proxy": {"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]}}
    },
}


def services(*defined: dict[str, Any], **document: Any) -> dict[str, ServiceDef]:
    built = build_config([], {"data_dir": "/d", "services": list(defined), **document})
    return {service.id: service for service in built.services}


def problems(*defined: dict[str, Any], **document: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        build_config(
            [
                Source(
                    "web.json", "json", json.dumps({"data_dir": "/d", "services": list(defined), **document})
                )
            ]
        )
    return [str(problem) for problem in raised.value.problems]


def test_a_sidecar_gets_consuls_defaults() -> None:
    sidecar = services(WEB)["web-sidecar-proxy"]
    assert (sidecar.name, sidecar.kind, sidecar.port, sidecar.sidecar_for) == (
        "web-sidecar-proxy",
        "connect-proxy",
        21000,
        "web",
    )
    assert sidecar.proxy is not None
    assert (sidecar.proxy.destination_service_name, sidecar.proxy.destination_service_id) == ("web", "web")
    assert (sidecar.proxy.local_service_address, sidecar.proxy.local_service_port) == ("127.0.0.1", 8080)
    assert [u.destination_name for u in sidecar.proxy.upstreams] == ["db"]
    # Tags and meta come from the parent (Consul 1.4.3+).
    assert (sidecar.tags, thaw(sidecar.meta)) == (("v1",), {"team": "a"})
    listening, aliasing = sidecar.checks
    assert (listening.check_id, listening.name, listening.kind, listening.target) == (
        "service:web-sidecar-proxy:1",
        "Connect Sidecar Listening",
        CheckKind.TCP,
        "127.0.0.1:21000",
    )
    assert (aliasing.check_id, aliasing.name, aliasing.kind, aliasing.alias_service) == (
        "service:web-sidecar-proxy:2",
        "Connect Sidecar Aliasing web",
        CheckKind.ALIAS,
        "web",
    )


def test_every_default_can_be_overridden() -> None:
    block = {
        "name": "web-envoy",
        "port": 21500,
        "address": "10.0.0.5",
        "tags": ["proxy"],
        "meta": {"role": "edge"},
        "check": {"name": "up", "tcp": "127.0.0.1:21500", "interval": "5s"},
        "proxy": {"local_service_address": "127.0.0.2", "local_service_port": 9090},
    }
    sidecar = services({**WEB, "connect": {"sidecar_service": block}})["web-sidecar-proxy"]
    assert (sidecar.name, sidecar.port, sidecar.address, sidecar.tags) == (
        "web-envoy",
        21500,
        "10.0.0.5",
        ("proxy",),
    )
    assert thaw(sidecar.meta) == {"role": "edge"}  # all or nothing: none of the parent's
    assert [(c.check_id, c.name) for c in sidecar.checks] == [("service:web-sidecar-proxy", "up")]
    assert sidecar.proxy is not None
    assert (sidecar.proxy.local_service_address, sidecar.proxy.local_service_port) == ("127.0.0.2", 9090)


def test_ports_are_the_lowest_free_and_a_reload_keeps_each_sidecars_port() -> None:
    db = {"name": "db", "port": 21000, "connect": {"sidecar_service": {}}}
    first = services(WEB, db)
    assert (first["web-sidecar-proxy"].port, first["db-sidecar-proxy"].port) == (21001, 21002)
    # A new service in front of the others: without the running ports it would take 21001.
    cache = {"name": "cache", "port": 6379, "connect": {"sidecar_service": {}}}
    kept = SidecarPorts.of(first.values())
    reloaded = build_config([], {"data_dir": "/d", "services": [cache, WEB, db]}, sidecar_ports=kept).services
    ports = {s.id: s.port for s in reloaded if s.sidecar_for}
    assert ports == {"cache-sidecar-proxy": 21003, "web-sidecar-proxy": 21001, "db-sidecar-proxy": 21002}


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"id": "mine"}, "cannot specify an ID"),
        ({"connect": {"sidecar_service": {}}}, "cannot have a nested one"),
        ({"connect": {"proxy": {}}}, "cannot have a managed proxy"),
        ({"connect": {"native": True}}, "cannot also be Connect-native"),
    ],
)
def test_what_a_sidecar_cannot_override_is_refused(block: dict[str, Any], expected: str) -> None:
    (problem,) = problems({**WEB, "connect": {"sidecar_service": block}})
    assert "web.json" in problem and "sidecar_service" in problem and expected in problem


def test_a_managed_proxy_and_a_sidecar_on_one_service_are_refused() -> None:
    (problem,) = problems({**WEB, "connect": {**WEB["connect"], "proxy": {}}})
    assert "both a managed proxy" in problem and "proxy-supervisor convert" in problem


def test_no_port_left_or_auto_assignment_off_is_reported_with_consuls_words() -> None:
    db = {"name": "db", "port": 1, "connect": {"sidecar_service": {}}}
    (full,) = problems(WEB, db, ports={"sidecar_min_port": 21000, "sidecar_max_port": 21000})
    assert "none left in the configured range [21000, 21000]" in full and "services[1]" in full
    (off,) = problems(WEB, ports={"sidecar_min_port": 0})
    assert "auto-assignment disabled" in off


def test_supervised_sidecars_are_planned_as_managed_proxies_on_the_sidecar_port() -> None:
    built = build_config(
        [], {"data_dir": "/d", "services": [WEB], "connect": {"proxy": {"supervise_sidecars": True}}}
    )
    parent = built.service("web")
    assert parent is not None and parent.supervises_sidecar and parent.proxy_id == "web-sidecar-proxy"
    plan = plan_proxies(built, "127.0.0.1:8500", {}, lambda host, port: True, rng=random.Random(1))
    (planned,) = plan.proxies.values()
    assert (planned.proxy_id, planned.port) == ("web-sidecar-proxy", 21000)
    assert [u.local_bind_port for u in planned.upstreams] == [9191]
    assert planned.config["local_service_address"] == "127.0.0.1:8080"


# -- API registrations ------------------------------------------------------------------------

API_WEB = {
    "Name": "api",
    "Port": 7000,
    "Connect": {
        "SidecarService": {"Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9292}]}}
    },
}


def test_a_registered_sidecar_is_discovered_and_leaves_with_its_parent(agents: Callable[..., Agent]) -> None:
    agent = agents()
    assert agent.call("PUT", "/v1/agent/service/register", API_WEB).status == 200
    listed = agent.get("/v1/agent/services")
    sidecar = listed["api-sidecar-proxy"]
    assert (sidecar["Kind"], sidecar["Service"], sidecar["Port"]) == (
        "connect-proxy",
        "api-sidecar-proxy",
        21000,
    )
    assert sidecar["Proxy"]["DestinationServiceID"] == "api"
    assert sidecar["Proxy"]["Upstreams"][0]["LocalBindPort"] == 9292
    [entry] = agent.get("/v1/health/connect/api")
    assert entry["Service"]["ID"] == "api-sidecar-proxy"
    names = {check["Name"] for check in entry["Checks"]}
    assert {"Connect Sidecar Listening", "Connect Sidecar Aliasing api"} <= names

    # Re-registering keeps the port, even after another sidecar took the next one.
    other = {"Name": "other", "Port": 7001, "Connect": {"SidecarService": {}}}
    assert agent.call("PUT", "/v1/agent/service/register", other).status == 200
    assert agent.call("PUT", "/v1/agent/service/register", API_WEB).status == 200
    ports = {k: v["Port"] for k, v in agent.get("/v1/agent/services").items() if k.endswith("sidecar-proxy")}
    assert ports == {"api-sidecar-proxy": 21000, "other-sidecar-proxy": 21001}

    assert agent.call("PUT", "/v1/agent/service/deregister/api").status == 200
    listed = agent.get("/v1/agent/services")
    assert "api" not in listed and "api-sidecar-proxy" not in listed and "other-sidecar-proxy" in listed
    assert agent.get("/v1/health/connect/api") == []


def test_a_registration_with_a_bad_sidecar_is_400_naming_it(agents: Callable[..., Agent]) -> None:
    agent = agents()
    bad = {**API_WEB, "Connect": {"SidecarService": {"ID": "mine"}}}
    response = agent.call("PUT", "/v1/agent/service/register", bad)
    assert (
        response.status == 400
        and "SidecarService" in text(response)
        and "cannot specify an ID" in text(response)
    )
    assert "api" not in agent.get("/v1/agent/services")


def test_a_config_file_sidecar_is_hidden_with_its_parent(agents: Callable[..., Agent]) -> None:
    agent = agents(services=[WEB])
    assert "web-sidecar-proxy" in agent.get("/v1/agent/services")
    assert agent.call("PUT", "/v1/agent/service/deregister/web").status == 200
    listed = agent.get("/v1/agent/services")
    assert "web" not in listed and "web-sidecar-proxy" not in listed


def test_api_sidecars_are_supervised_only_when_managed_api_registration_is_allowed() -> None:
    def built(allow: bool) -> tuple[ServiceDef, ...]:
        proxy = {"supervise_sidecars": True, "allow_managed_api_registration": allow}
        config = build_config([], {"data_dir": "/d", "connect": {"proxy": proxy}})
        return registration_builder(config)(API_WEB, "<api>")

    assert not built(False)[0].supervises_sidecar
    assert built(True)[0].supervises_sidecar


def test_a_kept_registration_holds_the_assigned_port_and_loses_a_deregistered_sidecar(tmp_path: Path) -> None:
    config = AgentConfig(data_dir=str(tmp_path))
    build = registration_builder(config)
    registry = Registry(str(tmp_path / "services"))
    group, kept = build_registration(API_WEB, "<api>", config, ())
    registry.register(group, kept)
    saved = json.loads((tmp_path / "services" / "api.json").read_text())
    assert saved["Service"]["Connect"]["SidecarService"]["Port"] == 21000
    again = Registry(str(tmp_path / "services"))
    again.load(build)
    assert [(s.id, s.port) for s in again.services] == [("api", 7000), ("api-sidecar-proxy", 21000)]
    assert again.deregister("api-sidecar-proxy")
    reloaded = Registry(str(tmp_path / "services"))
    reloaded.load(build)
    assert [s.id for s in reloaded.services] == ["api"]


def test_another_registrations_sidecar_id_is_taken(agents: Callable[..., Agent]) -> None:
    agent = agents()
    assert agent.call("PUT", "/v1/agent/service/register", API_WEB).status == 200
    stolen = agent.call("PUT", "/v1/agent/service/register", {"Name": "imp", "ID": "api-sidecar-proxy"})
    assert stolen.status == 409 and "sidecar of api" in text(stolen)
    nested = {**API_WEB, "Connect": {"SidecarService": {"Connect": {"SidecarService": {}}}}}
    assert agent.call("PUT", "/v1/agent/service/register", nested).status == 400
    weightless = {"Name": "w", "Port": 1, "Weights": {"Passing": 0, "Warning": 1}}
    assert agent.call("PUT", "/v1/agent/service/register", weightless).status == 400


def test_a_config_file_definition_replaces_an_api_registration_of_its_id(
    agents: Callable[..., Agent],
) -> None:
    agent = agents()
    assert agent.call("PUT", "/v1/agent/service/register", {"Name": "late", "Port": 4444}).status == 200
    agent.reload_config(services=[*agent.document["services"], {"name": "late", "port": 5555}])
    assert agent.get("/v1/agent/services")["late"]["Port"] == 5555
    assert agent.plane.registry.get("late") is None
