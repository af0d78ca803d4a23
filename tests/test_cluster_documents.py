"""Intentions and prepared queries in a real etcd (``supervisor/cluster/documents.py``):
a change or a delete that lost a race to another agent's change is made on top of it (the
last writer wins, as in Consul), while a unique key held by another record still refuses."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from supervisor.catalog.errors import Conflict, NotFound
from supervisor.catalog.intentions import Action, Intention, IntentionFields
from supervisor.catalog.queries import QueryDefinition
from supervisor.cluster.documents import DocumentWriter, read_intentions, read_queries
from supervisor.cluster.etcd import EtcdClient
from supervisor.cluster.layout import Layout
from tests.helpers.etcd import EtcdCluster


@pytest.fixture
def writer(etcd_cluster: EtcdCluster, etcd_prefix: str) -> Iterator[DocumentWriter]:
    client = EtcdClient(etcd_cluster.endpoints)
    try:
        yield DocumentWriter(client, Layout(etcd_prefix, "dc1"))
    finally:
        client.close()


def intentions(writer: DocumentWriter) -> dict[str, Intention]:
    kvs, _ = writer.client.range_all(writer.layout.root)
    return read_intentions({kv.key: kv for kv in kvs}, writer.layout, 0)


def test_concurrent_changes_to_an_intention_both_land_and_the_last_one_wins(writer: DocumentWriter) -> None:
    intention_id, created = writer.create_intention(IntentionFields("web", "db", Action.ALLOW))
    first = intentions(writer)[intention_id]

    # Two agents read it at revision `created` and change it: the second re-reads and wins.
    writer.update_intention(first, created, IntentionFields("web", "db", Action.DENY, "one"))
    writer.update_intention(first, created, IntentionFields("web", "db", Action.ALLOW, "two"))
    assert intentions(writer)[intention_id].description == "two"

    # One moved it to web => cache meanwhile; the other's move to web => api deletes that key.
    writer.update_intention(first, created, IntentionFields("web", "cache", Action.ALLOW))
    writer.update_intention(first, created, IntentionFields("web", "api", Action.DENY))
    [found] = intentions(writer).values()
    assert (found.destination_name, found.action) == ("api", Action.DENY)
    assert not writer.client.range(writer.layout.intention_pair("web", "cache"))[0]
    assert not writer.client.range(writer.layout.intention_pair("web", "db"))[0]

    # A pair another intention holds still refuses, even after a lost race.
    other_id, _ = writer.create_intention(IntentionFields("batch", "db", Action.ALLOW))
    with pytest.raises(Conflict, match="duplicate intention found"):
        writer.update_intention(first, created, IntentionFields("batch", "db", Action.ALLOW))
    assert set(intentions(writer)) == {intention_id, other_id}

    # A delete by an agent that saw an older revision deletes it all the same.
    writer.delete_intention(first, created)
    assert set(intentions(writer)) == {other_id}
    assert not writer.client.range(writer.layout.intention_pair("web", "api"))[0]
    with pytest.raises(NotFound):
        writer.delete_intention(first, created)


def test_a_record_naming_another_records_pair_cannot_take_its_key_away(writer: DocumentWriter) -> None:
    mine, seen = writer.create_intention(IntentionFields("web", "db", Action.ALLOW))
    theirs, _ = writer.create_intention(IntentionFields("api", "db", Action.ALLOW))
    current = intentions(writer)[mine]
    record = writer.layout.intention(mine)
    stored = json.loads(writer.client.range(record)[0][0].value)
    writer.client.put(record, json.dumps({**stored, "SourceName": "api"}))  # written past the agents

    with pytest.raises(Conflict):
        writer.update_intention(current, seen, IntentionFields("web", "cache", Action.DENY))
    [pair] = writer.client.range(writer.layout.intention_pair("api", "db"))[0]
    assert pair.value == theirs.encode()  # still the other intention's
    assert theirs in intentions(writer)


def test_concurrent_changes_to_a_prepared_query_both_land(writer: DocumentWriter) -> None:
    query_id, created = writer.create_query(
        QueryDefinition.from_fields({"name": "db", "service": {"service": "db"}})
    )
    kvs, _ = writer.client.range_all(writer.layout.root)
    current = read_queries({kv.key: kv for kv in kvs}, writer.layout, 0)[query_id]
    writer.update_query(
        current, created, QueryDefinition.from_fields({"name": "db-a", "service": {"service": "a"}})
    )
    writer.update_query(
        current, created, QueryDefinition.from_fields({"name": "db-b", "service": {"service": "b"}})
    )
    kvs, _ = writer.client.range_all(writer.layout.root)
    [found] = read_queries({kv.key: kv for kv in kvs}, writer.layout, 0).values()
    assert found.definition.name == "db-b"
    names = sorted(kv.key.rsplit("/", 1)[1] for kv in kvs if "/queries/by-name/" in kv.key)
    assert names == ["db-b"]
    writer.delete_query(current, created)
    kvs, _ = writer.client.range_all(writer.layout.root)
    assert not read_queries({kv.key: kv for kv in kvs}, writer.layout, 0)
    assert not [kv for kv in kvs if "/queries/" in kv.key]
