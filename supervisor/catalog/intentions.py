"""Intentions: which service may connect to which.

Precedence is Consul's: an exact source and destination (9) beats a wildcard source
(8), which beats a wildcard destination (6), which beats ``* => *`` (5); ties are broken
by name. Authorization takes the first intention, in that order, that matches.

``Intentions`` is the domain: typed intentions, Consul's uniqueness rule, the decision.
Where they are kept is its ``IntentionStorage``: ``IntentionFile`` writes
``data_dir/connect/intentions.json`` (a cluster would keep them in a shared store).
"""

from __future__ import annotations

import datetime
import enum
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from supervisor.catalog.errors import Conflict, NotFound
from supervisor.config.keys import check_safe_id
from supervisor.config.schema import Context, Custom, Int, Invalid, Map, Obj, Opaque, Str
from supervisor.errors import ConfigError, ConfigProblem
from supervisor.state.documents import Damaged, damaged, load_document, save_document

log = logging.getLogger("supervisor.intentions")
WILDCARD = "*"
DEFAULT_NS = "default"
VERSION = 1
REMEDY = (
    "restore it from a backup, or move it away to start with no intentions "
    "(then every connection is allowed unless ACLs default to deny)"
)


class Action(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


def _check_name(value: Any, path: str, ctx: Context) -> str:
    if value == WILDCARD:
        return WILDCARD
    if value == "":
        raise Invalid("must name a service (or be '*' for any)")
    if isinstance(value, str) and WILDCARD in value:
        raise Invalid(f"{value!r}: a wildcard must be the entire name ('*')")
    return check_safe_id(value, path, ctx)


def _check_namespace(value: Any, path: str, ctx: Context) -> str:
    if value in ("", DEFAULT_NS, WILDCARD):
        return str(value or DEFAULT_NS)
    raise Invalid(f"{value!r}: namespaces are not supported, use 'default'")


SCHEMA = Obj(
    {
        "id": Str(),
        "description": Str(),
        "source_ns": Custom(_check_namespace),
        "source_name": Custom(_check_name),
        "destination_ns": Custom(_check_namespace),
        "destination_name": Custom(_check_name),
        "source_type": Str(("consul",)),
        "action": Str(("allow", "deny")),
        "meta": Map(Str()),
        "default_addr": Str(),
        "default_port": Int(0, 65535),
        # computed by the agent; whatever a client echoes back (GET, edit, PUT) is ignored
        "precedence": Opaque(),
        "created_at": Opaque(),
        "updated_at": Opaque(),
        "hash": Opaque(),
        "create_index": Opaque(),
        "modify_index": Opaque(),
    },
    required=("source_name", "destination_name", "action"),
)


@dataclass(frozen=True)
class IntentionFields:
    """What a client defines of an intention (the rest the agent computes)."""

    source_name: str
    destination_name: str
    action: Action
    description: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Intention:
    id: str
    source_name: str
    destination_name: str
    action: Action
    description: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    create_index: int = 0
    modify_index: int = 0

    @property
    def precedence(self) -> int:
        source_exact = self.source_name != WILDCARD
        destination_exact = self.destination_name != WILDCARD
        if source_exact and destination_exact:
            return 9
        if destination_exact:
            return 8
        if source_exact:
            return 6
        return 5

    def sort_key(self) -> tuple[int, str, str]:
        return (-self.precedence, self.source_name, self.destination_name)

    def matches_source(self, name: str) -> bool:
        return self.source_name in (WILDCARD, name)

    def matches_destination(self, name: str) -> bool:
        return self.destination_name in (WILDCARD, name)

    def __str__(self) -> str:
        return f"{self.source_name} => {self.destination_name} ({self.action})"


def parse_intention(body: Any, source: str = "<api>") -> IntentionFields:
    """Validate a definition (Consul's CamelCase or snake_case keys); raises ConfigError."""
    ctx = Context(source, from_client=True)
    cleaned = SCHEMA.validate(body, "", ctx)
    if ctx.problems or not isinstance(cleaned, dict):
        raise ConfigError(ctx.problems or [ConfigProblem(source, "", "expected a JSON object")])
    return IntentionFields(
        source_name=cleaned["source_name"],
        destination_name=cleaned["destination_name"],
        action=Action(cleaned["action"]),
        description=cleaned.get("description", ""),
        meta=dict(cleaned.get("meta", {})),
    )


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class IntentionStorage(Protocol):
    def load(self) -> list[Intention]: ...
    def save(self, intentions: list[Intention]) -> None: ...


class Intentions:
    """Owned by the API's event loop; ``on_change`` bumps the index and wakes waiters."""

    def __init__(
        self, storage: IntentionStorage | None, next_index: Callable[[], int], on_change: Callable[[], None]
    ) -> None:
        self.storage = storage
        self.next_index = next_index
        self.on_change = on_change
        self.intentions: dict[str, Intention] = {}

    def load(self) -> None:
        if self.storage is not None:
            self.intentions = {intention.id: intention for intention in self.storage.load()}

    def replace_all(self, intentions: dict[str, Intention]) -> bool:
        """Take the intentions another store holds (cluster mode: etcd's); True if any changed."""
        changed = intentions != self.intentions
        self.intentions = intentions
        return changed

    def save(self) -> None:
        """Write every intention again (data_dir was deleted under the running agent)."""
        self._commit(self.intentions)

    def _commit(self, intentions: dict[str, Intention]) -> None:
        """Save first, then take effect: an intention the client was told could not be
        saved must not be in force (nor one it was told was deleted come back later)."""
        if self.storage is not None:
            self.storage.save(sorted(intentions.values(), key=Intention.sort_key))
        self.intentions = intentions

    def sorted(self) -> list[Intention]:
        return sorted(self.intentions.values(), key=Intention.sort_key)

    def get(self, intention_id: str) -> Intention:
        intention = self.intentions.get(intention_id)
        if intention is None:
            raise NotFound(f"Intention not found: {intention_id}")
        return intention

    def exact(self, source: str, destination: str) -> Intention | None:
        for intention in self.intentions.values():
            if intention.source_name == source and intention.destination_name == destination:
                return intention
        return None

    def create(self, fields: IntentionFields) -> Intention:
        existing = self.exact(fields.source_name, fields.destination_name)
        if existing is not None:
            raise Conflict(f"duplicate intention found: {existing} (ID {existing.id})")
        index = self.next_index()
        now = _timestamp()
        intention = Intention(
            id=str(uuid.uuid4()),
            source_name=fields.source_name,
            destination_name=fields.destination_name,
            action=fields.action,
            description=fields.description,
            meta=dict(fields.meta),
            created_at=now,
            updated_at=now,
            create_index=index,
            modify_index=index,
        )
        return self._store(intention)

    def update(self, intention_id: str, fields: IntentionFields) -> Intention:
        current = self.get(intention_id)
        clash = self.exact(fields.source_name, fields.destination_name)
        if clash is not None and clash.id != intention_id:
            raise Conflict(f"duplicate intention found: {clash} (ID {clash.id})")
        updated = replace(
            current,
            source_name=fields.source_name,
            destination_name=fields.destination_name,
            action=fields.action,
            description=fields.description,
            meta=dict(fields.meta),
            updated_at=_timestamp(),
            modify_index=self.next_index(),
        )
        return self._store(updated)

    def delete(self, intention_id: str) -> Intention:
        intention = self.get(intention_id)
        self.next_index()
        self._commit({key: value for key, value in self.intentions.items() if key != intention_id})
        self.on_change()
        log.info("intention deleted: %s", intention)
        return intention

    def _store(self, intention: Intention) -> Intention:
        self._commit({**self.intentions, intention.id: intention})
        self.on_change()
        log.info("intention saved: %s", intention)
        return intention

    def match(self, by: str, name: str) -> list[Intention]:
        if by == "source":
            return [ixn for ixn in self.sorted() if ixn.matches_source(name)]
        return [ixn for ixn in self.sorted() if ixn.matches_destination(name)]

    def decide(
        self, source: str, destination: str, default_allow: bool, acls_enabled: bool
    ) -> tuple[bool, str]:
        """(allowed, reason) for ``source`` connecting to ``destination``: the first match."""
        for intention in self.match("destination", destination):
            if intention.matches_source(source):
                return intention.action is Action.ALLOW, f"Matched intention: {intention}"
        if not acls_enabled:
            return True, "ACLs disabled, access is allowed by default"
        return default_allow, "Default behavior configured by ACLs"


class IntentionFile:
    """Intentions in ``data_dir/connect/intentions.json`` (versioned, 0600)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[Intention]:
        # An intention store that cannot be read must not silently allow everything.
        data = load_document(self.path, VERSION, REMEDY)
        if data is None:
            return []
        try:
            return [intention_from_document(entry) for entry in data["Intentions"]]
        except (KeyError, TypeError, ValueError, Damaged) as exc:
            raise damaged(self.path, exc, REMEDY) from exc

    def save(self, intentions: list[Intention]) -> None:
        save_document(self.path, VERSION, {"Intentions": [intention_document(ixn) for ixn in intentions]})


def intention_document(intention: Intention) -> dict[str, Any]:
    return {
        "ID": intention.id,
        "SourceName": intention.source_name,
        "DestinationName": intention.destination_name,
        "Action": intention.action.value,
        "Description": intention.description,
        "Meta": dict(intention.meta),
        "CreatedAt": intention.created_at,
        "UpdatedAt": intention.updated_at,
        "CreateIndex": intention.create_index,
        "ModifyIndex": intention.modify_index,
    }


def intention_from_document(entry: dict[str, Any]) -> Intention:
    if entry["Action"] not in tuple(Action):
        raise Damaged(f"intention {entry['ID']}: invalid action {entry['Action']!r}")
    return Intention(
        id=str(entry["ID"]),
        source_name=str(entry["SourceName"]),
        destination_name=str(entry["DestinationName"]),
        action=Action(entry["Action"]),
        description=str(entry.get("Description", "")),
        meta=dict(entry.get("Meta") or {}),
        created_at=str(entry.get("CreatedAt", "")),
        updated_at=str(entry.get("UpdatedAt", "")),
        create_index=int(entry.get("CreateIndex", 0)),
        modify_index=int(entry.get("ModifyIndex", 0)),
    )
