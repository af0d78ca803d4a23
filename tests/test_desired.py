"""Planning proxies from config: command precedence, spec hashing, ports, tokens, launch."""

from __future__ import annotations

import random
import socket
import sys
from collections.abc import Iterator

import pytest

from supervisor.config import build_config
from supervisor.config.model import BUILTIN_COMMAND, AgentConfig
from supervisor.process.marker import MARKER_ENV, Marker
from supervisor.state.datadir import Allocation
from supervisor.supervision.desired import address_for_proxies, plan_proxies
from supervisor.supervision.launch import launch_for
from supervisor.supervision.ports import port_is_free

API = "127.0.0.1:8500"


def config(**document: object) -> AgentConfig:
    return build_config([], {"data_dir": "/d", **document})


def always_free(_host: str, _port: int) -> bool:
    return True


def test_command_precedence_service_over_defaults_over_builtin() -> None:
    cfg = config(
        connect={"proxy_defaults": {"command": ["/usr/bin/default-proxy"]}},
        services=[
            {"name": "own", "connect": {"proxy": {"command": ["/usr/bin/own-proxy", "-x"]}}},
            {"name": "dflt", "connect": {"proxy": {}}},
        ],
    )
    plan = plan_proxies(cfg, API, {}, always_free)
    assert plan.proxies["own-proxy"].spec.command == ("/usr/bin/own-proxy", "-x")
    assert plan.proxies["dflt-proxy"].spec.command == ("/usr/bin/default-proxy",)
    builtin = plan_proxies(config(service={"name": "b", "connect": {"proxy": {}}}), API, {}, always_free)
    assert builtin.proxies["b-proxy"].spec.command == BUILTIN_COMMAND


def test_builtin_is_resolved_at_spawn_to_the_running_interpreter() -> None:
    cfg = config(service={"name": "b", "connect": {"proxy": {}}})
    planned = plan_proxies(cfg, API, {}, always_free).proxies["b-proxy"]
    launch = launch_for(planned, "owner", {"PATH": "/bin"}, None)
    assert launch.argv == (sys.executable, "-m", "builtin_proxy")
    # the spec (and so the restart decision) does not contain the interpreter's path
    assert sys.executable not in repr(planned.spec)


def test_environment_precedence_and_marker() -> None:
    cfg = config(service={"name": "w", "connect": {"proxy": {"command": ["/bin/p"]}}})
    planned = plan_proxies(cfg, "127.0.0.1:9999", {}, always_free).proxies["w-proxy"]
    ambient = {"PATH": "/bin", "CONSUL_HTTP_ADDR": "stale:1", "CONNECT_PROXY_ID": "spoofed", "HOME": "/root"}
    env = launch_for(planned, "node-1", ambient, None).env
    assert env["HOME"] == "/root" and env["PATH"] == "/bin"  # the agent's environment is passed on
    assert env["CONSUL_HTTP_ADDR"] == "127.0.0.1:9999"  # but the agent's own settings win
    assert env["CONNECT_PROXY_ID"] == "w-proxy" and env["CONNECT_PROXY_TOKEN"] == planned.spec.token
    marker = Marker.parse(env[MARKER_ENV])
    assert marker == Marker(owner="node-1", spec_hash=planned.spec_hash, proxy_id="w-proxy")


def test_spec_hash_ignores_config_but_not_command_or_token() -> None:
    base = {"name": "w", "connect": {"proxy": {"command": ["/bin/p"], "config": {"a": 1}}}}
    first = plan_proxies(config(service=base), API, {}, always_free, new_token=lambda: "t1")
    allocations = first.allocations
    changed_config = {"name": "w", "connect": {"proxy": {"command": ["/bin/p"], "config": {"a": 2}}}}
    second = plan_proxies(config(service=changed_config), API, allocations, always_free)
    assert second.proxies["w-proxy"].spec_hash == first.proxies["w-proxy"].spec_hash
    assert second.proxies["w-proxy"].config["a"] == 2
    changed_command = {"name": "w", "connect": {"proxy": {"command": ["/bin/q"]}}}
    third = plan_proxies(config(service=changed_command), API, allocations, always_free)
    assert third.proxies["w-proxy"].spec_hash != first.proxies["w-proxy"].spec_hash
    new_token = plan_proxies(config(service=base), API, {}, always_free, new_token=lambda: "t2")
    assert new_token.proxies["w-proxy"].spec_hash != first.proxies["w-proxy"].spec_hash


