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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor.catalog.errors import Conflict, NotFound
from supervisor.catalog.intentions import (
    Intention,
    IntentionFields,
    intention_document,
    intention_from_document,
)
from supervisor.catalog.queries import PreparedQuery, QueryDefinition, parse_query
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
from supervisor.errors import ConfigError


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
        except (BadRecord, KeyError, TypeError, ValueError, AttributeError, OverflowError):
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
            # Checked as the API checks a definition (types, regexps that cannot backtrack
            # for ever): a value written past the agents runs on every agent's API loop.
            definition = parse_query(document["Definition"], key)
        except (BadRecord, ConfigError, KeyError, TypeError, ValueError, AttributeError, OverflowError):
            continue
        query_id = key[len(prefix) :]
        name = kvs.get(layout.query_name(definition.name))
        if name is None or name.value != query_id.encode():
            continue  # (as for intentions: a record its name key does not point at)
        found[query_id] = PreparedQuery(
            query_id, definition, base + kv.create_revision, base + kv.mod_revision
        )
    return found


# -- writing -----------------------------------------------------------------------------------


_ATTEMPTS = 5  # writes that lose a race re-read and try again, this many times in all
UniqueOf = Callable[[bytes], "str | None"]  # a stored record's unique key (None: unreadable)


@dataclass(frozen=True)
class _Outcome:
    """What a guarded write did: written at ``revision``, or not because the record is gone,
    or because ``holder`` (an ID) has the pair or name, or because it changed meanwhile."""

    revision: int = 0
    gone: bool = False
    holder: str | None = None


