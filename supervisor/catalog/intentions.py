"""Intentions: which service may connect to which, persisted in data_dir.

Precedence is Consul's: an exact source and destination (9) beats a wildcard source
(8), which beats a wildcard destination (6), which beats ``* => *`` (5); ties are broken
by name. Authorization takes the first intention, in that order, that matches.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from supervisor.config.keys import check_safe_id
from supervisor.config.schema import Context, Custom, Int, Invalid, Map, Obj, Opaque, Str
from supervisor.errors import ConfigError, ConfigProblem, DataDirError, load_error
from supervisor.state.atomic import atomic_write

log = logging.getLogger("supervisor.intentions")
WILDCARD = "*"
DEFAULT_NS = "default"


def _check_name(value: Any, path: str, ctx: Context) -> str:
    if value == WILDCARD:
        return WILDCARD
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
class Intention:
    id: str
    source_name: str
    destination_name: str
    action: str
    description: str = ""
    meta: dict[str, str] = field(default_factory=dict)
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

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ID": self.id,
            "Description": self.description,
            "SourceNS": DEFAULT_NS,
            "SourceName": self.source_name,
            "DestinationNS": DEFAULT_NS,
            "DestinationName": self.destination_name,
            "SourceType": "consul",
            "Action": self.action,
            "DefaultAddr": "",
            "DefaultPort": 0,
            "Meta": dict(self.meta),
            "Precedence": self.precedence,
            "CreatedAt": self.created_at,
            "UpdatedAt": self.updated_at,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        digest = hashlib.blake2b(
            json.dumps(
                [self.source_name, self.destination_name, self.action, self.meta], sort_keys=True
            ).encode(),
            digest_size=32,
        ).digest()
        data["Hash"] = base64.b64encode(digest).decode()
        return data


class IntentionError(Exception):
    """A request on intentions that cannot be carried out; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_intention(body: Any, source: str = "<api>") -> dict[str, Any]:
    """Validate a request body (Consul's CamelCase or snake_case keys); raises ConfigError."""
    ctx = Context(source)
    cleaned = SCHEMA.validate(body, "", ctx)
    if ctx.problems or not isinstance(cleaned, dict):
        raise ConfigError(ctx.problems or [ConfigProblem(source, "", "expected a JSON object")])
    return cleaned


class IntentionStore:
    """Owned by the API's event loop; ``on_change`` bumps the index and wakes waiters."""

    def __init__(self, path: str | None, next_index: Any, on_change: Any) -> None:
        self.path = path
        self.next_index = next_index
        self.on_change = on_change
        self.intentions: dict[str, Intention] = {}

    def load(self) -> None:
        if self.path is None or not os.path.exists(self.path):
            return
        try:
            with open(self.path) as handle:
                data = json.load(handle)
            entries = data["Intentions"]
            self.intentions = {entry["ID"]: Intention(**_from_json(entry)) for entry in entries}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # An intention store that cannot be read must not silently allow everything.
            raise load_error(exc)(
                f"{self.path} cannot be read ({exc}); restore it from a backup, or move it away to start "
                "with no intentions (then every connection is allowed unless ACLs default to deny)"
            ) from exc

    def save(self) -> None:
        if self.path is None:
            return
        document = {"Version": 1, "Intentions": [_to_store(ixn) for ixn in self.sorted()]}
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            atomic_write(self.path, json.dumps(document, indent=1).encode(), mode=0o600)
        except OSError as exc:
            raise DataDirError(f"cannot write {self.path}: {exc.strerror}") from exc

    def sorted(self) -> list[Intention]:
        return sorted(self.intentions.values(), key=Intention.sort_key)

    def exact(self, source: str, destination: str) -> Intention | None:
        for intention in self.intentions.values():
            if intention.source_name == source and intention.destination_name == destination:
                return intention
        return None

    def create(self, fields: dict[str, Any]) -> Intention:
        existing = self.exact(fields["source_name"], fields["destination_name"])
        if existing is not None:
            raise IntentionError(409, f"duplicate intention found: {existing} (ID {existing.id})")
        index = self.next_index()
        now = _timestamp()
        intention = Intention(
            id=str(uuid.uuid4()),
            source_name=fields["source_name"],
            destination_name=fields["destination_name"],
            action=fields["action"],
            description=fields.get("description", ""),
            meta=dict(fields.get("meta", {})),
            created_at=now,
            updated_at=now,
            create_index=index,
            modify_index=index,
        )
        return self._store(intention)

    def update(self, intention_id: str, fields: dict[str, Any]) -> Intention:
        current = self.intentions.get(intention_id)
        if current is None:
            raise IntentionError(404, f"Intention not found: {intention_id}")
        clash = self.exact(fields["source_name"], fields["destination_name"])
        if clash is not None and clash.id != intention_id:
            raise IntentionError(409, f"duplicate intention found: {clash} (ID {clash.id})")
        updated = replace(
            current,
            source_name=fields["source_name"],
            destination_name=fields["destination_name"],
            action=fields["action"],
            description=fields.get("description", ""),
            meta=dict(fields.get("meta", {})),
            updated_at=_timestamp(),
            modify_index=self.next_index(),
        )
        return self._store(updated)

    def delete(self, intention_id: str) -> Intention:
        intention = self.intentions.pop(intention_id, None)
        if intention is None:
            raise IntentionError(404, f"Intention not found: {intention_id}")
        self.next_index()
        self.save()
        self.on_change()
        log.info("intention deleted: %s", intention)
        return intention

    def _store(self, intention: Intention) -> Intention:
        self.intentions[intention.id] = intention
        self.save()
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
                return intention.action == "allow", f"Matched intention: {intention}"
        if not acls_enabled:
            return True, "ACLs disabled, access is allowed by default"
        return default_allow, "Default behavior configured by ACLs"


def _to_store(intention: Intention) -> dict[str, Any]:
    return {
        "ID": intention.id,
        "SourceName": intention.source_name,
        "DestinationName": intention.destination_name,
        "Action": intention.action,
        "Description": intention.description,
        "Meta": intention.meta,
        "CreatedAt": intention.created_at,
        "UpdatedAt": intention.updated_at,
        "CreateIndex": intention.create_index,
        "ModifyIndex": intention.modify_index,
    }


def _from_json(entry: dict[str, Any]) -> dict[str, Any]:
    if entry["Action"] not in ("allow", "deny"):
        raise ValueError(f"intention {entry['ID']}: invalid action {entry['Action']!r}")
    return {
        "id": str(entry["ID"]),
        "source_name": str(entry["SourceName"]),
        "destination_name": str(entry["DestinationName"]),
        "action": str(entry["Action"]),
        "description": str(entry.get("Description", "")),
        "meta": dict(entry.get("Meta") or {}),
        "created_at": str(entry.get("CreatedAt", "")),
        "updated_at": str(entry.get("UpdatedAt", "")),
        "create_index": int(entry.get("CreateIndex", 0)),
        "modify_index": int(entry.get("ModifyIndex", 0)),
    }
