"""The catalog domain layer (``supervisor/catalog/catalog.py``, ``model.py``, ``storage.py``,
``index.py``): instances from every source, discovery filters, TTL updates and the index /
change-signal contract, driven in-process with real config, plans and views.

The catalog creates one asyncio task per health check. No test here yields to the event
loop while a TCP or HTTP check exists, so no probe ever runs (probes are covered by
tests/test_probes.py); TTL checks need no network at all.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import pytest

from supervisor.catalog.catalog import (
    PROXY_CHECK_NAME,
    SERF_CHECK,
    Catalog,
    NotATTLCheck,
    UnknownCheck,
    proxy_check,
    proxy_check_target,
)
from supervisor.catalog.index import Index
from supervisor.catalog.model import CheckResult, Entry, Instance, InstanceSource, Node
from supervisor.catalog.status import CheckKind, CheckStatus
from supervisor.catalog.storage import CatalogStorage, LocalStorage
from supervisor.changes import ChangeSignal
from supervisor.config.build import build_config
from supervisor.config.model import AgentConfig, ProxyDefaults, ServiceDef
from supervisor.config.registrations import build_service
from supervisor.supervision.desired import PlannedProxy, plan_proxies
from supervisor.supervision.machine import State
from supervisor.supervision.view import AgentView, ProxyStatus

API = "127.0.0.1:8500"
PASSING, WARNING, CRITICAL = CheckStatus.PASSING, CheckStatus.WARNING, CheckStatus.CRITICAL


def agent_config(**document: Any) -> AgentConfig:
    return build_config([], {"data_dir": "/d", "node_name": "node-1", **document})


def plan(config: AgentConfig, registered: Sequence[ServiceDef] = ()) -> dict[str, PlannedProxy]:
    proxies = plan_proxies(
        config,
        API,
        {},
        lambda _host, _port: True,
        new_token=lambda: "token",
        rng=random.Random(7),
        registered=registered,
    ).proxies
    return dict(proxies)


def view_of(
    config: AgentConfig,
    registered: Sequence[ServiceDef] = (),
    statuses: Mapping[str, ProxyStatus] | None = None,
) -> AgentView:
    return AgentView(config, "node-id-1", API, plan(config, registered), statuses or {})


def api_service(raw: dict[str, Any]) -> ServiceDef:
    return build_service(raw, "<api registration>", ProxyDefaults())


def proxy_status(proxy_id: str, pid: int | None, state: State, last_exit: str | None = None) -> ProxyStatus:
    return ProxyStatus(
        proxy_id=proxy_id,
        service_id=proxy_id.removesuffix("-proxy"),
        state=state,
        pid=pid,
        generation=1,
        restarts=0,
        adopted=False,
        last_exit=last_exit,
        started_monotonic=None,
        started_wall=None,
        next_attempt_monotonic=None,
        blocked_reason=None,
        port=21000,
        command=("/bin/proxy",),
        stdout_log=None,
        stderr_log=None,
    )


def ttl_service(name: str, status: str = "critical", tags: Sequence[str] = ()) -> dict[str, Any]:
    return {"name": name, "port": 80, "tags": list(tags), "check": {"ttl": "30s", "status": status}}


def managed(name: str, tags: Sequence[str] = (), **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "port": 80,
        "tags": list(tags),
        "connect": {"proxy": {"command": ["/bin/proxy"], "config": config}},
    }


def with_catalog(
    scenario: Callable[[Catalog], Awaitable[None]], storage: CatalogStorage | None = None
) -> None:
    """Run ``scenario`` on an event loop (the catalog lives on one) and stop its checks."""

    async def main() -> None:
        catalog = Catalog(Index(), ChangeSignal(), storage)
        try:
            await scenario(catalog)
        finally:
            catalog.close()

    asyncio.run(main())


def ids(entries: Iterable[Entry]) -> list[str]:
    return [entry.instance.service_id for entry in entries]


# -- instances from every source --------------------------------------------------------------


def test_config_api_and_managed_proxy_instances_all_reach_discovery() -> None:
    config = agent_config(services=[managed("web", tags=["v1"], disable_tcp_check=True)])
    registered = [api_service({"Name": "billing", "Port": 9000, "Tags": ["blue"]})]

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config, registered), registered)
        sources = {
            entry.instance.service_id: entry.instance.source
            for entry in catalog.entries()
            if isinstance(entry.instance, Instance)
        }
        assert sources == {
            "billing": InstanceSource.API,
            "web": InstanceSource.CONFIG,
            "web-proxy": InstanceSource.MANAGED_PROXY,
        }
        (proxy_entry,) = [entry for entry in catalog.entries() if entry.instance.is_managed_proxy]
        # The proxy instance is named after its service and carries none of its tags or meta.
        assert (proxy_entry.instance.name, proxy_entry.instance.kind) == ("web-proxy", "connect-proxy")
        assert proxy_entry.instance.tags == ()
        assert catalog.services() == {"billing": ["blue"], "web": ["v1"], "web-proxy": []}

    with_catalog(scenario)


def test_every_entry_is_on_this_node_with_serf_health_first() -> None:
    config = agent_config(datacenter="east", bind_addr="10.0.0.5", services=[ttl_service("web")])

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        (entry,) = catalog.entries()
        assert entry.node == Node("node-id-1", "node-1", "10.0.0.5", "east", {})
        assert [check.check_id for check in entry.checks] == [SERF_CHECK, "service:web"]
        assert catalog.nodes() == [entry.node]
        assert [check.check_id for check in catalog.storage.node_checks("node-1")] == [SERF_CHECK]

    with_catalog(scenario)


@pytest.mark.parametrize(("bind_addr", "address"), [("0.0.0.0", "127.0.0.1"), ("::", "127.0.0.1")])
def test_a_wildcard_bind_address_is_shown_as_loopback(bind_addr: str, address: str) -> None:
    config = agent_config(bind_addr=bind_addr)

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        assert [node.address for node in catalog.nodes()] == [address]

    with_catalog(scenario)


def test_deregistering_an_api_service_removes_its_instance_and_checks() -> None:
    config = agent_config()
    registered = [api_service({"Name": "billing", "Check": {"TTL": "30s", "CheckID": "billing-ttl"}})]

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config, registered), registered)
        assert ids(catalog.select("billing")) == ["billing"]
        assert catalog.check("billing-ttl") is not None
        before = catalog.changes.count
        catalog.update(view_of(config), ())
        assert catalog.select("billing") == []
        assert catalog.check("billing-ttl") is None and catalog.local_checks() == []
        assert catalog.changes.count == before + 1

    with_catalog(scenario)


# -- discovery filters ------------------------------------------------------------------------


def test_select_filters_by_name_and_tags() -> None:
    config = agent_config(
        services=[
            {**ttl_service("web", tags=["v1", "eu"]), "id": "web-1"},
            {**ttl_service("web", tags=["v2", "eu"]), "id": "web-2"},
            ttl_service("db", tags=["v1"]),
        ]
    )

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        assert ids(catalog.select("web")) == ["web-1", "web-2"]
        assert ids(catalog.select("web", tags=["v1"])) == ["web-1"]
        assert ids(catalog.select("web", tags=["eu", "!v1"])) == ["web-2"]
        assert catalog.select("nothing") == []

    with_catalog(scenario)


def test_passing_and_exclude_critical_filters_use_the_worst_check() -> None:
    config = agent_config(
        services=[
            {**ttl_service("web", "passing"), "id": "ok"},
            {**ttl_service("web", "warning"), "id": "slow"},
            {**ttl_service("web", "critical"), "id": "down"},
            {"name": "web", "id": "unchecked", "port": 80},
        ]
    )

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        statuses = {entry.instance.service_id: entry.status for entry in catalog.select("web")}
        # An instance without checks of its own is passing (serfHealth only).
        assert statuses == {"down": CRITICAL, "ok": PASSING, "slow": WARNING, "unchecked": PASSING}
        assert ids(catalog.select("web", passing=True)) == ["ok", "unchecked"]
        assert ids(catalog.select("web", exclude_critical=True)) == ["ok", "slow", "unchecked"]

    with_catalog(scenario)


def test_connect_lookups_find_the_managed_proxy_by_its_service_name_and_tags() -> None:
    config = agent_config(
        services=[
            managed("web", tags=["v1"], disable_tcp_check=True),
            {"name": "native-app", "port": 81, "connect": {"native": True}},
            {"name": "plain", "port": 82},
        ]
    )

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        assert ids(catalog.select("web")) == ["web"]
        assert ids(catalog.select("web", connect=True)) == ["web-proxy"]
        # A managed proxy answers for its service, so the service's tags select it.
        assert ids(catalog.select("web", connect=True, tags=["v1"])) == ["web-proxy"]
        assert catalog.select("web", connect=True, tags=["v2"]) == []
        assert ids(catalog.select("native-app", connect=True)) == ["native-app"]
        assert catalog.select("plain", connect=True) == []

    with_catalog(scenario)


def test_service_checks_and_local_checks_leave_out_serf_health() -> None:
    config = agent_config(
        services=[
            {"name": "web", "port": 80, "checks": [{"ttl": "30s"}, {"ttl": "30s", "status": "passing"}]},
            ttl_service("db", "passing"),
        ]
    )

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        assert [check.check_id for _, check in catalog.service_checks("web")] == [
            "service:web:1",
            "service:web:2",
        ]
        every = [check.check_id for check in catalog.local_checks()]
        assert every == ["service:db", "service:web:1", "service:web:2"]  # sorted by ID
        passing = catalog.local_checks(lambda check: check.status is PASSING)
        assert [check.check_id for check in passing] == ["service:db", "service:web:2"]

    with_catalog(scenario)


# -- TTL check updates --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [PASSING, WARNING, CRITICAL])
def test_a_ttl_update_sets_status_and_output(status: CheckStatus) -> None:
    initial = "critical" if status is not CRITICAL else "passing"
    config = agent_config(services=[ttl_service("web", initial)])

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        before = catalog.check("service:web")
        assert before is not None
        catalog.update_ttl("service:web", status, "reported by the app")
        after = catalog.check("service:web")
        assert after is not None
        assert (after.status, after.output) == (status, "reported by the app")
        assert after.create_index == before.create_index and after.modify_index > before.modify_index
        # discovery reads the published entry, so it sees the new status too
        (entry,) = catalog.select("web")
        assert entry.status is status

    with_catalog(scenario)


def test_a_ttl_update_for_an_unknown_check_raises_unknown_check() -> None:
    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(agent_config(services=[ttl_service("web")])), ())
        with pytest.raises(UnknownCheck):
            catalog.update_ttl("service:nope", PASSING, "")

    with_catalog(scenario)


def test_a_ttl_update_for_a_tcp_check_raises_not_a_ttl_check() -> None:
    # The TCP check's task is created but never runs: this scenario never yields.
    config = agent_config(
        services=[{"name": "web", "port": 80, "check": {"tcp": "127.0.0.1:1", "interval": "10s"}}]
    )

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        with pytest.raises(NotATTLCheck, match="'service:web' is a tcp check"):
            catalog.update_ttl("service:web", PASSING, "")
        check = catalog.check("service:web")
        assert check is not None and check.status is CRITICAL  # untouched

    with_catalog(scenario)


def test_a_ttl_update_pushes_the_expiry_deadline_forward() -> None:
    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(agent_config(services=[ttl_service("web")])), ())
        state = catalog.checks["service:web"]
        state.ttl_deadline = time.monotonic() - 1  # as if it had been due already
        catalog.update_ttl("service:web", PASSING, "")
        assert state.ttl_deadline is not None and state.ttl_deadline > time.monotonic() + 29

    with_catalog(scenario)


def test_an_expired_ttl_turns_the_check_critical_and_wakes_waiters() -> None:
    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(agent_config(services=[ttl_service("web", "passing")])), ())
        woken = catalog.changes.current()
        state = catalog.checks["service:web"]
        state.ttl_deadline = time.monotonic()  # due now: no waiting for 30 s
        state.wake.set()
        await asyncio.wait_for(woken.wait(), 5)
        result = catalog.check("service:web")
        assert result is not None and (result.status, result.output) == (CRITICAL, "TTL expired")
        assert [entry.status for entry in catalog.select("web")] == [CRITICAL]

    with_catalog(scenario)


# -- the index and the change signal ---------------------------------------------------------------


def test_the_same_view_twice_changes_nothing() -> None:
    config = agent_config(services=[ttl_service("web"), managed("api", disable_tcp_check=True)])

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        count, index = catalog.changes.count, catalog.index.value
        catalog.update(view_of(config), ())
        assert (catalog.changes.count, catalog.index.value) == (count, index)

    with_catalog(scenario)


def test_repeating_a_ttl_result_neither_bumps_the_index_nor_wakes_waiters() -> None:
    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(agent_config(services=[ttl_service("web")])), ())
        catalog.update_ttl("service:web", PASSING, "fine")
        count, index = catalog.changes.count, catalog.index.value
        catalog.update_ttl("service:web", PASSING, "fine")
        assert (catalog.changes.count, catalog.index.value) == (count, index)
        catalog.update_ttl("service:web", PASSING, "still fine")  # a new output is a change
        assert catalog.changes.count == count + 1 and catalog.index.value > index

    with_catalog(scenario)


def test_changing_one_service_moves_only_its_entry_index() -> None:
    before = agent_config(services=[ttl_service("web", tags=["v1"]), ttl_service("db")])
    after = agent_config(services=[ttl_service("web", tags=["v2"]), ttl_service("db")])

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(before), ())
        first = {entry.instance.service_id: entry.index for entry in catalog.entries()}
        count = catalog.changes.count
        catalog.update(view_of(after), ())
        second = {entry.instance.service_id: entry.index for entry in catalog.entries()}
        assert second["db"] == first["db"]
        assert second["web"] > first["web"]
        assert catalog.changes.count == count + 1
        assert second["web"] <= catalog.index.value  # never ahead of the catalog's index

    with_catalog(scenario)


def test_a_changed_check_definition_keeps_its_reported_status() -> None:
    before = agent_config(services=[ttl_service("web", tags=["v1"])])
    after = agent_config(services=[ttl_service("web", tags=["v2"])])

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(before), ())
        catalog.update_ttl("service:web", WARNING, "degraded")
        created = catalog.check("service:web")
        catalog.update(view_of(after), ())
        result = catalog.check("service:web")
        assert result is not None and created is not None
        assert (result.status, result.output, result.service_tags) == (WARNING, "degraded", ("v2",))

    with_catalog(scenario)


def test_index_is_strictly_increasing_from_the_wall_clock() -> None:
    started = int(time.time() * 1000)
    index = Index()
    assert index.value >= started
    values = [index.next() for _ in range(5)]
    assert values == sorted(set(values)) and values[0] > started


def test_change_signal_sets_the_event_taken_before_the_change() -> None:
    changes = ChangeSignal()
    waiting = changes.current()
    changes.fire()
    assert waiting.is_set() and changes.count == 1
    assert not changes.current().is_set()  # the next change gets a fresh event


# -- managed proxies' listening checks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "target"),
    [
        ({}, "127.0.0.1:21000"),
        ({"bind_address": "::"}, "127.0.0.1:21000"),
        ({"bind_address": "10.1.2.3"}, "10.1.2.3:21000"),
        ({"bind_address": "[::1]"}, "[::1]:21000"),
        ({"bind_address": "10.1.2.3", "tcp_check_address": "192.0.2.9"}, "192.0.2.9:21000"),
        ({"disable_tcp_check": True}, None),
    ],
)
def test_proxy_check_address_follows_consuls_rule(config: dict[str, Any], target: str | None) -> None:
    (planned,) = plan(agent_config(services=[managed("web", bind_port=21000, **config)])).values()
    assert proxy_check_target(planned) == target


def test_the_builtin_proxy_listening_check_must_answer_tls() -> None:
    service = {"name": "web", "port": 80, "connect": {"proxy": {"config": {"bind_port": 21000}}}}
    (builtin,) = plan(agent_config(services=[service])).values()
    (custom,) = plan(agent_config(services=[managed("web", bind_port=21000)])).values()
    builtin_check, custom_check = proxy_check(builtin), proxy_check(custom)
    assert builtin_check is not None and custom_check is not None
    assert (builtin_check.check_id, builtin_check.name) == ("service:web-proxy", PROXY_CHECK_NAME)
    assert builtin_check.kind is CheckKind.TCP and builtin_check.service_name == "web-proxy"
    assert builtin_check.tls_listener and not custom_check.tls_listener


def test_a_proxy_whose_process_exits_is_critical_at_once() -> None:
    config = agent_config(services=[managed("web", bind_port=21000)])

    async def scenario(catalog: Catalog) -> None:
        running = {"web-proxy": proxy_status("web-proxy", 4321, State.RUNNING)}
        catalog.update(view_of(config, statuses=running), ())
        assert catalog.checks["service:web-proxy"].pid == 4321
        count = catalog.changes.count
        gone = {"web-proxy": proxy_status("web-proxy", None, State.BACKOFF, "exit status 1")}
        catalog.update(view_of(config, statuses=gone), ())
        result = catalog.check("service:web-proxy")
        assert result is not None and result.status is CRITICAL
        assert result.output == "proxy process is not running (backoff: exit status 1)"
        assert catalog.changes.count == count + 1
        assert catalog.select("web", connect=True, passing=True) == []

    with_catalog(scenario)


# -- storage behind its interface ----------------------------------------------------------------


def _result(check_id: str, status: CheckStatus) -> CheckResult:
    return CheckResult(check_id, check_id, status, "", "", "remote", "remote", (), 1, 1)


class ClusterStorage(LocalStorage):
    """A datacenter-wide store: this agent's entries plus another agent's (what a cluster
    backend behind ``CatalogStorage`` would hold)."""

    def __init__(self, remote: Entry) -> None:
        super().__init__()
        self.remote = remote
        self.puts = 0

    def put_local(
        self, node: Node, entries: Mapping[str, Entry], node_checks: tuple[CheckResult, ...]
    ) -> None:
        self.puts += 1
        super().put_local(node, entries, node_checks)

    def entries(self) -> Iterable[Entry]:
        return [*super().entries(), self.remote]

    def nodes(self) -> list[Node]:
        return [*super().nodes(), self.remote.node]


def test_every_query_reads_from_the_storage_so_a_shared_store_answers_for_other_nodes() -> None:
    remote_node = Node("remote-id", "node-2", "10.0.0.2", "dc1", {})
    remote = Entry(
        remote_node,
        Instance(api_service({"Name": "web", "ID": "web-remote", "Tags": ["v1"]}), InstanceSource.API),
        (_result(SERF_CHECK, PASSING), _result("remote-check", CRITICAL)),
        1,
    )
    storage = ClusterStorage(remote)
    config = agent_config(services=[ttl_service("web", "passing", tags=["v1"])])

    async def scenario(catalog: Catalog) -> None:
        catalog.update(view_of(config), ())
        assert storage.puts == 1  # one write per change, not per query
        assert ids(catalog.select("web", tags=["v1"])) == ["web", "web-remote"]
        assert ids(catalog.select("web", passing=True)) == ["web"]
        assert [node.name for node in catalog.nodes()] == ["node-1", "node-2"]
        assert "remote-check" in [check.check_id for _, check in catalog.service_checks("web")]

    with_catalog(scenario, storage)


def test_local_storage_keeps_entries_by_service_id_and_node_checks_per_node() -> None:
    storage = LocalStorage()
    assert storage.nodes() == [] and list(storage.entries()) == []
    assert storage.node_checks("node-1") == ()
    node = Node("id", "node-1", "127.0.0.1", "dc1", {})
    serf = _result(SERF_CHECK, PASSING)

    def entry(service_id: str) -> Entry:
        return Entry(node, Instance(api_service({"Name": service_id}), InstanceSource.API), (serf,), 1)

    storage.put_local(node, {"b": entry("b"), "a": entry("a")}, (serf,))
    assert ids(storage.entries()) == ["a", "b"]  # a stable order
    assert storage.nodes() == [node]
    assert storage.node_checks("node-1") == (serf,) and storage.node_checks("node-2") == ()
    storage.put_local(node, {"c": entry("c")}, ())
    assert ids(storage.entries()) == ["c"]  # replaced, not merged
