"""builtin_proxy.upstream: health entries to dialable endpoints, and Discovery, the cached
instance list of one upstream that its watch keeps current.

``endpoints_from`` is fed the JSON shapes of ``/v1/health/connect/<name>`` and of a prepared
query's ``Nodes``. Discovery runs on a real EventLoop; only its watch thread (the agent
connection) is replaced, by ``FakeWatch``, which records what it would long-poll and hands
answers to the loop the way the thread does (``call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import builtin_proxy.upstream as upstream_module
from builtin_proxy.authz import Authorizer
from builtin_proxy.config import UpstreamConfig, from_managed
from builtin_proxy.loop import EventLoop
from builtin_proxy.runtime import Runtime
from builtin_proxy.upstream import Discovery, Endpoint, endpoints_from

# -- endpoints_from -----------------------------------------------------------------------------------


def proxy_entry(
    address: str = "10.0.0.2", port: int = 21000, node_address: str = "10.0.0.1", **service: Any
) -> dict[str, Any]:
    """One health entry of db's sidecar proxy (Consul 1.3+ shape)."""
    return {
        "Node": {"Node": "node-1", "Address": node_address, "Datacenter": "dc1"},
        "Service": {
            "Kind": "connect-proxy",
            "ID": "db-proxy",
            "Service": "db-proxy",
            "Address": address,
            "Port": port,
            "Proxy": {"DestinationServiceName": "db", "DestinationServiceID": "db"},
            **service,
        },
        "Checks": [{"CheckID": "serfHealth", "Status": "passing"}],
    }


def test_a_sidecar_proxy_is_dialled_at_its_own_address_and_port_as_its_destination() -> None:
    assert endpoints_from([proxy_entry()]) == [Endpoint("10.0.0.2", 21000, "db", "dc1")]


def test_the_node_address_is_used_when_the_service_has_none() -> None:
    assert endpoints_from([proxy_entry(address="")]) == [Endpoint("10.0.0.1", 21000, "db", "dc1")]


def test_the_1_3_proxy_destination_field_names_the_destination() -> None:
    entry = proxy_entry(Proxy=None, ProxyDestination="db")
    assert endpoints_from([entry]) == [Endpoint("10.0.0.2", 21000, "db", "dc1")]


def test_a_connect_native_service_is_dialled_directly_as_itself() -> None:
    entry = {
        "Node": {"Address": "10.0.0.9", "Datacenter": "east"},
        "Service": {
            "Kind": "",
            "Service": "billing",
            "Address": "",
            "Port": 8443,
            "Connect": {"Native": True},
        },
    }
    assert endpoints_from([entry]) == [Endpoint("10.0.0.9", 8443, "billing", "east")]


def test_instances_that_cannot_speak_connect_or_be_dialled_are_left_out() -> None:
    plain_service = {"Node": {"Address": "10.0.0.3"}, "Service": {"Service": "db", "Port": 5432}}
    not_native = {
        "Node": {"Address": "10.0.0.3"},
        "Service": {"Service": "db", "Port": 5432, "Connect": {"Native": False}},
    }
    entries = [
        plain_service,
        not_native,
        proxy_entry(port=0),
        proxy_entry(address="", node_address=""),
        proxy_entry(Proxy={}),  # a proxy for nothing
        {"Node": None, "Service": None},
        proxy_entry(address="10.0.0.4"),
    ]
    assert endpoints_from(entries) == [Endpoint("10.0.0.4", 21000, "db", "dc1")]


# -- Discovery ------------------------------------------------------------------------------------------


class FakeWatch:
    """Records the long-poll a Discovery sets up; ``answer`` delivers like the watch thread."""

    def __init__(
        self,
        name: str,
        client: object,
        path: str,
        post: Callable[..., None],
        deliver: Callable[[Any], None],
        **options: Any,
    ) -> None:
        self.path = path
        self.post = post
        self.deliver = deliver
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def answer(self, data: Any) -> None:
        self.post(self.deliver, data)


@pytest.fixture
def watches(monkeypatch: pytest.MonkeyPatch) -> list[FakeWatch]:
    """Every watch a Discovery creates, in order (none of them reaches an agent)."""
    created: list[FakeWatch] = []

    def record(*args: Any, **options: Any) -> FakeWatch:
        watch = FakeWatch(*args, **options)
        created.append(watch)
        return watch

    monkeypatch.setattr(upstream_module, "Watch", record)
    return created


@pytest.fixture
def loop(watches: list[FakeWatch]) -> Iterator[EventLoop]:
    event_loop = EventLoop()
    yield event_loop
    event_loop.close()


def run_once(loop: EventLoop) -> None:
    """One turn of the loop: what the watch handed over runs, then ``run`` returns."""
    loop.call_soon_threadsafe(loop.stop)
    loop.run()


