"""The etcd gateway client (``supervisor/cluster/etcd.py``) against a real 3-member etcd:
ranges in pages, txns with create-if-absent, leases that expire, watches that see every
event and report compaction, and failover past a dead endpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from supervisor.cluster.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdRejected,
    EtcdUnavailable,
    Event,
    created_at,
    op_put,
    op_range,
)
from supervisor.cluster.etcdwatch import Watch
from tests.conftest import free_port
from tests.helpers.etcd import EtcdCluster
from tests.helpers.processes import wait_until


@pytest.fixture
def connect(etcd_cluster: EtcdCluster) -> Iterator[Callable[..., EtcdClient]]:
    made: list[EtcdClient] = []

    def make(endpoints: list[str] | None = None, **options: Any) -> EtcdClient:
        client = EtcdClient(endpoints or etcd_cluster.endpoints, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_put_range_in_pages_and_delete(
    connect: Callable[..., EtcdClient], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    client = connect()
    for number in range(25):
        client.put(f"{etcd_prefix}k/{number:03d}", f"v{number}")
    client.put(f"{etcd_prefix}other", "x")
    kvs, revision = client.range_all(f"{etcd_prefix}k/", page=7)
    assert [kv.value for kv in kvs] == [f"v{n}".encode() for n in range(25)]
    assert revision >= max(kv.mod_revision for kv in kvs)
    client.delete(f"{etcd_prefix}k/", prefix=True)
    assert client.range(f"{etcd_prefix}", prefix=True)[0][0].key == f"{etcd_prefix}other"


def test_create_if_absent_lets_exactly_one_writer_win(
    connect: Callable[..., EtcdClient], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    key = f"{etcd_prefix}by-pair/web/db"
    wins: list[bool] = []

    def create(value: str) -> None:
        client = connect()
        result = client.txn([created_at(key, 0)], [op_put(key, value)], [op_range(key)])
        wins.append(result.succeeded)

    threads = [threading.Thread(target=create, args=(f"writer-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(wins) == [False] * 5 + [True]


def test_a_lease_keeps_its_key_until_it_is_no_longer_renewed(
    connect: Callable[..., EtcdClient], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    client = connect()
    lease, ttl = client.grant(2)
    assert ttl == 2
    client.put(f"{etcd_prefix}alive", "yes", lease)
    for _ in range(4):
        time.sleep(0.5)
        assert client.keepalive(lease) == 2
    assert client.range(f"{etcd_prefix}alive")[0]
    wait_until(lambda: not client.range(f"{etcd_prefix}alive")[0], timeout=6, message="the leased key to go")
    assert client.keepalive(lease) == 0  # expired: etcd leaves the TTL out


def test_a_watch_sees_puts_and_deletes_in_order(
    connect: Callable[..., EtcdClient], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    client = connect()
    start = client.put(f"{etcd_prefix}before", "0") + 1
    watch = Watch(client, etcd_prefix, start)
    seen: list[Event] = []

    def follow() -> None:
        try:
            for message in watch.messages():
                seen.extend(message.events)
        except EtcdUnavailable:
            pass  # closed

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    client.put(f"{etcd_prefix}a", "1")
    client.put(f"{etcd_prefix}a", "2")
    client.delete(f"{etcd_prefix}a")
    wait_until(lambda: len(seen) == 3, timeout=5, message="three events")
    watch.close()
    thread.join(5)
    assert [(e.kind, e.kv.value) for e in seen] == [("put", b"1"), ("put", b"2"), ("delete", b"")]
    assert not thread.is_alive()


def test_a_watch_from_a_compacted_revision_says_so(
    connect: Callable[..., EtcdClient], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    client = connect()
    old = client.put(f"{etcd_prefix}x", "1")
    latest = client.put(f"{etcd_prefix}x", "2")
    client.call("/v3/kv/compaction", {"revision": str(latest), "physical": True})
    with pytest.raises(EtcdCompacted) as caught:
        for _ in Watch(client, etcd_prefix, old).messages():
            pass
    assert caught.value.compact_revision >= latest


def test_a_dead_first_endpoint_is_passed_over_and_none_alive_is_a_clear_error(
    connect: Callable[..., EtcdClient], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = connect([dead, *etcd_cluster.endpoints], timeout=2)
    client.put(f"{etcd_prefix}k", "v")
    assert client.range(f"{etcd_prefix}k")[0][0].value == b"v"
    nobody = connect([dead], timeout=1)
    with pytest.raises(EtcdUnavailable, match=dead.replace(".", r"\.")):
        nobody.range("/x")


def test_a_request_too_large_is_refused_with_etcds_reason(
    connect: Callable[..., EtcdClient], etcd_cluster: EtcdCluster, etcd_prefix: str
) -> None:
    client = connect()
    with pytest.raises(EtcdRejected, match="too large"):
        client.put(f"{etcd_prefix}big", b"x" * (1600 * 1024))
