"""Cluster mode on a real 3-member etcd: two agents (two "hosts" on loopback, each with its
own ports and data_dir) share one catalog; a dead host's instances go critical everywhere;
a restarted agent takes its lease back without a blink; ``leave`` deregisters at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess
from tests.helpers.etcd import EtcdCluster
from tests.helpers.processes import wait_until

TTL = 2


def cluster_block(etcd: EtcdCluster, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"etcd_endpoints": etcd.endpoints, "key_prefix": prefix, "lease_ttl": f"{TTL}s", **extra}


def make_host(
    root: Path, name: str, etcd: EtcdCluster, prefix: str, services: list[dict[str, Any]]
) -> AgentProcess:
    agent = AgentProcess(
        root / name,
        extra={"node_name": name, "cluster": cluster_block(etcd, prefix), "services": services},
    )
    return agent


@pytest.fixture
def hosts(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> Iterator[tuple[AgentProcess, AgentProcess]]:
    a = make_host(tmp_path, "host-a", etcd_cluster, etcd_prefix, [{"name": "web", "port": 8080}])
    b = make_host(
        tmp_path, "host-b", etcd_cluster, etcd_prefix, [{"name": "db", "port": 5432, "tags": ["primary"]}]
    )
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.kill_everything()
        b.kill_everything()


def service_nodes(agent: AgentProcess, name: str, query: str = "") -> list[str]:
    status, _, body = agent.http("GET", f"/v1/health/service/{name}{query}")
    assert status == 200, body
    return sorted(entry["Node"]["Node"] for entry in body)


def serf_status(agent: AgentProcess, node: str) -> str | None:
    status, _, body = agent.http("GET", f"/v1/health/node/{node}")
    assert status == 200, body
    return next((check["Status"] for check in body if check["CheckID"] == "serfHealth"), None)


def test_each_hosts_services_are_visible_on_every_host(hosts: tuple[AgentProcess, AgentProcess]) -> None:
    a, b = hosts
    wait_until(lambda: service_nodes(b, "web", "?passing") == ["host-a"], timeout=10, message="web on host-b")
    wait_until(lambda: service_nodes(a, "db") == ["host-b"], timeout=10, message="db on host-a")
    _, _, catalog = a.http("GET", "/v1/catalog/services")
    assert catalog == {"db": ["primary"], "web": []}
    _, _, nodes = b.http("GET", "/v1/catalog/nodes")
    assert sorted(node["Node"] for node in nodes) == ["host-a", "host-b"]
    _, _, entries = a.http("GET", "/v1/catalog/service/db")
    assert [(e["Node"], e["ServicePort"], e["ServiceTags"]) for e in entries] == [
        ("host-b", 5432, ["primary"])
    ]

    # An API registration on one host reaches the other; its deregistration too.
    status, _, _ = a.http("PUT", "/v1/agent/service/register", {"Name": "billing", "Port": 9000})
    assert status == 200
    wait_until(lambda: service_nodes(b, "billing") == ["host-a"], timeout=5, message="billing on host-b")
    a.http("PUT", "/v1/agent/service/deregister/billing")
    wait_until(lambda: service_nodes(b, "billing") == [], timeout=5, message="billing gone from host-b")

    # Once quiet, both hosts answer the same query with the same index.
    def same_index() -> bool:
        first = [host.http("GET", "/v1/health/service/web")[1]["X-Consul-Index"] for host in (a, b)]
        return first[0] == first[1]

    wait_until(same_index, timeout=5, message="the same index for web on both hosts")

    status, _, self_info = b.http("GET", "/v1/agent/self")
    assert self_info["Cluster"]["State"] == "connected"
    _, headers, _ = b.http("GET", "/v1/catalog/services")
    assert headers["X-Consul-KnownLeader"] == "true"
    _, _, members = a.http("GET", "/v1/agent/members")
    assert sorted((m["Name"], m["Status"]) for m in members) == [("host-a", 1), ("host-b", 1)]


def test_a_blocking_query_on_one_host_wakes_for_a_change_on_another(
    hosts: tuple[AgentProcess, AgentProcess],
) -> None:
    a, b = hosts
    wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
    _, headers, _ = b.http("GET", "/v1/health/service/cache")
    index = headers["X-Consul-Index"]
    answer: dict[str, Any] = {}

    def block() -> None:
        answer["reply"] = b.http("GET", f"/v1/health/service/cache?index={index}&wait=20s")

    waiter = threading.Thread(target=block)
    waiter.start()
    time.sleep(0.3)  # (the query is held now; if it were not, it would answer "no change" below)
    a.http("PUT", "/v1/agent/service/register", {"Name": "cache", "Port": 6379})
    waiter.join(15)
    assert not waiter.is_alive(), "the blocking query did not wake for a change made on host-a"
    _, new_headers, body = answer["reply"]
    assert [entry["Node"]["Node"] for entry in body] == ["host-a"]
    assert int(new_headers["X-Consul-Index"]) > int(index)


def test_a_dead_host_goes_critical_everywhere_and_a_restart_takes_its_lease_back(
    hosts: tuple[AgentProcess, AgentProcess],
) -> None:
    a, b = hosts
    wait_until(lambda: service_nodes(b, "web", "?passing") == ["host-a"], timeout=10, message="web on host-b")

    # A restart within the lease's TTL: host-b never sees host-a's instances fail.
    a.kill9()
    seen: list[str | None] = []
    a.start(wait=False)
    deadline = time.monotonic() + 2 * TTL + 2
    while time.monotonic() < deadline:
        seen.append(serf_status(b, "host-a"))
        time.sleep(0.05)
    a.wait_started()
    assert "critical" not in seen, seen
    assert "took back lease" in a.current_log()

    # Killed for good: critical within the TTL (plus etcd's expiry sweep and the watch).
    a.kill9()
    killed = time.monotonic()
    wait_until(lambda: serf_status(b, "host-a") == "critical", timeout=TTL + 5, message="host-a critical")
    assert time.monotonic() - killed >= TTL - 0.5  # it is the lease that ran out, not a leave
    assert service_nodes(b, "web", "?passing") == []
    assert service_nodes(b, "web") == ["host-a"]  # failed is not deregistered
    _, _, members = b.http("GET", "/v1/agent/members")
    assert ("host-a", 4) in [(m["Name"], m["Status"]) for m in members]


def test_leave_deregisters_the_host_at_once(hosts: tuple[AgentProcess, AgentProcess]) -> None:
    a, b = hosts
    wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
    status, _, _ = a.http("PUT", "/v1/agent/leave")
    assert status == 200
    wait_until(lambda: service_nodes(b, "web") == [], timeout=3, message="host-a's web gone from host-b")
    _, _, nodes = b.http("GET", "/v1/catalog/nodes")
    assert [node["Node"] for node in nodes] == ["host-b"]
    assert "cluster: left" in a.log()