def test_effective_config_fills_in_defaults() -> None:
    cfg = config(
        bind_addr="10.0.0.5",
        connect={"proxy_defaults": {"config": {"handshake_timeout_ms": 500, "x": "default"}}},
        service={"name": "w", "port": 8181, "connect": {"proxy": {"config": {"x": "mine"}}}},
    )
    planned = plan_proxies(cfg, API, {}, always_free).proxies["w-proxy"]
    assert dict(planned.config) == {
        "handshake_timeout_ms": 500,
        "x": "mine",
        "bind_port": planned.port,
        "bind_address": "10.0.0.5",
        "local_service_address": "127.0.0.1:8181",
    }


def test_ports_come_from_the_range_skip_taken_ones_and_are_kept() -> None:
    cfg = config(
        ports={"proxy_min_port": 30000, "proxy_max_port": 30003},
        services=[{"name": f"s{i}", "connect": {"proxy": {}}} for i in range(3)],
    )
    bound_on_host = {30001}
    plan = plan_proxies(cfg, API, {}, lambda _h, port: port not in bound_on_host, rng=random.Random(1))
    ports = {planned.port for planned in plan.proxies.values()}
    assert ports == {30000, 30002, 30003}
    # a reload keeps every port and token, even if the host's ports changed meanwhile
    again = plan_proxies(cfg, API, plan.allocations, lambda _h, _p: False)
    assert again.allocations == plan.allocations


def test_running_out_of_ports_blocks_the_proxy_with_a_reason() -> None:
    cfg = config(
        ports={"proxy_min_port": 30000, "proxy_max_port": 30000},
        services=[{"name": "a", "connect": {"proxy": {}}}, {"name": "b", "connect": {"proxy": {}}}],
    )
    plan = plan_proxies(cfg, API, {}, always_free)
    problems = [planned.problem for planned in plan.proxies.values() if planned.problem]
    assert len(problems) == 1 and "no free port left" in problems[0] and "30000-30000" in problems[0]


def test_fixed_port_wins_and_is_not_handed_out() -> None:
    cfg = config(
        ports={"proxy_min_port": 30000, "proxy_max_port": 30001},
        services=[
            {"name": "fixed", "connect": {"proxy": {"config": {"bind_port": 30000}}}},
            {"name": "auto", "connect": {"proxy": {}}},
        ],
    )
    plan = plan_proxies(cfg, API, {}, always_free)
    assert plan.proxies["fixed-proxy"].port == 30000
    assert plan.proxies["auto-proxy"].port == 30001
    assert plan.allocations["fixed-proxy"] == Allocation(plan.allocations["fixed-proxy"].token, 30000, False)


def test_auto_port_outside_a_narrowed_range_is_reallocated() -> None:
    wide = config(
        ports={"proxy_min_port": 30000, "proxy_max_port": 30010},
        service={"name": "a", "connect": {"proxy": {}}},
    )
    earlier = {"a-proxy": Allocation("tok", 30009, True)}
    narrow = config(
        ports={"proxy_min_port": 30000, "proxy_max_port": 30001},
        service={"name": "a", "connect": {"proxy": {}}},
    )
    assert plan_proxies(wide, API, earlier, always_free).proxies["a-proxy"].port == 30009
    moved = plan_proxies(narrow, API, earlier, always_free).proxies["a-proxy"]
    assert moved.port in (30000, 30001) and moved.spec.token == "tok"


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_port_is_free_sees_listening_sockets(listener: int) -> None:
    assert not port_is_free("127.0.0.1", listener)
    assert not port_is_free("0.0.0.0", listener)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        unused = int(sock.getsockname()[1])
    assert port_is_free("127.0.0.1", unused)


def test_address_for_proxies_maps_wildcards_to_loopback() -> None:
    assert address_for_proxies("0.0.0.0", 8500) == "127.0.0.1:8500"
    assert address_for_proxies("::", 8500) == "[::1]:8500"
    assert address_for_proxies("127.0.0.2", 1) == "127.0.0.2:1"
