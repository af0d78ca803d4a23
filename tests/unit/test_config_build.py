"""Building an ``AgentConfig`` (``supervisor/config/build.py``) from validated documents:
defaults, Consul's key spellings in HCL and JSON drop-ins, checks, managed and
hand-registered proxies, proxy_defaults, API registrations (``build_service``) and the
rules that span files -- what tests/test_config.py does not already pin down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.catalog.status import CheckKind, CheckStatus
from supervisor.config.build import COMMAND_LINE, build_config, load_config
from supervisor.config.model import AgentConfig, ProxyDefaults, ServiceDef, thaw
from supervisor.config.registrations import build_service
from supervisor.config.sources import Source
from supervisor.errors import ConfigError


def config(**document: Any) -> AgentConfig:
    return build_config([], {"data_dir": "/d", **document})


def one_service(service: dict[str, Any], **document: Any) -> ServiceDef:
    (built,) = config(service=service, **document).services
    return built


def problems(document: dict[str, Any], name: str = "agent.json") -> list[str]:
    with pytest.raises(ConfigError) as raised:
        build_config([Source(name, "json", json.dumps({"data_dir": "/d", **document}))])
    return [str(problem) for problem in raised.value.problems]


# -- HCL and JSON drop-ins with Consul's spellings ------------------------------------------------


def test_camel_case_hcl_and_snake_case_json_drop_ins_build_the_same_services(tmp_path: Path) -> None:
    (tmp_path / "10-web.hcl").write_text(
        """
        service {
          ID = "web-1"
          Name = "web"
          Port = 8080
          Check {
            CheckID = "web-ttl"
            TTL = "15s"
            Status = "passing"
          }
          Connect {
            Proxy {
              Config {
                bind_port = 21000
                upstreams = [{
                  destination_name = "db", local_bind_port = 9000, destination_datacenter = "dc2"
                }]
              }
            }
          }
        }
        """
    )
    (tmp_path / "20-web.json").write_text(
        json.dumps(
            {
                "data_dir": "/d",
                "services": [
                    {
                        "id": "web-2",
                        "name": "web",
                        "port": 8081,
                        "check": {"check_id": "web-ttl-2", "ttl": "15s", "status": "passing"},
                        "connect": {
                            "proxy": {
                                "config": {"bind_port": 21001},
                                "upstreams": [
                                    {"destination_name": "db", "local_bind_port": 9001, "datacenter": "dc2"}
                                ],
                            }
                        },
                    }
                ],
            }
        )
    )
    built = load_config([], [str(tmp_path)])
    first, second = built.services
    assert built.sources == (str(tmp_path / "10-web.hcl"), str(tmp_path / "20-web.json"))
    for service, check_id in ((first, "web-ttl"), (second, "web-ttl-2")):
        (check,) = service.checks
        assert (check.check_id, check.kind, check.ttl, check.status) == (
            check_id,
            CheckKind.TTL,
            15.0,
            CheckStatus.PASSING,
        )
        assert service.managed_proxy is not None
        (upstream,) = service.managed_proxy.upstreams
        assert (upstream.destination_name, upstream.datacenter) == ("db", "dc2")
        assert "upstreams" not in service.managed_proxy.config  # moved out of the opaque map
    assert first.source == f"{tmp_path / '10-web.hcl'}: service"
    assert second.source == f"{tmp_path / '20-web.json'}: services[0]"


def test_a_scalar_set_twice_in_one_hcl_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.hcl"
    path.write_text('data_dir = "/d"\nnode_name = "a"\nnode_name = "b"\n')
    with pytest.raises(ConfigError, match=f"{path}: node_name: set more than once in this file"):
        load_config([str(path)], [])


def test_nested_settings_from_different_files_are_merged_key_by_key() -> None:
    built = build_config(
        [
            Source("a.json", "json", json.dumps({"connect": {"proxy_defaults": {"command": ["/bin/p"]}}})),
            Source("b.hcl", "hcl", 'data_dir = "/d"\nconnect { ca_config { leaf_cert_ttl = "1h" } }'),
        ]
    )
    assert built.proxy_defaults.command == ("/bin/p",)
    assert built.ca.leaf_cert_ttl == 3600.0


def test_problems_in_command_line_flags_are_named_as_such() -> None:
    with pytest.raises(ConfigError) as raised:
        build_config([], {"data_dir": "/d", "ports": {"http": "x"}})
    (problem,) = raised.value.problems
    assert (problem.source, problem.path) == (COMMAND_LINE, "ports.http")


# -- agent-level defaults and values ------------------------------------------------------------------


def test_defaults_not_covered_elsewhere() -> None:
    built = config()
    assert built.log_level == "INFO" and built.node_id is None and built.acl.enabled is False
    assert (built.http_max_conns_per_client, built.http_max_conns) == (200, 0)
    assert (built.proxy_log_max_bytes, built.proxy_log_max_files) == (10 * 1024 * 1024, 5)
    assert built.proxy_defaults == ProxyDefaults()
    assert built.services == () and built.sources == () and built.notices == ()


def test_dev_mode_needs_no_data_dir_and_logs_at_debug() -> None:
    built = build_config([], {}, dev=True)
    assert built.dev and built.data_dir is None and built.log_level == "DEBUG"
    assert build_config([], {"log_level": "warning"}, dev=True).log_level == "WARN"


@pytest.mark.parametrize(
    ("document", "address"),
    [
        ({"client_addr": "127.0.0.2 10.0.0.1"}, "127.0.0.2:8500"),  # Consul's list: the first one
        ({"client_addr": "::1"}, "[::1]:8500"),
        ({"client_addr": "[::1]"}, "[::1]:8500"),
        ({"client_addr": "10.0.0.1", "addresses": {"http": "127.0.0.9"}}, "127.0.0.9:8500"),
        ({"client_addr": " "}, "127.0.0.1:8500"),
    ],
)
def test_the_http_address_comes_from_addresses_then_client_addr(
    document: dict[str, Any], address: str
) -> None:
    assert config(**document).http_address == address


def test_sizes_accept_units() -> None:
    built = config(log_rotate_bytes="1g", connect={"proxy": {"log_max_bytes": "512KiB"}})
    assert (built.log_rotate_bytes, built.proxy_log_max_bytes) == (1000**3, 512 * 1024)


def test_an_explicit_acl_stanza_wins_over_legacy_keys() -> None:
    built = config(
        acl_datacenter="dc1",
        acl_default_policy="deny",
        acl_master_token="legacy",
        acl={"enabled": False, "default_policy": "allow", "tokens": {"master": "new"}},
    )
    assert (built.acl.enabled, built.acl.default_policy, built.acl.master_token) == (False, "allow", "new")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"node_id": "not-a-uuid"}, "node_id: 'not-a-uuid' is not a UUID"),
        (
            {"connect": {"ca_config": {"private_key": "KEY"}}},
            "connect.ca_config: private_key and root_cert must be given together",
        ),
        (
            {"connect": {"ca_config": {"leaf_cert_ttl": "5s"}}},
            "connect.ca_config.leaf_cert_ttl: must be between 10s and 8760h",
        ),
        (
            {"connect": {"proxy": {"group": "proxies"}}},
            "connect.proxy.group: needs connect.proxy.user",
        ),
        ({"connect": {"proxy": {"user": "../root"}}}, "'../root' is not a user or group name"),
        ({"log_rotate_bytes": "10 parsecs"}, 'expected a size such as 10485760 or "10MiB"'),
    ],
)
def test_bad_agent_values_are_reported_at_their_key(document: dict[str, Any], expected: str) -> None:
    found = problems(document)
    assert any(expected in problem for problem in found), found


# -- checks ------------------------------------------------------------------------------------------


def test_a_check_gets_consuls_defaults() -> None:
    service = one_service({"name": "web", "check": {"http": "http://127.0.0.1/health", "interval": "5s"}})
    (check,) = service.checks
    assert (check.check_id, check.name, check.target) == (
        "service:web",
        "Service 'web' check",
        "http://127.0.0.1/health",
    )
    assert (check.interval, check.timeout, check.method, check.status) == (
        5.0,
        10.0,
        "GET",
        CheckStatus.CRITICAL,  # unhealthy until it first passes
    )


def test_check_fields_are_read() -> None:
    service = one_service(
        {
            "name": "web",
            "checks": [
                {
                    "id": "explicit",
                    "check_id": "loses",
                    "name": "health endpoint",
                    "http": "https://127.0.0.1/h",
                    "method": "POST",
                    "header": {"X-One": "a", "X-Many": ["b", "c"]},
                    "tls_skip_verify": True,
                    "interval": "3s",
                    "timeout": "1s",
                    "notes": "page the on-call",
                    "deregister_critical_service_after": "1m",
                },
                {"tcp": "127.0.0.1:80", "interval": "10s", "status": "warning"},
            ],
        }
    )
    http, tcp = service.checks
    assert (http.check_id, http.name, http.method, http.tls_skip_verify) == (
        "explicit",
        "health endpoint",
        "POST",
        True,
    )
    assert thaw(http.header) == {"X-One": ["a"], "X-Many": ["b", "c"]}
    assert (http.timeout, http.notes, http.deregister_critical_service_after) == (
        1.0,
        "page the on-call",
        60.0,
    )
    assert (tcp.check_id, tcp.kind, tcp.status) == ("service:web:2", CheckKind.TCP, CheckStatus.WARNING)


def test_script_alias_and_top_level_checks_are_built() -> None:
    built = config(
        enable_local_script_checks=True,
        node_meta={"rack": "r1"},
        service={"name": "web", "check": {"args": ["/bin/check", "-q"], "interval": "5s", "timeout": "2s"}},
        checks=[
            {"name": "disk", "args": ["/bin/df"], "interval": "30s"},
            {"id": "web-alias", "name": "web via db", "alias_service": "db", "service_id": "web"},
        ],
    )
    [script] = built.services[0].checks
    assert (script.kind, script.args, script.timeout) == (CheckKind.SCRIPT, ("/bin/check", "-q"), 2.0)
    disk, alias = built.checks
    assert (disk.check_id, disk.kind, disk.service_id) == ("disk", CheckKind.SCRIPT, "")
    assert (alias.check_id, alias.kind, alias.alias_service, alias.service_id) == (
        "web-alias",
        CheckKind.ALIAS,
        "db",
        "web",
    )
    assert thaw(built.node_meta) == {"rack": "r1"} and built.enable_local_script_checks


def test_check_and_checks_are_numbered_together() -> None:
    service = one_service({"name": "web", "check": {"ttl": "5s"}, "checks": [{"ttl": "6s"}]})
    assert [(check.check_id, check.ttl) for check in service.checks] == [
        ("service:web:1", 5.0),
        ("service:web:2", 6.0),
    ]


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        ({"tcp": "x:1", "http": "http://x", "interval": "1s"}, "service.check: a check needs exactly one of"),
        ({"interval": "1s"}, "service.check: a check needs exactly one of tcp, http, ttl, args"),
        (
            {"ttl": "5s", "interval": "1s"},
            "service.check.interval: Interval and TTL cannot both be specified",
        ),
        (
            {"alias_service": "db", "interval": "1s"},
            "service.check.interval: Interval cannot be set for Alias",
        ),
        (
            {"args": ["/bin/true"], "interval": "1s"},
            "service.check.args: Scripts are disabled on this agent;",
        ),
        ({"grpc": "127.0.0.1:9000", "interval": "1s"}, "service.check.grpc: grpc checks are not run"),
        (
            {"docker_container_id": "abc", "interval": "1s"},
            "service.check.docker_container_id: docker checks",
        ),
        (
            {"script": "/bin/check", "interval": "1s"},
            "service.check.script: script was removed in Consul 1.0",
        ),
        ({"http": "http://x"}, 'service.check.interval: a http check needs an interval such as "10s"'),
        ({"ttl": "ten"}, "service.check.ttl:"),
        ({"ttl": "5s", "status": "unknown"}, "service.check.status: 'unknown' is not one of"),
    ],
)
def test_bad_checks_are_reported_at_their_key(check: dict[str, Any], expected: str) -> None:
    found = problems({"service": {"name": "web", "check": check}})
    assert any(problem.startswith("agent.json: " + expected) for problem in found), found


# -- managed proxies and proxy_defaults ---------------------------------------------------------------


def test_a_managed_proxy_without_settings_takes_everything_from_proxy_defaults() -> None:
    service = one_service({"name": "web", "connect": {"proxy": {}}})
    proxy = service.managed_proxy
    assert proxy is not None
    # None: the command is proxy_defaults', else the built-in proxy's (decided when planning)
    assert (proxy.command, proxy.exec_mode, proxy.upstreams, proxy.user) == (None, "daemon", (), "")
    assert thaw(proxy.config) == {}


def test_a_services_own_command_and_config_are_kept_apart_from_the_defaults() -> None:
    built = config(
        connect={
            "proxy_defaults": {"daemon_command": ["/bin/default"], "config": {"handshake_timeout_ms": 5}}
        },
        service={
            "name": "web",
            "connect": {"proxy": {"command": "/bin/own", "config": {"bind_port": "21000"}}},
        },
    )
    (service,) = built.services
    assert service.managed_proxy is not None
    assert service.managed_proxy.command == ("/bin/own",)  # a single string is one argument
    assert thaw(service.managed_proxy.config) == {"bind_port": 21000}  # decoded weakly, as Consul
    assert built.proxy_defaults.command == ("/bin/default",)
    assert thaw(built.proxy_defaults.config) == {"handshake_timeout_ms": 5}


def test_a_bind_port_in_proxy_defaults_clashes_when_two_proxies_inherit_it() -> None:
    found = problems(
        {
            "connect": {"proxy_defaults": {"config": {"bind_port": 21000}}},
            "services": [{"name": "a", "connect": {"proxy": {}}}, {"name": "b", "connect": {"proxy": {}}}],
        }
    )
    assert found == [
        "agent.json: services[1].connect.proxy.config.bind_port: port 21000 is also used by "
        "agent.json: services[0].connect.proxy.config.bind_port"
    ]


def test_a_proxy_group_needs_a_user() -> None:
    found = problems({"service": {"name": "w", "connect": {"proxy": {"group": "proxies"}}}})
    assert found == [
        "agent.json: service.connect.proxy.group: needs user: a proxy's group is set with its user"
    ]
    service = one_service({"name": "w", "connect": {"proxy": {"user": "nobody", "group": "nogroup"}}})
    assert service.managed_proxy is not None
    assert (service.managed_proxy.user, service.managed_proxy.group) == ("nobody", "nogroup")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], "expected a non-empty list of strings, got a list"),
        (["/bin/p", 5], "element 1: expected a string, got number 5"),
        ([""], "the program (first element) is empty"),
    ],
)
def test_bad_proxy_commands_are_reported(command: Any, expected: str) -> None:
    found = problems({"service": {"name": "w", "connect": {"proxy": {"command": command}}}})
    assert found == [f"agent.json: service.connect.proxy.command: {expected}"]


# -- hand-registered connect-proxy services ------------------------------------------------------------


def test_the_legacy_proxy_destination_names_the_proxied_service() -> None:
    service = one_service(
        {"name": "db-proxy", "kind": "connect-proxy", "port": 2000, "proxy_destination": "db"}
    )
    assert service.proxy is not None and service.proxy.destination_service_name == "db"


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (
            {"name": "p", "kind": "connect-proxy", "port": 1},
            "service.proxy.destination_service_name: a connect-proxy service needs the service it represents",
        ),
        (
            {"name": "p", "kind": "connect-proxy", "proxy_destination": "db"},
            "service.port: a connect-proxy service needs a port",
        ),
        (
            {
                "name": "p",
                "kind": "connect-proxy",
                "port": 1,
                "proxy_destination": "db",
                "connect": {"proxy": {}},
            },
            "service.connect.proxy: a connect-proxy service cannot ask for a managed proxy",
        ),
        (
            {"name": "web", "proxy": {"destination_service_name": "db"}},
            'service.proxy: only services with kind "connect-proxy" take a proxy block',
        ),
    ],
)
def test_connect_proxy_rules(service: dict[str, Any], expected: str) -> None:
    found = problems({"service": service})
    assert any(problem.startswith("agent.json: " + expected) for problem in found), found


# -- API registrations ------------------------------------------------------------------------------


def test_an_api_registration_is_built_like_a_config_file_service() -> None:
    service = build_service(
        {"ID": "web-1", "Name": "web", "Port": 80, "Check": {"TTL": "10s"}, "Connect": {"Proxy": {}}},
        "<api>",
        ProxyDefaults(),
    )
    assert (service.id, service.name, service.port, service.source) == ("web-1", "web", 80, "<api>: ")
    assert [check.check_id for check in service.checks] == ["service:web-1"]
    assert service.managed_proxy is not None and service.proxy_id == "web-1-proxy"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"Name": "w", "Connect": {"Proxy": {"User": "root"}}},
            "<api>: connect.proxy.user: who a proxy runs as",
        ),
        ({"Name": "w", "Port": "80"}, "<api>: Port: expected an integer"),
        ({"Port": 80}, "<api>: Name: required key is missing"),
        ({"Name": "w", "Check": {"TCP": "x:1"}}, "<api>: check.interval: a tcp check needs an interval"),
        ("web", "<api>: expected an object, got string 'web'"),
    ],
)
def test_a_bad_api_registration_names_the_source_and_key(raw: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_service(raw, "<api>", ProxyDefaults())
    assert any(str(problem).startswith(expected) for problem in raised.value.problems), raised.value.problems


def test_the_cluster_block_is_built_and_each_mistake_named(tmp_path: Path) -> None:
    assert not config(data_dir="/d").cluster.enabled  # no block: the single-host agent
    from tests.helpers.pki import TestPKI

    ca = Path(TestPKI(tmp_path / "pki").ca_file)
    junk = tmp_path / "junk.pem"
    junk.write_text("x")
    refused = problems({"cluster": {"etcd_endpoints": "https://10.0.0.1:2379", "ca_file": str(junk)}})
    assert any("not a CA certificate file" in p for p in refused), refused
    built = config(
        data_dir="/d",
        cluster={
            "etcd_endpoints": ["https://10.0.0.1:2379"],
            "ca_file": str(ca),
            "lease_ttl": "5s",
            "key_prefix": "/ps",
        },
    ).cluster
    assert built.enabled and built.endpoints == ("https://10.0.0.1:2379",)
    assert built.lease_ttl == 5.0 and built.key_prefix == "/ps/" and built.reconnect_timeout == 72 * 3600
    found = problems(
        {
            "data_dir": "/d",
            "cluster": {
                "etcd_endpoints": "https://10.0.0.1:2379",
                "cert_file": "/no/such.pem",
                "lease_ttl": "1s",
                "ca_signer": True,
                "username": "agent",
            },
        }
    )
    joined = "\n".join(found)
    for expected in (
        "cluster.cert_file: cert_file and key_file must be given together",
        "cluster.ca_file: https endpoints need",
        "cluster.username: username and password_file must be given together",
        "cluster.cert_file: /no/such.pem: no such file",
        "cluster.lease_ttl: must be between 2s",
        "cluster.ca_key_file: a CA signer needs",
    ):
        assert expected in joined, joined
    assert any(
        "give scheme, host and port" in p
        for p in problems({"data_dir": "/d", "cluster": {"etcd_endpoints": "10.0.0.1"}})
    )
    assert any(
        "give the etcd client URLs" in p for p in problems({"data_dir": "/d", "cluster": {"lease_ttl": "5s"}})
    )


def test_check_update_interval_is_consuls_key_and_default() -> None:
    cluster = {"etcd_endpoints": "http://127.0.0.1:2379"}
    assert config(cluster=cluster).cluster.check_update_interval == 300.0
    assert config(cluster=cluster, check_update_interval="0s").cluster.check_update_interval == 0.0
    assert config(cluster=cluster, check_update_interval="30s").cluster.check_update_interval == 30.0
    found = problems({"data_dir": "/d", "cluster": cluster, "check_update_interval": "-1s"})
    assert any("check_update_interval: invalid duration '-1s'" in p for p in found), found


def test_an_upstream_in_another_datacenter_is_refused_in_a_cluster() -> None:
    web = {
        "name": "web",
        "port": 80,
        "connect": {
            "proxy": {"upstreams": [{"destination_name": "db", "datacenter": "dc2", "local_bind_port": 9}]}
        },
    }
    cluster = {"etcd_endpoints": "http://127.0.0.1:2379"}
    found = problems({"data_dir": "/d", "cluster": cluster, "services": [web]})
    assert any("federation between datacenters is not supported" in p for p in found), found
    assert config(services=[web]).services[0].managed_proxy is not None  # (single-host: as before)


def test_an_api_registration_with_an_upstream_in_another_datacenter_is_refused_in_a_cluster() -> None:
    from supervisor.config.registrations import build_registration

    clustered = config(cluster={"etcd_endpoints": "http://127.0.0.1:2379"})
    body = {
        "Name": "web",
        "Port": 80,
        "Connect": {
            "SidecarService": {
                "Proxy": {"Upstreams": [{"DestinationName": "db", "Datacenter": "dc9", "LocalBindPort": 9}]}
            }
        },
    }
    with pytest.raises(ConfigError, match="federation between datacenters is not supported"):
        build_registration(body, "request body", clustered)
    assert build_registration(body, "request body", config())[0]  # (single-host: as before)
