"""Intentions and prepared queries shared by the cluster, in etcd.

    intentions/by-id/<id>                  the intention
    intentions/by-pair/<source>/<dest>     its ID: one intention per pair
    queries/by-id/<id>                     the prepared query
    queries/by-name/<name>                 its ID: one query per name (templates included)

Uniqueness is etcd's, not ours: a create puts both keys in one transaction guarded by
"the pair (or name) key does not exist", so of two agents creating ``web => db`` at the
same moment exactly one wins and the other gets Consul's duplicate error. Changes compare
the record's revision as this agent last saw it, so two concurrent edits cannot both land.

Reads come from the mirror (``read_*``); writes are blocking calls for a worker thread.
"""

from __future__ import annotations

import uuid
from typing import Any

from supervisor.catalog.errors import Conflict, NotFound
from supervisor.catalog.intentions import (
    Intention,
    IntentionFields,
    intention_document,
    intention_from_document,
)
from supervisor.catalog.queries import PreparedQuery, QueryDefinition
from supervisor.cluster.etcd import (
    EtcdClient,
    KeyValue,
    created_at,
    holds,
    modified_at,
    op_delete,
    op_put,
    op_range,
)
from supervisor.cluster.layout import Layout
from supervisor.cluster.records import BadRecord, decode, encode


def _timestamp() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- reading the mirror -----------------------------------------------------------------------


def read_intentions(kvs: dict[str, KeyValue], layout: Layout, base: int) -> dict[str, Intention]:
    found: dict[str, Intention] = {}
    prefix = layout.intention("")
    for key, kv in kvs.items():
        if not key.startswith(prefix):
            continue
        try:
            document = decode(kv.value)
            intention = intention_from_document(
                {**document, "CreateIndex": base + kv.create_revision, "ModifyIndex": base + kv.mod_revision}
            )
        except (BadRecord, KeyError, TypeError, ValueError, AttributeError):
            continue  # (not what an agent writes; the catalog's reader logs such keys)
        # Only a record that is what its keys say: its own ID, and its pair pointing at it
        # (a record written past the transactions could otherwise shadow a real one).
        pair = kvs.get(layout.intention_pair(intention.source_name, intention.destination_name))
        if intention.id != key[len(prefix) :] or pair is None or pair.value != intention.id.encode():
            continue
        found[intention.id] = intention
    return found


def read_queries(kvs: dict[str, KeyValue], layout: Layout, base: int) -> dict[str, PreparedQuery]:
    found: dict[str, PreparedQuery] = {}
    prefix = layout.query("")
    for key, kv in kvs.items():
        if not key.startswith(prefix):
            continue
        try:
            document = decode(kv.value)
            definition = QueryDefinition.from_fields(document["Definition"])
        except (BadRecord, KeyError, TypeError, ValueError, AttributeError):
            continue
        query_id = key[len(prefix) :]
        found[query_id] = PreparedQuery(
            query_id, definition, base + kv.create_revision, base + kv.mod_revision
        )
    return found


# -- writing -----------------------------------------------------------------------------------


