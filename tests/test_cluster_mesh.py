"""The mesh across hosts, end to end: three "hosts" (network namespaces on a bridge of their
own, each with an etcd member, an agent and its built-in proxies), ``web`` on host 1 with
upstreams to ``db`` on hosts 2 and 3 by service and by prepared query, over mutual TLS on
the hosts' addresses. New connections spread over both; a deny made on host 3 stops them;
when host 3 dies they all go to host 2."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers import netns
from tests.helpers.agent import AgentProcess
from tests.helpers.etcd import EtcdCluster, etcd_binary
from tests.helpers.processes import wait_until

TTL = 2


@dataclass
class Mesh:
    hosts: netns.Hosts
    etcd: EtcdCluster
    agents: list[AgentProcess]
    upstream_port: int
    query_port: int

    def api(self, number: int, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        return self.hosts.http(number, self.agents[number - 1].port, method, path, body)

    def connect(self, port: int, count: int) -> list[str]:
        return self.hosts.tcp_exchange(1, port, b"ping", count)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")
    netns.sweep_leftovers()
    hosts = netns.Hosts(3).create()
    etcd: EtcdCluster | None = None
    agents: list[AgentProcess] = []
    apps = []
    try:
        etcd = EtcdCluster(binary, hosts=hosts.addresses, netns=hosts.names).start()
        endpoints = [f"http://{address}:2379" for address in hosts.addresses]
        kek = tmp_path / "ca.kek"
        kek.write_text(os.urandom(32).hex())
        kek.chmod(0o600)
        upstream_port, query_port = free_port(), free_port()
        for number, address in enumerate(hosts.addresses, 1):
            cluster: dict[str, Any] = {"etcd_endpoints": endpoints, "lease_ttl": f"{TTL}s"}
            if number == 1:
                cluster.update(ca_signer=True, ca_key_file=str(kek))
                service = {
                    "name": "web",
                    "port": 8080,
                    "connect": {
                        "proxy": {
                            "upstreams": [
                                {"destination_name": "db", "local_bind_port": upstream_port},
                                {
                                    "destination_type": "prepared_query",
                                    "destination_name": "db-query",
                                    "local_bind_port": query_port,
                                },
                            ]
                        }
                    },
                }
            else:
                service = {"name": "db", "port": 5432, "connect": {"proxy": {}}}
                app = hosts.spawn(
                    number,
                    [sys.executable, "-c", netns.NAMED_APP, f"h{number}", "5432"],
                    str(tmp_path / f"app{number}.log"),
                )
                apps.append(app)
            agent = AgentProcess(
                tmp_path / f"h{number}",
                command_prefix=hosts.prefix(number),
                extra={
                    "node_name": f"h{number}",
                    "bind_addr": address,
                    "cluster": cluster,
                    "connect": {"proxy": {"allow_managed_root": True}},
                    "services": [service],
                },
            )
            agents.append(agent)
            agent.start()
        yield Mesh(hosts, etcd, agents, upstream_port, query_port)
    finally:
        for agent in agents:
            agent.kill_everything()
        for app in apps:
            app.kill()
            app.wait(5)
        if etcd is not None:
            etcd.stop()
        hosts.destroy()


def test_web_on_host_1_reaches_db_on_hosts_2_and_3_over_mutual_tls(mesh: Mesh) -> None:
    def db_instances() -> list[tuple[str, str]]:
        status, _, body = mesh.api(1, "GET", "/v1/health/connect/db?passing")
        assert status == 200, body
        return sorted((entry["Node"]["Node"], entry["Service"]["Address"]) for entry in body)

    wait_until(
        lambda: len(db_instances()) == 2, timeout=30, interval=0.3, message="db's proxies on hosts 2 and 3"
    )
    addresses = dict(db_instances())
    assert addresses == {"h2": mesh.hosts.addresses[1], "h3": mesh.hosts.addresses[2]}  # host addresses

    def answers(port: int, count: int = 20) -> list[str]:
        return mesh.connect(port, count)

    def all_reached(port: int) -> list[str] | None:
        got = answers(port)
        return got if all(answer in ("h2:ping", "h3:ping") for answer in got) else None

    found = wait_until(
        lambda: all_reached(mesh.upstream_port),
        timeout=30,
        interval=0.5,
        message="web's upstream to reach db",
    )
    assert found is not None and set(found) == {"h2:ping", "h3:ping"}, (
        found
    )  # new connections spread over both

    # A prepared-query upstream, the query made on another host.
    query = {"Name": "db-query", "Service": {"Service": "db", "OnlyPassing": True}}
    status, _, _ = mesh.api(2, "POST", "/v1/query", query)
    assert status == 200
    by_query = wait_until(
        lambda: all_reached(mesh.query_port),
        timeout=30,
        interval=0.5,
        message="the prepared-query upstream",
    )
    assert by_query is not None and set(by_query) == {"h2:ping", "h3:ping"}

    # A deny made on host 3 stops new connections from host 1 into db on both hosts.
    deny = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    status, _, created = mesh.api(3, "POST", "/v1/connect/intentions", deny)
    assert status == 200
    made = time.monotonic()
    wait_until(
        lambda: not any(a.endswith(":ping") for a in answers(mesh.upstream_port, 6)),
        timeout=5,
        interval=0.05,
        message="the deny to take effect",
    )
    assert time.monotonic() - made < 1.0  # (the bound; each probe here costs ~0.1 s of ip netns exec)
    assert mesh.api(1, "DELETE", f"/v1/connect/intentions/{created['ID']}")[0] == 200
    wait_until(
        lambda: all(a.endswith(":ping") for a in answers(mesh.upstream_port, 6)),
        timeout=10,
        interval=0.2,
        message="allowed again",
    )

    # Host 3 dies (agent, proxies, app and its etcd member): everything goes to host 2.
    mesh.hosts.kill_host(3)
    wait_until(
        lambda: answers(mesh.upstream_port, 12) == ["h2:ping"] * 12,
        timeout=TTL + 15,
        interval=0.3,
        message="every connection on host 2",
    )
    assert db_instances() == [("h2", mesh.hosts.addresses[1])]
    assert answers(mesh.query_port, 6) == ["h2:ping"] * 6


def test_a_partitioned_host_is_critical_elsewhere_keeps_its_last_view_and_converges_after_healing(
    mesh: Mesh,
) -> None:
    def serf(number: int, node: str) -> str | None:
        status, _, body = mesh.api(number, "GET", f"/v1/health/node/{node}")
        assert status == 200, body
        return next((check["Status"] for check in body if check["CheckID"] == "serfHealth"), None)

    wait_until(lambda: serf(1, "h3") == "passing", timeout=30, interval=0.3, message="h3 alive on h1")
    wait_until(lambda: serf(3, "h1") == "passing", timeout=30, interval=0.3, message="h1 alive on h3")

    def proxy_pids() -> dict[str, int]:
        _, _, proxies = mesh.api(3, "GET", "/v1/agent/connect/proxies")
        return {proxy_id: int(proxy["Pid"]) for proxy_id, proxy in proxies.items()}

    proxies_before = proxy_pids()
    assert proxies_before and all(proxies_before.values())
    mesh.hosts.cut(3)
    wait_until(
        lambda: serf(1, "h3") == "critical", timeout=TTL + 15, interval=0.3, message="h3 critical on h1"
    )
    status, headers, body = mesh.api(3, "GET", "/v1/health/service/web")
    assert status == 200 and [entry["Node"]["Node"] for entry in body] == ["h1"]  # its last view
    wait_until(
        lambda: mesh.api(3, "GET", "/v1/health/service/web")[1]["X-Consul-KnownLeader"] == "false",
        timeout=30,
        interval=0.3,
        message="h3 to know it is cut off",
    )
    # Its proxies run on, untouched (no etcd call on the supervision path).
    assert proxy_pids() == proxies_before
    mesh.hosts.heal(3)
    wait_until(lambda: serf(1, "h3") == "passing", timeout=30, interval=0.3, message="h3 alive again on h1")
    wait_until(
        lambda: mesh.api(3, "GET", "/v1/health/service/web")[1]["X-Consul-KnownLeader"] == "true",
        timeout=30,
        interval=0.3,
        message="h3 connected again",
    )

    # Converged: the same answer with the same index everywhere (h3's return itself is a
    # change -- its alive/ key and full sync -- that each host sees a moment apart).
    def db_everywhere() -> set[tuple[str, str]]:
        answers = [mesh.api(n, "GET", "/v1/health/service/db") for n in (1, 2, 3)]
        return {(headers["X-Consul-Index"], json.dumps(body, sort_keys=True)) for _, headers, body in answers}

    wait_until(lambda: len(db_everywhere()) == 1, timeout=10, interval=0.3, message="one answer and index")