def runtime_on(loop: EventLoop) -> Runtime:
    config = from_managed({"ProxyServiceID": "web-proxy", "TargetServiceName": "web"})

    def no_agent(*_args: object) -> None:
        raise AssertionError("discovery never authorizes")

    return Runtime(loop, "127.0.0.1:8500", "token", config, Authorizer("web", no_agent))


def upstream_to(name: str = "db", kind: str = "service", datacenter: str = "") -> UpstreamConfig:
    return UpstreamConfig(kind, name, datacenter, "127.0.0.1", 9191, 1000)


@pytest.mark.parametrize(
    ("upstream", "path"),
    [
        # passing=1: the agent leaves critical instances out, endpoints_from does not look
        (upstream_to("db"), "/v1/health/connect/db?passing=1"),
        (
            upstream_to("my db/v2", datacenter="east 1"),
            "/v1/health/connect/my%20db%2Fv2?passing=1&dc=east%201",
        ),
        (upstream_to("nearest", "prepared_query", "west"), "/v1/query/nearest/execute?connect=true&dc=west"),
    ],
)
def test_each_upstream_long_polls_its_connect_instances(
    loop: EventLoop, watches: list[FakeWatch], upstream: UpstreamConfig, path: str
) -> None:
    Discovery(runtime_on(loop), upstream)
    (watch,) = watches
    assert watch.started
    assert watch.path == path


def test_before_the_first_answer_there_is_no_instance_and_nothing_is_loaded(loop: EventLoop) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to())
    assert discovery.pick() is None
    assert not discovery.loaded  # callers wait instead of failing the connection


def test_answers_reach_discovery_on_the_loop_thread_only(loop: EventLoop, watches: list[FakeWatch]) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to())
    watches[0].answer([proxy_entry()])
    assert discovery.instances == []  # handed over, not applied from the watch thread
    run_once(loop)
    assert discovery.instances == [Endpoint("10.0.0.2", 21000, "db", "dc1")]
    assert discovery.loaded


def test_the_first_answer_wakes_every_waiter_once(loop: EventLoop, watches: list[FakeWatch]) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to())
    woken: collections.Counter[str] = collections.Counter()
    discovery.waiters.extend([lambda: woken.update(["a"]), lambda: woken.update(["b"])])
    watches[0].answer([proxy_entry()])
    run_once(loop)
    watches[0].answer([proxy_entry(), proxy_entry(address="10.0.0.5")])
    run_once(loop)
    assert woken == {"a": 1, "b": 1}
    assert discovery.waiters == []


def test_a_new_answer_replaces_the_instances_and_a_gone_one_is_never_picked(
    loop: EventLoop, watches: list[FakeWatch]
) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to())
    watches[0].answer([proxy_entry(address="10.0.0.2"), proxy_entry(address="10.0.0.3")])
    run_once(loop)
    watches[0].answer([proxy_entry(address="10.0.0.3")])  # 10.0.0.2's proxy died
    run_once(loop)
    assert {discovery.pick() for _ in range(50)} == {Endpoint("10.0.0.3", 21000, "db", "dc1")}


def test_an_empty_answer_means_loaded_with_no_instance(loop: EventLoop, watches: list[FakeWatch]) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to())
    watches[0].answer([proxy_entry()])
    run_once(loop)
    watches[0].answer([])
    run_once(loop)
    assert discovery.pick() is None
    assert discovery.loaded  # so a connection fails at once rather than waiting


def test_picks_spread_over_every_healthy_instance(loop: EventLoop, watches: list[FakeWatch]) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to())
    addresses = ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    watches[0].answer([proxy_entry(address=address) for address in addresses])
    run_once(loop)
    picked = collections.Counter(
        endpoint.host for endpoint in (discovery.pick() for _ in range(300)) if endpoint
    )
    assert set(picked) == set(addresses)
    assert min(picked.values()) > 50  # random, not stuck on one (p of failing ~ 1e-9)


def test_a_prepared_query_answer_is_read_from_its_nodes(loop: EventLoop, watches: list[FakeWatch]) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to("nearest", kind="prepared_query"))
    watches[0].answer({"Service": "db", "Nodes": [proxy_entry()], "Datacenter": "dc1"})
    run_once(loop)
    assert discovery.instances == [Endpoint("10.0.0.2", 21000, "db", "dc1")]
    watches[0].answer(None)
    run_once(loop)
    assert discovery.instances == [] and discovery.loaded


def test_close_stops_the_watch_and_forgets_waiters(loop: EventLoop, watches: list[FakeWatch]) -> None:
    discovery = Discovery(runtime_on(loop), upstream_to())
    discovery.waiters.append(lambda: None)
    discovery.close()
    assert watches[0].stopped
    assert discovery.waiters == []
