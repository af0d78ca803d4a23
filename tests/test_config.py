"""Config loading: formats, merge rules, legacy Consul forms, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.config.durations import format_duration, parse_duration
from supervisor.config.model import thaw
from supervisor.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "consul"


def write(directory: Path, name: str, content: object) -> Path:
    path = directory / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(problem) for problem in exc.value.problems]


# -- unmodified Consul configs ------------------------------------------------------------


def test_consul_1_2_json_agent_config_loads_unmodified() -> None:
    config = load_config([str(FIXTURES / "consul-1.2-agent.json")], [])
    assert config.datacenter == "east-aws"
    assert config.data_dir == "/opt/consul"
    assert config.log_level == "INFO"  # "info" in the file: levels are case-insensitive
    assert (config.proxy_min_port, config.proxy_max_port) == (21000, 21255)
    # Legacy ACL keys map onto the acl stanza; acl_datacenter turned ACLs on in 1.2.
    assert config.acl.enabled and config.acl.default_policy == "deny"
    assert config.acl.master_token == "b1gs33cr3t"
    assert config.proxy_defaults.command == ("/usr/local/bin/consul", "connect", "proxy")

    web = config.service("web")
    assert web is not None and web.managed_proxy is not None
    # Legacy config.upstreams moved into upstreams; destination_datacenter became datacenter
    # and unknown keys went to that upstream's config.
    assert "upstreams" not in web.managed_proxy.config
    assert web.managed_proxy.config["bind_port"] == 21001
    db_up, cache_up = web.managed_proxy.upstreams
    assert (db_up.destination_name, db_up.local_bind_port, db_up.datacenter) == (
        "db",
        9191,
        "east-aws",
    )
    assert cache_up.destination_type == "prepared_query"
    assert thaw(cache_up.config) == {"connect_timeout_ms": 250}
    assert web.checks[0].check_id == "web-http" and web.checks[0].kind == "http"

    db = config.service("db")
    assert db is not None and [check.kind for check in db.checks] == ["tcp", "script"]
    assert db.checks[1].args == ("/usr/local/bin/check_db.sh",)  # enable_script_checks is set
    legacy_proxy = config.service("db-legacy-proxy")
    assert legacy_proxy is not None and legacy_proxy.proxy is not None
    assert legacy_proxy.proxy.destination_service_name == "db"

    ignored = {notice.path for notice in config.notices}
    assert {"server", "retry_join", "encrypt", "performance", "telemetry"} <= ignored
    assert "ports.dns" not in ignored and config.dns_port == 8600  # the DNS interface is ours too


def test_consul_1_4_hcl_agent_config_loads_unmodified() -> None:
    config = load_config([str(FIXTURES / "consul-1.4-agent.hcl")], [])
    assert config.log_level == "WARN"
    assert config.allow_managed_root is True
    assert config.acl.master_token == "0b1c8f2e-8c33-4b57-a1d4-1e1d6e2b6c0f"
    assert [service.id for service in config.services] == ["api", "worker", "billing-sidecar"]
    api = config.service("api")
    assert api is not None and api.managed_proxy is not None
    assert api.managed_proxy.command == ("/usr/local/bin/consul", "connect", "proxy")
    assert [up.destination_name for up in api.managed_proxy.upstreams] == ["billing", "ledger"]
    assert thaw(api.managed_proxy.upstreams[1].config) == {"connect_timeout_ms": 1500}
    assert thaw(api.meta) == {"version": "2.3"}
    worker = config.service("worker")
    assert worker is not None and worker.managed_proxy is not None and worker.managed_proxy.command is None
    sidecar = config.service("billing-sidecar")
    assert sidecar is not None and sidecar.proxy is not None and sidecar.proxy.local_service_port == 7070


def test_repeated_hcl_blocks_keep_their_nested_blocks(tmp_path: Path) -> None:
    # pyhcl on its own merges the second block into the first and loses both connect blocks.
    path = write(
        tmp_path,
        "two.hcl",
        'data_dir = "/d"\n'
        'service {\n name = "web"\n connect {\n proxy {\n'
        " config {\n bind_port = 21000\n }\n }\n }\n}\n"
        'service {\n name = "db"\n connect {\n proxy {}\n }\n}\n',
    )
    config = load_config([str(path)], [])
    web, db = config.services
    assert web.managed_proxy is not None and web.managed_proxy.config["bind_port"] == 21000
    assert db.managed_proxy is not None and db.name == "db"


# -- formats and merging -----------------------------------------------------------------------


def test_json_hcl_and_toml_drop_ins_merge_in_lexical_order(tmp_path: Path) -> None:
    write(
        tmp_path,
        "10-agent.toml",
        'data_dir = "/first"\nlog_level = "debug"\n[ports]\nhttp = 8600\n',
    )
    write(tmp_path, "20-web.json", {"service": {"name": "web", "port": 80, "connect": {"proxy": {}}}})
    write(tmp_path, "30-db.hcl", 'data_dir = "/second"\nservices = [{ name = "db" }]\n')
    write(tmp_path, "README.md", "not config")
    write(tmp_path, ".#40-bad.json", "{ this is an editor lock file")
    write(tmp_path, "50-x.json~", "{ backup file")
    write(tmp_path, "60-y.json.swp", "swap file")
    config = load_config([], [str(tmp_path)])
    assert config.data_dir == "/second"  # later file wins for scalars
    assert config.log_level == "DEBUG" and config.http_port == 8600  # earlier keys kept
    assert [service.id for service in config.services] == ["web", "db"]  # lists concatenate


def test_config_files_come_before_directories_and_flags_win(tmp_path: Path) -> None:
    conf_dir = tmp_path / "d"
    conf_dir.mkdir()
    write(conf_dir, "a.json", {"node_name": "from-dir"})
    single = write(tmp_path, "single.json", {"node_name": "from-file", "data_dir": "/x"})
    config = load_config([str(single)], [str(conf_dir)], {"node_name": "from-flag"})
    assert config.node_name == "from-flag"
    assert load_config([str(single)], [str(conf_dir)]).node_name == "from-dir"


def test_defaults() -> None:
    config = load_config([], [], {"data_dir": "/d"})
    assert config.http_address == "127.0.0.1:8500"
    assert (config.proxy_min_port, config.proxy_max_port) == (20000, 20255)
    assert config.connect_enabled and not config.allow_managed_root
    assert config.datacenter == "dc1" and config.bind_addr == "0.0.0.0"
    assert config.ca.leaf_cert_ttl == 72 * 3600


def test_every_agent_key_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "all.json",
        {
            "data_dir": "/d",
            "log_level": "err",
            "log_json": True,
            "log_file": "/var/log/agent.log",
            "node_name": "n1",
            "node_id": "8A9B6C8F-0000-4000-8000-000000000001",
            "datacenter": "dc9",
            "bind_addr": "10.1.1.1",
            "client_addr": "127.0.0.2",
            "addresses": {"http": "127.0.0.3"},
            "ports": {"http": 9500, "proxy_min_port": 30000, "proxy_max_port": 30010},
            "connect": {
                "enabled": True,
                "proxy": {"allow_managed_root": True, "allow_managed_api_registration": True},
                "proxy_defaults": {
                    "exec_mode": "daemon",
                    "command": ["/bin/p"],
                    "config": {"a": 1},
                },
                "ca_config": {"private_key": "KEY", "root_cert": "CERT", "leaf_cert_ttl": "1h30m"},
            },
            "acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": "m"}},
        },
    )
    config = load_config([str(path)], [])
    assert config.log_level == "ERR" and config.log_json and config.log_file == "/var/log/agent.log"
    assert config.node_id == "8a9b6c8f-0000-4000-8000-000000000001"
    assert config.http_address == "127.0.0.3:9500"
    assert (config.proxy_min_port, config.proxy_max_port) == (30000, 30010)
    assert config.allow_managed_root and config.allow_managed_api_registration
    assert config.proxy_defaults.command == ("/bin/p",) and thaw(config.proxy_defaults.config) == {"a": 1}
    assert (config.ca.private_key, config.ca.root_cert, config.ca.leaf_cert_ttl) == (
        "KEY",
        "CERT",
        5400,
    )
    assert config.acl.enabled and config.acl.default_policy == "deny" and config.acl.master_token == "m"


def test_service_keys_and_camel_case_spellings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "svc.json",
        {
            "data_dir": "/d",
            "services": [
                {
                    "ID": "web-1",
                    "Name": "web",
                    "Tags": ["a"],
                    "Address": "127.0.0.1",
                    "Port": 8080,
                    "Meta": {"Owner": "team"},
                    "EnableTagOverride": True,
                    "Weights": {"Passing": 3, "Warning": 1},
                    "Checks": [{"TTL": "30s"}, {"TCP": "127.0.0.1:8080", "Interval": "5s"}],
                    "Connect": {
                        "Proxy": {
                            "ExecMode": "daemon",
                            "Command": ["/bin/p"],
                            "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9000}],
                        }
                    },
                }
            ],
        },
    )
    (service,) = load_config([str(path)], []).services
    assert (service.id, service.name, service.port, service.weights) == (
        "web-1",
        "web",
        8080,
        (3, 1),
    )
    assert thaw(service.meta) == {"Owner": "team"}  # user keys are not renamed
    assert [check.kind for check in service.checks] == ["ttl", "tcp"]
    assert [check.check_id for check in service.checks] == ["service:web-1:1", "service:web-1:2"]
    assert service.managed_proxy is not None and service.managed_proxy.upstreams[0].local_bind_port == 9000
    assert service.proxy_id == "web-1-proxy" and service.proxy_name == "web-proxy"


def test_seed_connect_proxy_registration(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "proxy.json",
        {
            "data_dir": "/d",
            "service": {
                "name": "redis-proxy",
                "kind": "connect-proxy",
                "proxy": {
                    "destination_service_name": "redis",
                    "destination_service_id": "redis1",
                    "local_service_address": "127.0.0.1",
                    "local_service_port": 9090,
                    "config": {},
                    "upstreams": [],
                },
                "port": 8181,
            },
        },
    )
    (service,) = load_config([str(path)], []).services
    assert service.kind == "connect-proxy" and service.proxy is not None
    assert (service.proxy.destination_service_id, service.proxy.local_service_port) == (
        "redis1",
        9090,
    )


def test_proxy_defaults_command_spellings(tmp_path: Path) -> None:
    seed = write(
        tmp_path,
        "a.hcl",
        'data_dir = "/d"\nconnect { proxy_defaults { command = ["/usr/bin/my-proxy"] } }',
    )
    assert load_config([str(seed)], []).proxy_defaults.command == ("/usr/bin/my-proxy",)
    both_same = write(
        tmp_path,
        "b.json",
        {
            "data_dir": "/d",
            "connect": {"proxy_defaults": {"command": ["/p"], "daemon_command": ["/p"]}},
        },
    )
    assert load_config([str(both_same)], []).proxy_defaults.command == ("/p",)
    both_differ = write(
        tmp_path,
        "c.json",
        {
            "data_dir": "/d",
            "connect": {"proxy_defaults": {"command": ["/p"], "daemon_command": ["/q"]}},
        },
    )
    with pytest.raises(ConfigError) as exc:
        load_config([str(both_differ)], [])
    assert "both command and daemon_command are set and differ" in str(exc.value)


def test_upstreams_new_location_wins_over_legacy(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "web.json",
        {
            "data_dir": "/d",
            "service": {
                "name": "web",
                "connect": {
                    "proxy": {
                        "upstreams": [{"destination_name": "new", "local_bind_port": 1000}],
                        "config": {"upstreams": [{"destination_name": "old", "local_bind_port": 1001}]},
                    }
                },
            },
        },
    )
    config = load_config([str(path)], [])
    (service,) = config.services
    assert service.managed_proxy is not None
    assert [up.destination_name for up in service.managed_proxy.upstreams] == ["new"]
    assert any(notice.path.endswith("config.upstreams") for notice in config.notices)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "bad.json",
            '{"data_dir": "/d",\n "services": [}',
            "bad.json: invalid JSON at line 2, column 15",
        ),
        ("bad.hcl", 'data_dir = "/d"\nservice {\n name = \n}', "bad.hcl: invalid HCL at line 4"),
        ("bad.toml", 'data_dir = "/d"\n[ports\n', "bad.toml: invalid TOML"),
        (
            "typo.json",
            {
                "data_dir": "/d",
                "services": [{"name": "web", "connect": {"proxy": {"comand": ["x"]}}}],
            },
            "typo.json: services[0].connect.proxy.comand: unknown key (did you mean 'command'?)",
        ),
        (
            "types.json",
            {"data_dir": "/d", "ports": {"http": "8500"}},
            "types.json: ports.http: expected an integer",
        ),
        (
            "script.json",
            {
                "data_dir": "/d",
                "service": {"name": "w", "connect": {"proxy": {"exec_mode": "script"}}},
            },
            'script.json: service.connect.proxy.exec_mode: "script" is not supported',
        ),
        (
            "script-default.hcl",
            'data_dir = "/d"\nconnect { proxy_defaults { exec_mode = "script" } }',
            "connect.proxy_defaults.exec_mode",
        ),
        (
            "traversal.json",
            {"data_dir": "/d", "service": {"id": "../x", "name": "w"}},
            "service.id: '../x' cannot be used",
        ),
        (
            "slash.json",
            {"data_dir": "/d", "service": {"name": "a/b"}},
            "service.name: 'a/b' cannot be used",
        ),
        ("dot.json", {"data_dir": "/d", "service": {"name": ".hidden"}}, "cannot be used"),
        (
            "range.json",
            {"data_dir": "/d", "ports": {"proxy_min_port": 30000, "proxy_max_port": 29999}},
            "ports.proxy_max_port: 29999 is below proxy_min_port 30000",
        ),
        (
            "noname.json",
            {"data_dir": "/d", "service": {"port": 1}},
            "service.name: required key is missing",
        ),
        (
            "upstream.json",
            {
                "data_dir": "/d",
                "service": {
                    "name": "w",
                    "connect": {"proxy": {"upstreams": [{"destination_name": "db"}]}},
                },
            },
            "service.connect.proxy.upstreams[0].local_bind_port: required key is missing",
        ),
        (
            "bindport.json",
            {
                "data_dir": "/d",
                "service": {"name": "w", "connect": {"proxy": {"config": {"bind_port": "abc"}}}},
            },
            "service.connect.proxy.config.bind_port: expected a port number",
        ),
        ("level.json", {"data_dir": "/d", "log_level": "loud"}, "log_level: 'loud' is not one of"),
        (
            "check.json",
            {"data_dir": "/d", "service": {"name": "w", "check": {"tcp": "x:1"}}},
            "needs an interval",
        ),
        ("notobject.json", "[1, 2]", "notobject.json: expected an object, got a list"),
    ],
)
def test_bad_input_names_file_and_key(tmp_path: Path, name: str, content: object, expected: str) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(ConfigError) as exc:
        load_config([str(path)], [])
    assert exc.value.exit_code == 2
    assert any(expected in problem for problem in problems_of(exc)), problems_of(exc)


def test_every_problem_of_every_file_is_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"data_dir": "/d", "bogus": 1, "ports": {"http": -1}})
    write(tmp_path, "b.hcl", "service {")
    with pytest.raises(ConfigError) as exc:
        load_config([], [str(tmp_path)])
    found = problems_of(exc)
    assert len(found) == 3, found
    assert any(problem.startswith(str(tmp_path / "a.json") + ": bogus: unknown key") for problem in found)
    assert any("ports.http: -1 is below the minimum of 0" in problem for problem in found)
    assert any(problem.startswith(str(tmp_path / "b.hcl") + ": invalid HCL") for problem in found)


def test_duplicate_ids_across_files_name_both_places(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {"data_dir": "/d", "service": {"name": "web"}})
    write(tmp_path, "b.json", {"services": [{"name": "other", "id": "web"}]})
    with pytest.raises(ConfigError) as exc:
        load_config([], [str(tmp_path)])
    (problem,) = problems_of(exc)
    assert problem.startswith(str(tmp_path / "b.json") + ": services[0].id: duplicate service ID 'web'")
    assert str(tmp_path / "a.json") in problem


def test_service_id_clashing_with_a_proxy_id_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.json",
        {
            "data_dir": "/d",
            "services": [{"name": "web", "connect": {"proxy": {}}}, {"name": "web-proxy"}],
        },
    )
    with pytest.raises(ConfigError) as exc:
        load_config([], [str(tmp_path)])
    assert "duplicate service ID 'web-proxy'" in str(exc.value)


def test_two_proxies_with_the_same_fixed_port_are_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.json",
        {
            "data_dir": "/d",
            "services": [
                {"name": "a", "connect": {"proxy": {"config": {"bind_port": 21000}}}},
                {
                    "name": "b",
                    "connect": {
                        "proxy": {"upstreams": [{"destination_name": "a", "local_bind_port": 21000}]}
                    },
                },
            ],
        },
    )
    with pytest.raises(ConfigError) as exc:
        load_config([], [str(tmp_path)])
    assert "port 21000 is also used by" in str(exc.value)


def test_managed_proxies_need_connect_enabled(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "a.json",
        {
            "data_dir": "/d",
            "connect": {"enabled": False},
            "service": {"name": "a", "connect": {"proxy": {}}},
        },
    )
    with pytest.raises(ConfigError, match="connect.enabled = true"):
        load_config([str(path)], [])


def test_data_dir_is_required_outside_dev_mode() -> None:
    with pytest.raises(ConfigError, match="data_dir: is required"):
        load_config([], [])
    assert load_config([], [], dev=True).data_dir is None


def test_missing_sources_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config([str(tmp_path / "nope.json")], [str(tmp_path / "nodir")])
    found = problems_of(exc)
    assert any("nodir: config directory does not exist" in problem for problem in found)
    assert any("nope.json: config file does not exist" in problem for problem in found)
    wrong = write(tmp_path, "agent.conf", "{}")
    with pytest.raises(ConfigError, match=r"must end in \.json, \.hcl or \.toml"):
        load_config([str(wrong)], [])


def test_durations() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("1h") == 3600
    assert parse_duration("0") == 0
    for bad in ("", "10", "-5s", "ten seconds", "5x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_duration(90) == "1m30s"
    assert format_duration(0.25) == "250ms"