class DocumentWriter:
    """Creates, changes and deletes intentions and queries in etcd; each call returns the
    revision of its write (raises ``Conflict``/``NotFound``, or ``EtcdError``)."""

    def __init__(self, client: EtcdClient, layout: Layout) -> None:
        self.client = client
        self.layout = layout

    # intentions

    def create_intention(
        self, fields: IntentionFields, intention_id: str = "", created: str = ""
    ) -> tuple[str, int]:
        intention_id = intention_id or str(uuid.uuid4())
        now = _timestamp()
        intention = Intention(
            id=intention_id,
            source_name=fields.source_name,
            destination_name=fields.destination_name,
            action=fields.action,
            description=fields.description,
            meta=dict(fields.meta),
            created_at=created or now,
            updated_at=now,
        )
        pair = self.layout.intention_pair(fields.source_name, fields.destination_name)
        record = self.layout.intention(intention_id)
        result = self.client.txn(
            [created_at(pair, 0), created_at(record, 0)],
            [op_put(pair, intention_id), op_put(record, _intention_value(intention))],
            [op_range(pair)],
        )
        if not result.succeeded:
            held = result.ranged(0)
            holder = held[0].value.decode() if held else intention_id
            raise Conflict(f"duplicate intention found: {intention} (ID {holder})")
        return intention_id, result.revision

    def update_intention(self, current: Intention, seen: int, fields: IntentionFields) -> int:
        """``seen``: the record's revision the caller read (its ModifyIndex minus the base)."""
        record = self.layout.intention(current.id)
        old_pair = self.layout.intention_pair(current.source_name, current.destination_name)
        new_pair = self.layout.intention_pair(fields.source_name, fields.destination_name)
        updated = Intention(
            id=current.id,
            source_name=fields.source_name,
            destination_name=fields.destination_name,
            action=fields.action,
            description=fields.description,
            meta=dict(fields.meta),
            created_at=current.created_at,
            updated_at=_timestamp(),
        )
        compare = [modified_at(record, seen)]
        success = [op_put(record, _intention_value(updated))]
        if new_pair != old_pair:
            compare.append(created_at(new_pair, 0))
            success += [op_delete(old_pair), op_put(new_pair, current.id)]
        result = self.client.txn(compare, success, [op_range(record), op_range(new_pair)])
        if not result.succeeded:
            if not result.ranged(0):
                raise NotFound(f"Intention not found: {current.id}")
            holder = result.ranged(1)
            if new_pair != old_pair and holder:
                raise Conflict(f"duplicate intention found: {updated} (ID {holder[0].value.decode()})")
            raise Conflict(f"intention {current.id} was changed on another agent meanwhile; read it again")
        return result.revision

    def delete_intention(self, current: Intention, seen: int) -> int:
        record = self.layout.intention(current.id)
        pair = self.layout.intention_pair(current.source_name, current.destination_name)
        result = self.client.txn(
            [modified_at(record, seen), holds(pair, current.id)],
            [op_delete(record), op_delete(pair)],
            [op_range(record)],
        )
        if not result.succeeded:
            if not result.ranged(0):
                raise NotFound(f"Intention not found: {current.id}")
            raise Conflict(f"intention {current.id} was changed on another agent meanwhile; read it again")
        return result.revision

    # prepared queries

    def create_query(self, definition: QueryDefinition, query_id: str = "") -> tuple[str, int]:
        query_id = query_id or str(uuid.uuid4())
        name = self.layout.query_name(definition.name)
        record = self.layout.query(query_id)
        result = self.client.txn(
            [created_at(name, 0), created_at(record, 0)],
            [op_put(name, query_id), op_put(record, _query_value(definition))],
            [op_range(name)],
        )
        if not result.succeeded:
            held = result.ranged(0)
            holder = held[0].value.decode() if held else query_id
            if definition.name:
                raise Conflict(f"name {definition.name!r} aliases an existing query name (ID {holder})")
            raise Conflict("a query template with an empty name already exists")
        return query_id, result.revision

    def update_query(self, current: PreparedQuery, seen: int, definition: QueryDefinition) -> int:
        record = self.layout.query(current.id)
        old_name = self.layout.query_name(current.definition.name)
        new_name = self.layout.query_name(definition.name)
        compare = [modified_at(record, seen)]
        success = [op_put(record, _query_value(definition))]
        if new_name != old_name:
            compare.append(created_at(new_name, 0))
            success += [op_delete(old_name), op_put(new_name, current.id)]
        result = self.client.txn(compare, success, [op_range(record), op_range(new_name)])
        if not result.succeeded:
            if not result.ranged(0):
                raise NotFound(f"Query not found: {current.id}")
            if new_name != old_name and result.ranged(1):
                raise Conflict(f"name {definition.name!r} aliases an existing query name")
            raise Conflict(f"query {current.id} was changed on another agent meanwhile; read it again")
        return result.revision

    def delete_query(self, current: PreparedQuery, seen: int) -> int:
        record = self.layout.query(current.id)
        name = self.layout.query_name(current.definition.name)
        result = self.client.txn(
            [modified_at(record, seen)], [op_delete(record), op_delete(name)], [op_range(record)]
        )
        if not result.succeeded:
            if not result.ranged(0):
                raise NotFound(f"Query not found: {current.id}")
            raise Conflict(f"query {current.id} was changed on another agent meanwhile; read it again")
        return result.revision


def _intention_value(intention: Intention) -> bytes:
    document: dict[str, Any] = intention_document(intention)
    document.pop("CreateIndex", None)
    document.pop("ModifyIndex", None)
    return encode(document)


def _query_value(definition: QueryDefinition) -> bytes:
    return encode({"Definition": definition.to_fields()})
