"""Cluster mode on a real 3-member etcd: two agents (two "hosts" on loopback, each with its
own ports and data_dir) share one catalog; a dead host's instances go critical everywhere;
a restarted agent takes its lease back without a blink; ``leave`` deregisters at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.cluster.etcd import EtcdClient, EtcdError
from tests.helpers.agent import AgentProcess
from tests.helpers.etcd import EtcdCluster, etcd_binary
from tests.helpers.processes import wait_until

TTL = 2


def cluster_block(etcd: EtcdCluster, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"etcd_endpoints": etcd.endpoints, "key_prefix": prefix, "lease_ttl": f"{TTL}s", **extra}


def make_host(
    root: Path, name: str, etcd: EtcdCluster, prefix: str, services: list[dict[str, Any]], **cluster: Any
) -> AgentProcess:
    return AgentProcess(
        root / name,
        extra={"node_name": name, "cluster": cluster_block(etcd, prefix, **cluster), "services": services},
    )


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


def held(agent: AgentProcess) -> int:
    """Blocking queries the agent holds now (its metrics' gauge)."""
    gauges = agent.get("/v1/agent/metrics")["Gauges"]
    return int(next((g["Value"] for g in gauges if g["Name"] == "proxy_supervisor.api.blocking_queries"), 0))


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
    wait_until(lambda: held(b) >= 1, timeout=5, message="the blocking query held on host-b")
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


def test_check_output_alone_is_written_at_most_every_check_update_interval(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    extra = {"node_name": "host-a", "cluster": cluster_block(etcd_cluster, etcd_prefix)}
    a = AgentProcess(tmp_path / "host-a", extra={**extra, "check_update_interval": "4s"})
    b = make_host(tmp_path, "host-b", etcd_cluster, etcd_prefix, [])
    try:
        a.start()
        b.start()
        a.http("PUT", "/v1/agent/check/register", {"Name": "beat", "CheckID": "beat", "TTL": "1h"})

        def output_on_b() -> tuple[str, str] | None:
            checks = [c for c in b.http("GET", "/v1/health/node/host-a")[2] if c["CheckID"] == "beat"]
            return (checks[0]["Status"], checks[0]["Output"]) if checks else None

        a.http("PUT", "/v1/agent/check/pass/beat?note=one")
        wait_until(lambda: output_on_b() == ("passing", "one"), timeout=5, message="a status change at once")
        a.http("PUT", "/v1/agent/check/pass/beat?note=two")
        changed = time.monotonic()
        assert a.get("/v1/agent/checks")["beat"]["Output"] == "two"  # the agent's own view: at once
        while time.monotonic() < changed + 1.5:
            assert output_on_b() == ("passing", "one")  # the output alone waits
            time.sleep(0.1)
        wait_until(lambda: output_on_b() == ("passing", "two"), timeout=8, message="the held-back output")
        a.http("PUT", "/v1/agent/check/fail/beat?note=down")
        wait_until(
            lambda: output_on_b() == ("critical", "down"), timeout=2, message="a status change at once"
        )
    finally:
        a.kill_everything()
        b.kill_everything()


def test_records_too_large_for_one_etcd_request_are_split_or_kept_local(
    hosts: tuple[AgentProcess, AgentProcess],
) -> None:
    a, b = hosts
    wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
    # 20 services of ~80 KB records each: more than one etcd request holds, all published.
    for number in range(20):
        body = {"ID": f"wide-{number}", "Name": "wide", "Port": 1000 + number, "Tags": ["t" * 2000] * 20}
        assert a.http("PUT", "/v1/agent/service/register", body)[0] == 200
    wait_until(lambda: len(service_nodes(b, "wide")) == 20, timeout=10, message="all 20 on host-b")
    # One service whose record no etcd request can hold stays on its host; the rest go on.
    huge = {"ID": "huge", "Name": "huge", "Port": 1, "Tags": ["t" * 1000] * 900}
    assert a.http("PUT", "/v1/agent/service/register", huge)[0] == 200
    assert a.http("PUT", "/v1/agent/service/register", {"Name": "after", "Port": 2})[0] == 200
    wait_until(lambda: service_nodes(b, "after") == ["host-a"], timeout=10, message="the next one on host-b")
    assert service_nodes(b, "huge") == []
    assert "huge" in a.get("/v1/agent/services")
    wait_until(lambda: "services/host-a/huge is not published to the cluster" in a.log(), timeout=5)
    status, _, self_info = a.http("GET", "/v1/agent/self")
    assert self_info["Cluster"]["State"] == "connected"


def test_leave_deregisters_the_host_at_once(hosts: tuple[AgentProcess, AgentProcess]) -> None:
    a, b = hosts
    wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
    status, _, _ = a.http("PUT", "/v1/agent/leave")
    assert status == 200
    wait_until(lambda: service_nodes(b, "web") == [], timeout=3, message="host-a's web gone from host-b")
    _, _, nodes = b.http("GET", "/v1/catalog/nodes")
    assert [node["Node"] for node in nodes] == ["host-b"]
    assert "cluster: left" in a.log()


def test_intentions_and_queries_are_cluster_wide_and_unique(hosts: tuple[AgentProcess, AgentProcess]) -> None:
    a, b = hosts
    wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
    body = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
    answers: list[tuple[int, Any]] = []

    def create(host: AgentProcess) -> None:
        status, _, reply = host.http("POST", "/v1/connect/intentions", body)
        answers.append((status, reply))

    threads = [threading.Thread(target=create, args=(host,)) for host in (a, b, a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 409, 409, 409], answers
    assert all("duplicate intention found" in str(reply) for status, reply in answers if status == 409)
    intention_id = next(reply["ID"] for status, reply in answers if status == 200)

    # Read back at once on the writer; seen on the other host too, with the same index.
    def has_it(host: AgentProcess) -> bool:
        return host.http("GET", f"/v1/connect/intentions/{intention_id}")[0] == 200

    for host in (a, b):
        wait_until(lambda: has_it(host), timeout=5, message="the intention on both hosts")  # noqa: B023
        _, _, check = host.http("GET", "/v1/connect/intentions/check?source=web&destination=db")
        assert check == {"Allowed": False}
    indexes = {host.http("GET", "/v1/connect/intentions")[1]["X-Consul-Index"] for host in (a, b)}
    assert len(indexes) == 1

    # Changed on b (and read back there at once: the write waits for b's mirror), deleted on a.
    status, _, _ = b.http("PUT", f"/v1/connect/intentions/{intention_id}", {**body, "Action": "allow"})
    assert status == 200
    _, _, check = b.http("GET", "/v1/connect/intentions/check?source=web&destination=db")
    assert check == {"Allowed": True}
    wait_until(
        lambda: (
            a.http("GET", "/v1/connect/intentions/check?source=web&destination=db")[2] == {"Allowed": True}
        ),
        timeout=5,
        message="the change on host-a",
    )
    assert a.http("DELETE", f"/v1/connect/intentions/{intention_id}")[0] == 200
    wait_until(
        lambda: b.http("GET", "/v1/connect/intentions")[2] == [], timeout=5, message="deleted everywhere"
    )

    # A prepared query made on a runs on b, and its name is taken cluster-wide.
    query = {"Name": "primary-db", "Service": {"Service": "db", "Tags": ["primary"]}}
    status, _, created = a.http("POST", "/v1/query", query)
    assert status == 200
    status, _, reply = b.http("POST", "/v1/query", query)
    assert status == 409 and "aliases an existing query name" in str(reply)
    _, _, executed = b.http("GET", "/v1/query/primary-db/execute")
    assert [node["Node"]["Node"] for node in executed["Nodes"]] == ["host-b"]
    assert b.http("DELETE", f"/v1/query/{created['ID']}")[0] == 200
    wait_until(lambda: a.http("GET", "/v1/query")[2] == [], timeout=5, message="the query gone on host-a")


def test_a_single_host_agent_carries_its_intentions_into_the_cluster(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    solo = AgentProcess(
        tmp_path / "solo", extra={"node_name": "solo", "services": [{"name": "web", "port": 80}]}
    )
    other = make_host(tmp_path, "other", etcd_cluster, etcd_prefix, [])
    try:
        # The cluster exists first (its index base is fixed then), the single-host agent comes
        # later, hands out indexes from its own clock, and must never see them go backwards.
        other.start()
        # The cluster already has its own api => db: that one wins, and the clash is reported.
        clash = {"SourceName": "api", "DestinationName": "db", "Action": "allow"}
        assert other.http("POST", "/v1/connect/intentions", clash)[0] == 200
        solo.start()
        for source, action in (("web", "allow"), ("api", "deny")):
            body = {"SourceName": source, "DestinationName": "db", "Action": action}
            assert solo.http("POST", "/v1/connect/intentions", body)[0] == 200
        solo_index = int(solo.http("GET", "/v1/connect/intentions")[1]["X-Consul-Index"])
        solo.signal(15)
        solo.wait_exit()
        solo.write("10-cluster.json", {"cluster": cluster_block(etcd_cluster, etcd_prefix)})
        solo.start()

        def pairs(host: AgentProcess) -> list[tuple[str, str, str]]:
            _, _, found = host.http("GET", "/v1/connect/intentions")
            return sorted((i["SourceName"], i["DestinationName"], i["Action"]) for i in found)

        expected = [("api", "db", "allow"), ("web", "db", "allow")]
        wait_until(lambda: pairs(other) == expected, timeout=10, message="web => db carried into the cluster")
        wait_until(lambda: pairs(solo) == expected, timeout=5, message="the cluster's intentions on solo")
        assert "kept the cluster's intention" in solo.log()
        assert int(solo.http("GET", "/v1/connect/intentions")[1]["X-Consul-Index"]) > solo_index
        solo.signal(15)
        solo.wait_exit()
        solo.start()  # carried once: a restart does not bring back what the cluster deleted
        assert "carried" not in solo.current_log()
    finally:
        solo.kill_everything()
        other.kill_everything()


def verifies(leaf_pem: str, roots: dict[str, Any]) -> bool:
    """The leaf (with the chain it came with) was signed by the active root."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    leaf = x509.load_pem_x509_certificates(leaf_pem.encode())[0]
    active = next(root for root in roots["Roots"] if root["ID"] == roots["ActiveRootID"])
    root = x509.load_pem_x509_certificate(active["RootCert"].encode())
    public = root.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert leaf.signature_hash_algorithm is not None
    try:
        public.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    except Exception:  # noqa: BLE001 - InvalidSignature: not signed by it
        return False
    return leaf.issuer == root.subject


@pytest.fixture
def signed_hosts(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> Iterator[tuple[AgentProcess, AgentProcess, AgentProcess]]:
    kek = tmp_path / "ca.kek"
    kek.write_text(os.urandom(32).hex())
    kek.chmod(0o600)
    signer = {"ca_signer": True, "ca_key_file": str(kek)}
    made = []
    for name, services, extra in (
        ("signer-1", [{"name": "web", "port": 8080}], signer),
        ("plain", [{"name": "db", "port": 5432}], {}),
        ("signer-2", [{"name": "cache", "port": 6379}], signer),
    ):
        cluster = cluster_block(etcd_cluster, etcd_prefix, **extra)
        made.append(
            AgentProcess(tmp_path / name, extra={"node_name": name, "cluster": cluster, "services": services})
        )
    try:
        for agent in made:
            agent.start()
        yield made[0], made[1], made[2]
    finally:
        for agent in made:
            agent.kill_everything()


def test_one_ca_for_the_cluster_with_its_key_only_on_signers(
    signed_hosts: tuple[AgentProcess, AgentProcess, AgentProcess], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    first, plain, second = signed_hosts

    def roots(host: AgentProcess) -> dict[str, Any]:
        found: dict[str, Any] = host.get("/v1/agent/connect/ca/roots")
        return found

    wait_until(
        lambda: (
            len({roots(host)["ActiveRootID"] for host in signed_hosts}) == 1
            and len({roots(host)["TrustDomain"] for host in signed_hosts}) == 1
        ),
        timeout=15,
        message="one CA root on every host",
    )
    # A leaf issued on the plain host verifies against the roots another host serves.
    status, _, leaf = plain.http("GET", "/v1/agent/connect/ca/leaf/db")
    assert status == 200, leaf
    assert verifies(leaf["CertPEM"], roots(first))
    assert leaf["ServiceURI"].startswith(f"spiffe://{roots(second)['TrustDomain']}/")
    # Only for services registered on that host: the agent says so at once, and a request
    # written past the agent (a host asking for another host's service) is refused by the signer.
    status, _, refused = plain.http("GET", "/v1/agent/connect/ca/leaf/web")
    assert status == 503 and "not registered on host plain" in str(refused)
    from cryptography.hazmat.primitives.asymmetric import ec

    from supervisor.cluster.authority import certificate_request, request_value
    from supervisor.cluster.layout import Layout

    layout = Layout(etcd_prefix, "dc1")
    client = EtcdClient(etcd_cluster.endpoints)
    try:
        csr = certificate_request(ec.generate_private_key(ec.SECP256R1()), "web")
        client.put(layout.ca_request("plain", "forged"), request_value(csr, "web"))

        def answer() -> bytes | None:
            found = client.range(layout.ca_issued("plain", "forged"))[0]
            return found[0].value if found else None

        wait_until(lambda: answer() is not None, timeout=10, message="the signer's answer")
        assert b"not registered on host plain" in (answer() or b"") and b"CERTIFICATE" not in (
            answer() or b""
        )

        # The key is sealed in etcd: nothing there holds a private key in the clear.
        kvs, _ = client.range_all(etcd_prefix)
    finally:
        client.close()
    assert any("/ca/key/" in kv.key for kv in kvs)
    assert not [kv.key for kv in kvs if b"PRIVATE KEY" in kv.value]
    assert plain.data_dir is not None
    assert "PRIVATE KEY" not in (plain.data_dir / "cluster" / "lease.json").read_text()

    # The signer dies: the other signer host takes over, and answers new requests.
    holder = first if "this host is the CA signer now" in first.log() else second
    other = second if holder is first else first
    holder.kill9()
    plain.http("PUT", "/v1/agent/service/register", {"Name": "api", "Port": 7000})
    wait_until(lambda: "this host is the CA signer now" in other.log(), timeout=TTL + 10, message="failover")
    status, _, leaf = plain.http("GET", "/v1/agent/connect/ca/leaf/api")
    assert status == 200, leaf
    assert verifies(leaf["CertPEM"], roots(other))


def test_a_deposed_signer_cannot_write(etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    from supervisor.cluster.etcd import created_at, op_put
    from supervisor.cluster.layout import Layout

    client = EtcdClient(etcd_cluster.endpoints)
    try:
        layout = Layout(etcd_prefix, "dc1")
        key = layout.ca_signer()
        old_lease, _ = client.grant(2)
        assert client.txn([created_at(key, 0)], [op_put(key, b'{"node":"old"}', old_lease)]).succeeded
        old_fence = client.range(key)[0][0].create_revision
        client.revoke(old_lease)  # (its host died; its lease ran out)
        new_lease, _ = client.grant(2)
        assert client.txn([created_at(key, 0)], [op_put(key, b'{"node":"new"}', new_lease)]).succeeded
        write = [op_put(layout.ca_roots(), b"{}")]
        assert not client.txn([created_at(key, old_fence)], write).succeeded
        assert client.range(layout.ca_roots())[0] == []
        new_fence = client.range(key)[0][0].create_revision
        assert client.txn([created_at(key, new_fence)], write).succeeded
    finally:
        client.close()


@pytest.fixture
def own_etcd() -> Iterator[EtcdCluster]:
    """A cluster of this test's own (it kills members)."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")
    cluster = EtcdCluster(binary)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_etcd_faults_one_member_lost_then_quorum_lost_and_recovered(
    tmp_path: Path, own_etcd: EtcdCluster
) -> None:
    prefix = "/faults/"
    a = make_host(tmp_path, "host-a", own_etcd, prefix, [{"name": "web", "port": 8080}])
    b = make_host(tmp_path, "host-b", own_etcd, prefix, [{"name": "db", "port": 5432}])
    try:
        a.start()
        b.start()
        wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")

        # One member down: no effect.
        own_etcd.kill(own_etcd.members[0])
        a.http("PUT", "/v1/agent/service/register", {"Name": "one-down", "Port": 1})
        wait_until(
            lambda: service_nodes(b, "one-down") == ["host-a"], timeout=10, message="a write with 2 of 3"
        )
        assert b.get("/v1/agent/self")["Cluster"]["State"] == "connected"

        # Quorum lost: every agent keeps serving its last view, and says it is stale.
        own_etcd.kill(own_etcd.members[1])
        wait_until(
            lambda: b.get("/v1/agent/self")["Cluster"]["State"] == "degraded",
            timeout=40,
            interval=0.2,
            message="degraded",
        )
        status, headers, body = b.http("GET", "/v1/health/service/web")
        assert status == 200 and [entry["Node"]["Node"] for entry in body] == ["host-a"]
        assert headers["X-Consul-KnownLeader"] == "false"
        assert int(headers["X-Consul-LastContact"]) > 0
        status, _, reply = b.http(
            "POST", "/v1/connect/intentions", {"SourceName": "x", "DestinationName": "y", "Action": "deny"}
        )
        assert status == 503 and "etcd" in str(reply)
        # A local registration is queued: at once in the agent's own view, in the cluster later.
        a.http("PUT", "/v1/agent/service/register", {"Name": "queued", "Port": 2})
        assert "queued" in a.get("/v1/agent/services")
        assert "degraded" in a.log() and "degraded" in b.log()

        for member in own_etcd.members[:2]:
            own_etcd.restart(member)
        own_etcd.wait_healthy(30)
        wait_until(
            lambda: service_nodes(b, "queued") == ["host-a"],
            timeout=40,
            interval=0.2,
            message="the queued registration",
        )
        wait_until(
            lambda: b.get("/v1/agent/self")["Cluster"]["State"] == "connected",
            timeout=20,
            message="connected again",
        )
        _, headers, _ = b.http("GET", "/v1/health/service/web")
        assert headers["X-Consul-KnownLeader"] == "true"
        assert "reachable again" in b.log()
    finally:
        a.kill_everything()
        b.kill_everything()


def test_a_host_dead_longer_than_reconnect_timeout_is_reaped_and_the_members_command_shows_it(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    a = make_host(
        tmp_path, "host-a", etcd_cluster, etcd_prefix, [{"name": "web", "port": 80}], reconnect_timeout="3s"
    )
    b = make_host(tmp_path, "host-b", etcd_cluster, etcd_prefix, [], reconnect_timeout="3s")
    try:
        a.start()
        b.start()
        wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
        shown = subprocess.run(
            [sys.executable, "-m", "supervisor", "members", "-http-addr", b.address],
            capture_output=True,
            text=True,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert "host-a" in shown.stdout and "alive" in shown.stdout and "cluster: connected" in shown.stdout
        a.kill9()
        wait_until(lambda: serf_status(b, "host-a") == "critical", timeout=TTL + 5, message="host-a failed")
        shown = subprocess.run(
            [sys.executable, "-m", "supervisor", "members", "-http-addr", b.address],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "failed" in shown.stdout
        wait_until(
            lambda: service_nodes(b, "web") == [], timeout=TTL + 15, interval=0.2, message="host-a reaped"
        )
        _, _, nodes = b.http("GET", "/v1/catalog/nodes")
        assert [node["Node"] for node in nodes] == ["host-b"]
        assert "reaped host host-a" in b.log()
    finally:
        a.kill_everything()
        b.kill_everything()


def test_tls_to_etcd_with_client_certificates_and_an_etcd_user(tmp_path: Path) -> None:
    from supervisor.cluster.etcd import Credentials, b64, prefix_end
    from tests.helpers.pki import TestPKI

    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")
    pki = TestPKI(tmp_path / "pki")
    server = pki.issue("server", ips=("127.0.0.1",))
    client = pki.issue("agent")  # no CN: etcd's gateway refuses CN certificates when auth is on
    etcd = EtcdCluster(binary, size=1, tls=(pki.ca_file, server.cert, server.key))
    good = bad = None
    try:
        etcd.start()
        prefix = "/secure/"
        root_dir = f"{prefix}dc1/"
        admin = EtcdClient(etcd.endpoints, Credentials(pki.ca_file, client.cert, client.key))

        def grant(role: str, key: str, *, whole_prefix: bool = False, kind: str = "READWRITE") -> None:
            perm = {"permType": kind, "key": b64(key)}
            if whole_prefix:
                perm["range_end"] = b64(prefix_end(key))
            admin.call("/v3/auth/role/grant", {"name": role, "perm": perm})

        # The README's recipe for one host's role, exactly: its own keys, and read on the rest.
        admin.call("/v3/auth/user/add", {"name": "root", "password": "root-secret"})
        admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        admin.call("/v3/auth/role/add", {"name": "good"})
        for key in ("nodes/good", "alive/good", "tombstones/good"):
            grant("good", root_dir + key)
        for key in ("services/good/", "checks/good/", "ca/csr/good/", "ca/issued/good/"):
            grant("good", root_dir + key, whole_prefix=True)
        grant("good", root_dir, whole_prefix=True, kind="READ")
        admin.call("/v3/auth/user/add", {"name": "agent", "password": "agent-secret"})
        admin.call("/v3/auth/user/grant", {"user": "agent", "role": "good"})
        admin.put(
            f"{root_dir}meta/cluster",
            json.dumps({"schema": 1, "index_base": int(time.time() * 1000) + 10**12}),
        )
        admin.call("/v3/auth/enable", {})
        admin.close()
        secrets_dir = tmp_path / "secrets"
        secrets_dir.mkdir(mode=0o700)
        for name, text in (("good", "agent-secret"), ("bad", "wrong")):
            (secrets_dir / name).write_text(text + "\n")
            (secrets_dir / name).chmod(0o600)
        block = {
            "etcd_endpoints": etcd.endpoints,
            "key_prefix": prefix,
            "ca_file": pki.ca_file,
            "cert_file": client.cert,
            "key_file": client.key,
            "username": "agent",
            "lease_ttl": f"{TTL}s",
        }
        good = AgentProcess(
            tmp_path / "good",
            extra={
                "node_name": "good",
                "cluster": {**block, "password_file": str(secrets_dir / "good")},
                "services": [{"name": "web", "port": 80}],
            },
        )
        bad = AgentProcess(
            tmp_path / "bad",
            extra={"node_name": "bad", "cluster": {**block, "password_file": str(secrets_dir / "bad")}},
        )
        good.start()
        bad.start()
        wait_until(
            lambda: good.get("/v1/agent/self")["Cluster"]["State"] == "connected",
            timeout=15,
            message="joined over TLS",
        )
        root = EtcdClient(
            etcd.endpoints, Credentials(pki.ca_file, client.cert, client.key, "root", "root-secret")
        )
        try:
            wait_until(
                lambda: root.range(f"{prefix}dc1/services/good/web")[0], timeout=10, message="web in etcd"
            )
        finally:
            root.close()
        wait_until(
            lambda: bad.get("/v1/agent/self")["Cluster"]["State"] == "degraded", timeout=15, message="refused"
        )
        error = bad.get("/v1/agent/self")["Cluster"]["Error"]
        assert "refused user 'agent'" in error and "password_file" in error, error
        # Confined to its own keys: shared intentions need an operator's role.
        body = {"SourceName": "web", "DestinationName": "db", "Action": "deny"}
        status, _, reply = good.http("POST", "/v1/connect/intentions", body)
        assert status == 503 and "permission denied" in str(reply), reply
        assert "agent-secret" not in good.log() and "wrong" not in bad.log()  # never logged
        assert bad.process is not None and bad.process.poll() is None  # degraded, not dead
    finally:
        for agent in (good, bad):
            if agent is not None:
                agent.kill_everything()
        etcd.stop()


def test_a_single_host_mesh_moves_to_the_clusters_ca_without_refusing_a_connection(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    """Upgrade in place: a host whose web -> db pair runs on its own CA joins a cluster whose
    CA is another host's; traffic through the pair never stops."""
    from tests.helpers.mesh import Mesh, talk

    kek = tmp_path / "ca.kek"
    kek.write_text(os.urandom(32).hex())
    signer = make_host(
        tmp_path, "signer", etcd_cluster, etcd_prefix, [], ca_signer=True, ca_key_file=str(kek)
    )
    mesh = Mesh(tmp_path / "mesh", extra={"node_name": "mesh"})
    counts = {"ok": 0, "failed": 0}
    failures: list[float] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            ok = talk(mesh.upstream_port, timeout=5) == b"ping|db"
            counts["ok" if ok else "failed"] += 1
            if not ok:
                failures.append(time.time())
            time.sleep(0.01)

    talker = threading.Thread(target=traffic, daemon=True)
    try:
        signer.start()
        cluster_root = wait_until(
            lambda: (
                signer.get("/v1/agent/connect/ca/roots").get("ActiveRootID")
                if "published this host's CA" in signer.log()
                else None
            ),
            timeout=15,
            message="the cluster's CA",
        )
        mesh.start()
        local_root = mesh.agent.get("/v1/agent/connect/ca/roots")["ActiveRootID"]
        assert local_root != cluster_root
        talker.start()
        mesh.agent.signal(15)  # (proxies outlive the agent: they are adopted by the next one)
        mesh.agent.wait_exit()
        mesh.agent.write("20-cluster.json", {"cluster": cluster_block(etcd_cluster, etcd_prefix)})
        mesh.agent.start()

        def switched() -> bool:
            roots = mesh.agent.get("/v1/agent/connect/ca/roots")
            if roots["ActiveRootID"] != cluster_root:
                return False
            leaf = mesh.agent.get("/v1/agent/connect/ca/leaf/db")
            return verifies(leaf["CertPEM"], roots)

        wait_until(switched, timeout=30, interval=0.2, message="the mesh host on the cluster's CA")
        both = {root["ID"] for root in mesh.agent.get("/v1/agent/connect/ca/roots")["Roots"]}
        assert {local_root, cluster_root} <= both  # the old root stays trusted while its leaves live
        before = counts["ok"]
        wait_until(lambda: counts["ok"] > before + 50, timeout=30, message="traffic on the new certificates")
        stop.set()
        talker.join(10)
        logs = {proxy: mesh.proxy_log(proxy)[-3000:] for proxy in ("web-proxy", "db-proxy")}
        assert counts["failed"] == 0, f"{counts} {failures} {logs}"
        assert "adopted" in mesh.agent.current_log()
    finally:
        stop.set()
        mesh.close()
        signer.kill_everything()


def test_a_root_rotation_on_the_signer_reaches_every_host(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    from tests.test_ca import operator_root

    kek = tmp_path / "ca.kek"
    kek.write_text(os.urandom(32).hex())
    signer = make_host(
        tmp_path, "signer", etcd_cluster, etcd_prefix, [], ca_signer=True, ca_key_file=str(kek)
    )
    plain = make_host(tmp_path, "plain", etcd_cluster, etcd_prefix, [{"name": "db", "port": 5432}])
    try:
        signer.start()
        plain.start()
        status, _, leaf = plain.http("GET", "/v1/agent/connect/ca/leaf/db")
        assert status == 200, leaf
        first = plain.get("/v1/agent/connect/ca/roots")["ActiveRootID"]
        key, cert = operator_root()
        signer.signal(15)
        signer.wait_exit()
        signer.write("30-ca.json", {"connect": {"ca_config": {"private_key": key, "root_cert": cert}}})
        signer.start()
        wait_until(
            lambda: plain.get("/v1/agent/connect/ca/roots")["ActiveRootID"] != first,
            timeout=20,
            message="rotated",
        )
        roots = plain.get("/v1/agent/connect/ca/roots")
        assert {root["ID"] for root in roots["Roots"]} >= {
            first,
            roots["ActiveRootID"],
        }  # the old one still trusted

        def reissued() -> bool:
            leaf = plain.get("/v1/agent/connect/ca/leaf/db")
            return verifies(leaf["CertPEM"], plain.get("/v1/agent/connect/ca/roots"))

        wait_until(reissued, timeout=20, message="db's leaf from the new root")
        chain = plain.get("/v1/agent/connect/ca/leaf/db")["CertPEM"]
        assert chain.count("BEGIN CERTIFICATE") == 2  # with the cross-signed root for old-root peers
    finally:
        signer.kill_everything()
        plain.kill_everything()


def test_a_watch_cancelled_by_compaction_lists_again_without_moving_unchanged_answers(
    tmp_path: Path, own_etcd: EtcdCluster
) -> None:
    prefix = "/compaction/"
    a = make_host(
        tmp_path, "host-a", own_etcd, prefix, [{"name": "web", "port": 80}, {"name": "api", "port": 81}]
    )
    # host-b talks to one member only: cut off when it goes, compacted past when it returns.
    only = own_etcd.members[2]
    b = AgentProcess(
        tmp_path / "host-b",
        extra={
            "node_name": "host-b",
            "cluster": {"etcd_endpoints": [only.client_url], "key_prefix": prefix, "lease_ttl": "10s"},
        },
    )
    try:
        a.start()
        b.start()
        wait_until(lambda: service_nodes(b, "api") == ["host-a"], timeout=10, message="api on host-b")

        def settled() -> str | None:
            """api's index once both hosts agree on it (host-a's start-up writes are done)."""
            seen = {host.http("GET", "/v1/health/service/api")[1]["X-Consul-Index"] for host in (a, b)}
            return seen.pop() if len(seen) == 1 else None

        first = wait_until(settled, timeout=10, message="a settled index")
        time.sleep(0.5)
        before = wait_until(settled, timeout=10, message="a settled index")
        assert before == first, "host-a was still writing its records"
        own_etcd.kill(only)
        for number in range(5):
            a.http("PUT", "/v1/agent/service/register", {"Name": f"churn-{number}", "Port": 1000 + number})
        client = EtcdClient([m.client_url for m in own_etcd.members[:2]])
        try:
            wait_until(
                lambda: client.range(f"{prefix}dc1/services/host-a/churn-4")[0], timeout=10, message="churn"
            )
            latest = client.put(f"{prefix}unrelated", "x")
            client.call("/v3/kv/compaction", {"revision": str(latest), "physical": True})
        finally:
            client.close()
        own_etcd.restart(only)
        wait_until(
            lambda: service_nodes(b, "churn-4") == ["host-a"], timeout=30, interval=0.2, message="re-listed"
        )
        assert "listing the cluster again" in b.log()
        _, after, _ = b.http("GET", "/v1/health/service/api")
        assert after["X-Consul-Index"] == before  # api did not change: nor did its index
        assert a.http("GET", "/v1/health/service/api")[1]["X-Consul-Index"] == before
    finally:
        a.kill_everything()
        b.kill_everything()


def test_an_etcd_out_of_space_alarm_makes_the_agent_degraded_not_dead(tmp_path: Path) -> None:
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary")
    etcd = EtcdCluster(binary, size=1, extra=("--quota-backend-bytes", str(256 * 1024)))
    agent = None
    try:
        etcd.start()
        client = EtcdClient(etcd.endpoints)
        try:
            with pytest.raises(EtcdError, match="space"):
                for number in range(10_000):
                    client.put(f"/filler/{number}", b"x" * 8000)
        finally:
            client.close()
        agent = AgentProcess(
            tmp_path / "agent",
            extra={"node_name": "full", "cluster": {"etcd_endpoints": etcd.endpoints, "lease_ttl": "2s"}},
        )
        agent.start()
        agent.http("PUT", "/v1/agent/service/register", {"Name": "web", "Port": 80})
        wait_until(
            lambda: agent.get("/v1/agent/self")["Cluster"]["State"] == "degraded",
            timeout=15,
            message="degraded",
        )
        assert "space" in agent.get("/v1/agent/self")["Cluster"]["Error"]
        assert "web" in agent.get("/v1/agent/services")  # its own view goes on
        assert agent.process is not None and agent.process.poll() is None
    finally:
        if agent is not None:
            agent.kill_everything()
        etcd.stop()


def test_anti_entropy_removes_what_the_agent_does_not_know_under_its_name(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    from supervisor.cluster.records import encode

    a = make_host(tmp_path, "host-a", etcd_cluster, etcd_prefix, [{"name": "web", "port": 80}])
    b = make_host(tmp_path, "host-b", etcd_cluster, etcd_prefix, [])
    client = EtcdClient(etcd_cluster.endpoints)
    try:
        a.start()
        b.start()
        wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
        a.signal(15)
        a.wait_exit()
        ghost = {"Service": {"Kind": "", "ID": "ghost", "Service": "ghost", "Port": 1}, "ConnectTarget": None}
        client.put(f"{etcd_prefix}dc1/services/host-a/ghost", encode(ghost))
        wait_until(
            lambda: service_nodes(b, "ghost") == ["host-a"], timeout=5, message="the forged record seen"
        )
        a.start()  # its join's full sync: the agent is authoritative for its own name
        wait_until(lambda: service_nodes(b, "ghost") == [], timeout=10, message="the forged record removed")
        assert service_nodes(b, "web") == ["host-a"]
    finally:
        client.close()
        a.kill_everything()
        b.kill_everything()


def test_a_second_agent_with_a_live_agents_node_name_is_refused(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    first = make_host(tmp_path / "1", "same-name", etcd_cluster, etcd_prefix, [{"name": "web", "port": 80}])
    second = make_host(tmp_path / "2", "same-name", etcd_cluster, etcd_prefix, [{"name": "evil", "port": 81}])
    try:
        first.start()
        wait_until(
            lambda: first.get("/v1/agent/self")["Cluster"]["State"] == "connected",
            timeout=10,
            message="first",
        )
        second.start()
        wait_until(
            lambda: second.get("/v1/agent/self")["Cluster"]["State"] == "degraded",
            timeout=10,
            message="refused",
        )
        assert "is taken by a live agent" in second.get("/v1/agent/self")["Cluster"]["Error"]
        time.sleep(1.5)  # (it keeps trying; none of its records may land meanwhile)
        assert service_nodes(first, "evil") == [] and service_nodes(first, "web") == ["same-name"]
    finally:
        first.kill_everything()
        second.kill_everything()


def test_dns_on_one_host_answers_for_instances_on_another(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    import dns.rdatatype
    import dns.resolver

    a = AgentProcess(
        tmp_path / "host-a",
        extra={
            "node_name": "host-a",
            "bind_addr": "127.0.0.2",
            "cluster": cluster_block(etcd_cluster, etcd_prefix),
            "services": [{"name": "web", "port": 8080}],
        },
    )
    b = AgentProcess(
        tmp_path / "host-b",
        dns=True,
        extra={"node_name": "host-b", "cluster": cluster_block(etcd_cluster, etcd_prefix)},
    )
    try:
        a.start()
        b.start()
        wait_until(lambda: service_nodes(b, "web") == ["host-a"], timeout=10, message="web on host-b")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = b.dns_port
        answer = resolver.resolve("web.service.consul", "SRV", lifetime=5)
        assert [(r.port, str(r.target)) for r in answer] == [(8080, "host-a.node.dc1.consul.")]
        addresses = resolver.resolve("web.service.consul", "A", lifetime=5)
        assert [r.address for r in addresses] == ["127.0.0.2"]  # host-a's address, from the cluster
        assert answer.rrset is not None and answer.rrset.rdtype == dns.rdatatype.SRV
    finally:
        a.kill_everything()
        b.kill_everything()


def test_an_alive_key_deleted_under_a_live_lease_is_put_back(
    hosts: tuple[AgentProcess, AgentProcess], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    a, b = hosts
    wait_until(lambda: serf_status(b, "host-a") == "passing", timeout=10, message="host-a alive")
    client = EtcdClient(etcd_cluster.endpoints)
    try:
        client.delete(f"{etcd_prefix}dc1/alive/host-a")
        wait_until(
            lambda: client.range(f"{etcd_prefix}dc1/alive/host-a")[0],
            timeout=10,
            message="alive/ back in etcd",
        )
    finally:
        client.close()
    wait_until(lambda: serf_status(b, "host-a") == "passing", timeout=10, message="host-a alive again")
    assert "had been deleted under a live lease" in a.log()