class DocumentWriter:
    """Creates, changes and deletes intentions and queries in etcd; each call returns the
    revision of its write (raises ``Conflict``/``NotFound``, or ``EtcdError``). A record
    and its unique key (an intention's pair, a query's name) always change together."""

    def __init__(self, client: EtcdClient, layout: Layout) -> None:
        self.client = client
        self.layout = layout

    # the three guarded writes, the same for both kinds of record

    def _create(self, record: str, unique: str, record_id: str, value: bytes) -> _Outcome:
        result = self.client.txn(
            [created_at(unique, 0), created_at(record, 0)],
            [op_put(unique, record_id), op_put(record, value)],
            [op_range(unique)],
        )
        if result.succeeded:
            return _Outcome(result.revision)
        held = result.ranged(0)
        return _Outcome(holder=held[0].value.decode() if held else record_id)

    def _update(
        self, record: str, seen: int, value: bytes, old: str, new: str, record_id: str, unique_of: UniqueOf
    ) -> _Outcome:
        """``seen``: the record's revision the caller read (its ModifyIndex minus the base);
        ``old``: its unique key then. A change replaces the whole record, so one that lost a
        race to another agent's change is made again on top of it: the last writer wins, as
        in Consul, and neither gets an error. Only a unique key held by another record refuses."""
        for _ in range(_ATTEMPTS):
            compare = [modified_at(record, seen)]
            success = [op_put(record, value)]
            if new != old:
                # (the old key must still be this record's: a value that names another
                # record's pair or name must not delete it)
                compare += [created_at(new, 0), holds(old, record_id)]
                success += [op_delete(old), op_put(new, record_id)]
            result = self.client.txn(compare, success, [op_range(record), op_range(new)])
            if result.succeeded:
                return _Outcome(result.revision)
            found = result.ranged(0)
            if not found:
                return _Outcome(gone=True)
            holder = result.ranged(1)
            if new != old and holder and holder[0].value != record_id.encode():
                return _Outcome(holder=holder[0].value.decode())
            unique = unique_of(found[0].value)
            if unique is None:
                break  # (not what an agent writes: left to the operator)
            seen, old = found[0].mod_revision, unique
        return _Outcome()

    def _delete(self, record: str, seen: int, unique: str, record_id: str, unique_of: UniqueOf) -> _Outcome:
        """Deletes the record even if another agent changed it since ``seen`` (as Consul's
        delete by ID does), with whichever unique key it holds by then."""
        for _ in range(_ATTEMPTS):
            result = self.client.txn(
                [modified_at(record, seen), holds(unique, record_id)],
                [op_delete(record), op_delete(unique)],
                [op_range(record)],
            )
            if result.succeeded:
                return _Outcome(result.revision)
            found = result.ranged(0)
            if not found:
                return _Outcome(gone=True)
            now_held = unique_of(found[0].value)
            if now_held is None:
                break
            seen, unique = found[0].mod_revision, now_held
        return _Outcome()

    def _intention_pair_of(self, value: bytes) -> str | None:
        try:
            document = decode(value)
            return self.layout.intention_pair(str(document["SourceName"]), str(document["DestinationName"]))
        except (BadRecord, KeyError, TypeError, AttributeError):
            return None

    def _query_name_of(self, value: bytes) -> str | None:
        try:
            return self.layout.query_name(parse_query(decode(value)["Definition"]).name)
        except (BadRecord, ConfigError, KeyError, TypeError, ValueError, AttributeError, OverflowError):
            return None

    @staticmethod
    def _written(outcome: _Outcome, title: str, kind: str, record_id: str) -> int:
        """The revision of a change or a delete that landed; else the error, as the API says it."""
        if outcome.gone:
            raise NotFound(f"{title} not found: {record_id}")
        if not outcome.revision:
            raise Conflict(f"{kind} {record_id} was changed on another agent meanwhile; read it again")
        return outcome.revision

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
        value = _intention_value(intention)
        outcome = self._create(self.layout.intention(intention_id), pair, intention_id, value)
        if outcome.holder is not None:
            raise Conflict(f"duplicate intention found: {intention} (ID {outcome.holder})")
        return intention_id, outcome.revision

    def update_intention(self, current: Intention, seen: int, fields: IntentionFields) -> int:
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
        outcome = self._update(
            self.layout.intention(current.id),
            seen,
            _intention_value(updated),
            self.layout.intention_pair(current.source_name, current.destination_name),
            self.layout.intention_pair(fields.source_name, fields.destination_name),
            current.id,
            self._intention_pair_of,
        )
        if outcome.holder is not None:
            raise Conflict(f"duplicate intention found: {updated} (ID {outcome.holder})")
        return self._written(outcome, "Intention", "intention", current.id)

    def delete_intention(self, current: Intention, seen: int) -> int:
        pair = self.layout.intention_pair(current.source_name, current.destination_name)
        outcome = self._delete(
            self.layout.intention(current.id), seen, pair, current.id, self._intention_pair_of
        )
        return self._written(outcome, "Intention", "intention", current.id)

    # prepared queries

    def create_query(self, definition: QueryDefinition, query_id: str = "") -> tuple[str, int]:
        query_id = query_id or str(uuid.uuid4())
        name = self.layout.query_name(definition.name)
        outcome = self._create(self.layout.query(query_id), name, query_id, _query_value(definition))
        if outcome.holder is not None:
            if definition.name:
                raise Conflict(
                    f"name {definition.name!r} aliases an existing query name (ID {outcome.holder})"
                )
            raise Conflict("a query template with an empty name already exists")
        return query_id, outcome.revision

    def update_query(self, current: PreparedQuery, seen: int, definition: QueryDefinition) -> int:
        outcome = self._update(
            self.layout.query(current.id),
            seen,
            _query_value(definition),
            self.layout.query_name(current.definition.name),
            self.layout.query_name(definition.name),
            current.id,
            self._query_name_of,
        )
        if outcome.holder is not None:
            raise Conflict(f"name {definition.name!r} aliases an existing query name")
        return self._written(outcome, "Query", "query", current.id)

    def delete_query(self, current: PreparedQuery, seen: int) -> int:
        name = self.layout.query_name(current.definition.name)
        outcome = self._delete(self.layout.query(current.id), seen, name, current.id, self._query_name_of)
        return self._written(outcome, "Query", "query", current.id)


def _intention_value(intention: Intention) -> bytes:
    document: dict[str, Any] = intention_document(intention)
    document.pop("CreateIndex", None)
    document.pop("ModifyIndex", None)
    return encode(document)


def _query_value(definition: QueryDefinition) -> bytes:
    return encode({"Definition": definition.to_fields()})
