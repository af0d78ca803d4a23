"""Leaf requests to the cluster's CA (``supervisor/cluster/leaves.py``), without etcd: a
request waits until etcd has the host's registration of the service (the signer refuses a
request it sees before the registration), callers asking at once share one request, and a
service not registered on the host is refused at once."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from supervisor.catalog.errors import Unavailable
from supervisor.cluster.etcd import KeyValue
from supervisor.cluster.layout import Layout
from supervisor.cluster.leaves import ClusterLeaves
from supervisor.cluster.records import encode
from supervisor.cluster.signer import CAContext

LAYOUT = Layout("/t/", "dc1")
DB = LAYOUT.service("me", "db-1")
DB_RECORD = encode({"Service": {"Service": "db", "Port": 5432}, "ConnectTarget": None})


class RecordingClient:
    """Stands in for etcd's client: records the CSRs put."""

    def __init__(self) -> None:
        self.puts: list[str] = []
        self.lock = threading.Lock()

    def put(self, key: str, _value: bytes, _lease: int = 0) -> None:
        with self.lock:
            self.puts.append(key)


class SettledAuthority:
    """The cluster's CA as far as asking for leaves goes: there is one, and no switch is on."""

    cluster = object()
    active_id = "root-1"

    def local_in_use(self) -> bool:
        return False


def make(mirror: dict[str, KeyValue], own: dict[str, bytes]) -> tuple[ClusterLeaves, RecordingClient]:
    client = RecordingClient()
    context = CAContext(
        client,  # type: ignore[arg-type]
        LAYOUT,
        "me",
        lambda: 7,
        lambda: mirror,
        lambda: 1000,
        lambda: own,
    )
    leaves = ClusterLeaves(context, SettledAuthority(), None, "dc1", lambda: None)  # type: ignore[arg-type]
    return leaves, client


def test_a_leaf_request_waits_for_the_registration_and_is_shared_by_callers_at_once() -> None:
    async def scenario() -> dict[str, Any]:
        mirror: dict[str, KeyValue] = {}
        leaves, client = make(mirror, {DB: DB_RECORD})
        waiters = [asyncio.create_task(leaves.ensure("db", timeout=0.3)) for _ in range(3)]
        await asyncio.sleep(0.1)
        before = list(client.puts)  # registered here, not in etcd yet: nothing asked
        mirror[DB] = KeyValue(DB, DB_RECORD, 5, 5, 0)
        leaves.refresh()  # (the watch brought it)
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        return {"before": before, "after": list(client.puts), "outcomes": outcomes}

    seen = asyncio.run(scenario())
    assert seen["before"] == []
    assert len(seen["after"]) == 1 and seen["after"][0].startswith(LAYOUT.ca_request("me", ""))
    # (no signer here: each caller is told so, none asked again)
    assert all(isinstance(o, Unavailable) and "no CA signer answered" in str(o) for o in seen["outcomes"])


def test_a_leaf_for_a_service_not_registered_here_is_refused_at_once() -> None:
    async def scenario() -> list[str]:
        leaves, client = make({}, {DB: DB_RECORD})
        with pytest.raises(Unavailable, match="not registered on host me"):
            await asyncio.wait_for(leaves.ensure("web"), 1.0)
        return client.puts

    assert asyncio.run(scenario()) == []
