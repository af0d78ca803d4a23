"""Prepared queries: stored service lookups, executed by name or ID.

Supported: ``Service.Service``, ``Tags`` (``!tag`` excludes), ``OnlyPassing`` (else only
critical instances are left out, as in Consul), ``NodeMeta``, ``ServiceMeta``,
``Connect`` (Connect-capable instances), ``DNS.TTL``, and ``name_prefix_match``
templates with ``${name.full}``, ``${name.prefix}``, ``${name.suffix}`` and
``${match(N)}``. Failover is accepted and reported as 0 failovers: discovery is local
to this agent.

``Queries`` is the domain (typed definitions, names, template resolution); where they
are kept is its ``QueryStorage``: ``QueryFile`` writes ``data_dir/connect/queries.json``.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from supervisor.catalog.errors import Conflict, InvalidDefinition, NotFound
from supervisor.config.keys import check_safe_id
from supervisor.config.schema import Bool, Context, Custom, Int, Invalid, List, Map, Obj, Opaque, Str
from supervisor.errors import ConfigError, ConfigProblem
from supervisor.regexps import SlowPattern, compile_client_regexp
from supervisor.state.documents import Damaged, damaged, load_document, save_document

VERSION = 1
REMEDY = "restore it, or move it away to start with no prepared queries"

SERVICE_QUERY = Obj(
    {
        "service": Str(),
        "failover": Obj({"nearest_n": Int(0), "datacenters": List(Str())}),
        "only_passing": Bool(),
        "ignore_check_ids": List(Str()),
        "near": Str(),
        "tags": List(Str()),
        "node_meta": Map(Str()),
        "service_meta": Map(Str()),
        "connect": Bool(),
    },
    required=("service",),
)


def _check_query_name(value: Any, path: str, ctx: Context) -> str:
    if value == "":
        return ""
    return check_safe_id(value, path, ctx)


def _check_regexp(value: Any, path: str, ctx: Context) -> str:
    if not isinstance(value, str):
        raise Invalid("expected a regular expression string")
    try:
        compile_client_regexp(value)
    except re.error as exc:
        raise Invalid(f"invalid regular expression: {exc}") from None
    except SlowPattern as exc:
        raise Invalid(str(exc)) from None
    return value


SCHEMA = Obj(
    {
        "id": Str(),
        "name": Custom(_check_query_name),
        "session": Str(),
        "token": Str(),
        "service": SERVICE_QUERY,
        "dns": Obj({"ttl": Str()}),
        "template": Obj(
            {
                "type": Str(("name_prefix_match",)),
                "regexp": Custom(_check_regexp),
                "remove_empty_tags": Bool(),
            }
        ),
        "create_index": Opaque(),
        "modify_index": Opaque(),
    },
    required=("service",),
)


@dataclass(frozen=True)
class ServiceQuery:
    """What a query looks for. None: a field the definition leaves out (Consul shows null)."""

    service: str
    failover_nearest_n: int = 0
    failover_datacenters: tuple[str, ...] | None = None
    only_passing: bool = False
    ignore_check_ids: tuple[str, ...] | None = None
    near: str = ""
    tags: tuple[str, ...] | None = None
    node_meta: Mapping[str, str] | None = None
    service_meta: Mapping[str, str] | None = None
    connect: bool = False


@dataclass(frozen=True)
class Template:
    type: str
    regexp: str = ""
    remove_empty_tags: bool = False


@dataclass(frozen=True)
class QueryDefinition:
    service: ServiceQuery
    name: str = ""
    session: str = ""
    token: str = ""
    dns_ttl: str = ""
    template: Template | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> QueryDefinition:
        """From the cleaned (snake_case) definition, as validated and as stored."""
        service = fields["service"]
        failover = service.get("failover", {})
        template = fields.get("template") or None

        def optional(key: str) -> Any:
            value = service.get(key)
            if value is None:
                return None
            return dict(value) if isinstance(value, Mapping) else tuple(value)

        return cls(
            service=ServiceQuery(
                service=str(service["service"]),
                failover_nearest_n=int(failover.get("nearest_n", 0)),
                failover_datacenters=tuple(failover["datacenters"]) if "datacenters" in failover else None,
                only_passing=bool(service.get("only_passing", False)),
                ignore_check_ids=optional("ignore_check_ids"),
                near=str(service.get("near", "")),
                tags=optional("tags"),
                node_meta=optional("node_meta"),
                service_meta=optional("service_meta"),
                connect=bool(service.get("connect", False)),
            ),
            name=str(fields.get("name", "")),
            session=str(fields.get("session", "")),
            token=str(fields.get("token", "")),
            dns_ttl=str((fields.get("dns") or {}).get("ttl", "")),
            template=Template(
                type=str(template.get("type", "")),
                regexp=str(template.get("regexp", "")),
                remove_empty_tags=bool(template.get("remove_empty_tags", False)),
            )
            if template
            else None,
        )

    def to_fields(self) -> dict[str, Any]:
        """The cleaned definition again (what the store keeps, as it always has)."""
        query = self.service
        service: dict[str, Any] = {"service": query.service}
        failover: dict[str, Any] = {}
        if query.failover_nearest_n:
            failover["nearest_n"] = query.failover_nearest_n
        if query.failover_datacenters is not None:
            failover["datacenters"] = list(query.failover_datacenters)
        if failover:
            service["failover"] = failover
        flags = {"only_passing": query.only_passing, "near": query.near, "connect": query.connect}
        service.update({key: value for key, value in flags.items() if value})
        for key, optional in (
            ("ignore_check_ids", query.ignore_check_ids),
            ("tags", query.tags),
            ("node_meta", query.node_meta),
            ("service_meta", query.service_meta),
        ):
            if optional is not None:
                service[key] = dict(optional) if isinstance(optional, Mapping) else list(optional)
        fields: dict[str, Any] = {"service": service}
        texts = {"name": self.name, "session": self.session, "token": self.token}
        fields.update({key: text for key, text in texts.items() if text})
        if self.dns_ttl:
            fields["dns"] = {"ttl": self.dns_ttl}
        if self.template is not None:
            fields["template"] = {
                "type": self.template.type,
                "regexp": self.template.regexp,
                "remove_empty_tags": self.template.remove_empty_tags,
            }
        return fields


@dataclass(frozen=True)
class PreparedQuery:
    id: str
    definition: QueryDefinition
    create_index: int
    modify_index: int

    @property
    def name(self) -> str:
        return self.definition.name


def parse_query(body: Any, source: str = "<api>") -> QueryDefinition:
    """Validate a definition (CamelCase or snake_case keys); raises ConfigError."""
    ctx = Context(source, from_client=True)
    cleaned = SCHEMA.validate(body, "", ctx)
    if ctx.problems or not isinstance(cleaned, dict):
        raise ConfigError(ctx.problems or [ConfigProblem(source, "", "expected a JSON object")])
    return QueryDefinition.from_fields(cleaned)


def interpolate(text: str, full: str, prefix: str, match: re.Match[str] | None) -> str:
    def replace_one(found: re.Match[str]) -> str:
        expression = found.group(1).strip()
        if expression == "name.full":
            return full
        if expression == "name.prefix":
            return prefix
        if expression == "name.suffix":
            return full[len(prefix) :]
        indexed = re.fullmatch(r"match\((\d+)\)", expression)
        if indexed:
            group = int(indexed.group(1))
            if match is not None and group <= (match.re.groups or 0):
                return match.group(group) or ""
            return ""
        raise InvalidDefinition(f"unknown template expression ${{{expression}}}")

    return re.sub(r"\$\{([^}]*)\}", replace_one, text)


class QueryStorage(Protocol):
    def load(self) -> list[PreparedQuery]: ...
    def save(self, queries: list[PreparedQuery]) -> None: ...


class Queries:
    def __init__(
        self, storage: QueryStorage | None, next_index: Callable[[], int], on_change: Callable[[], None]
    ) -> None:
        self.storage = storage
        self.next_index = next_index
        self.on_change = on_change
        self.queries: dict[str, PreparedQuery] = {}

    def load(self) -> None:
        if self.storage is not None:
            self.queries = {query.id: query for query in self.storage.load()}

    def replace_all(self, queries: dict[str, PreparedQuery]) -> bool:
        """Take the queries another store holds (cluster mode: etcd's); True if any changed."""
        changed = queries != self.queries
        self.queries = queries
        return changed

    def check_definition(self, definition: QueryDefinition, own_id: str | None) -> None:
        """Consul's rules for a new or changed query against the ones there are."""
        if not definition.name and definition.template is None:
            # Consul's rule: an anonymous query lives as long as its session, and this agent
            # has no sessions.
            raise InvalidDefinition(
                "Invalid prepared query: Must be bound to a session "
                "(this agent has no sessions: give the query a Name)"
            )
        self._check_name(definition, own_id)

    def save(self) -> None:
        """Write every query again (data_dir was deleted under the running agent)."""
        self._commit(self.queries)

    def _commit(self, queries: dict[str, PreparedQuery]) -> None:
        """Save first, then take effect, so a failed save changes nothing."""
        if self.storage is not None:
            self.storage.save(sorted(queries.values(), key=lambda query: (query.name, query.id)))
        self.queries = queries

    def list(self) -> list[PreparedQuery]:
        return sorted(self.queries.values(), key=lambda query: (query.name, query.id))

    def get(self, query_id: str) -> PreparedQuery:
        query = self.queries.get(query_id)
        if query is None:
            raise NotFound(f"Query not found: {query_id}")
        return query

    def create(self, definition: QueryDefinition) -> PreparedQuery:
        self.check_definition(definition, None)
        index = self.next_index()
        return self._store(PreparedQuery(str(uuid.uuid4()), definition, index, index))

    def update(self, query_id: str, definition: QueryDefinition) -> PreparedQuery:
        current = self.get(query_id)
        self._check_name(definition, query_id)
        return self._store(replace(current, definition=definition, modify_index=self.next_index()))

    def delete(self, query_id: str) -> None:
        self.get(query_id)
        self.next_index()
        self._commit({key: value for key, value in self.queries.items() if key != query_id})
        self.on_change()

    def _check_name(self, definition: QueryDefinition, own_id: str | None) -> None:
        name = definition.name
        if not name:
            if definition.template is not None and any(
                not query.name and query.definition.template is not None and query.id != own_id
                for query in self.queries.values()
            ):
                raise Conflict("a query template with an empty name already exists")
            return
        for query in self.queries.values():
            if query.name == name and query.id != own_id:
                raise Conflict(f"name {name!r} aliases an existing query name (ID {query.id})")

    def _store(self, query: PreparedQuery) -> PreparedQuery:
        self._commit({**self.queries, query.id: query})
        self.on_change()
        return query

    def resolve(self, name_or_id: str) -> tuple[PreparedQuery, ServiceQuery]:
        """The query for an ID or name (templates by longest prefix) and what it looks for."""
        if name_or_id in self.queries:
            query = self.queries[name_or_id]
            if query.definition.template is not None:  # Consul's rule and message
                raise InvalidDefinition("prepared query templates can only be resolved up by name, not by ID")
            return query, query.definition.service
        for query in self.queries.values():
            if query.name == name_or_id and query.definition.template is None:
                return query, query.definition.service
        templates = [
            q
            for q in self.queries.values()
            if q.definition.template is not None and name_or_id.startswith(q.name)
        ]
        if not templates:
            raise NotFound(f"Query not found: {name_or_id}")
        query = max(templates, key=lambda q: len(q.name))
        template = query.definition.template
        assert template is not None
        match = re.match(template.regexp, name_or_id) if template.regexp else None
        service = query.definition.service
        tags = [interpolate(tag, name_or_id, query.name, match) for tag in service.tags or ()]
        return query, replace(
            service,
            service=interpolate(service.service, name_or_id, query.name, match),
            tags=tuple(tag for tag in tags if tag) if template.remove_empty_tags else tuple(tags),
        )


class QueryFile:
    """Prepared queries in ``data_dir/connect/queries.json`` (versioned, 0600)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[PreparedQuery]:
        data = load_document(self.path, VERSION, REMEDY)
        if data is None:
            return []
        try:
            return [
                PreparedQuery(
                    str(entry["ID"]),
                    parse_query(entry["Definition"], self.path),
                    int(entry["CreateIndex"]),
                    int(entry["ModifyIndex"]),
                )
                for entry in data["Queries"]
            ]
        except (KeyError, TypeError, ValueError, Damaged, ConfigError) as exc:
            raise damaged(self.path, exc, REMEDY) from exc

    def save(self, queries: list[PreparedQuery]) -> None:
        entries = [
            {
                "ID": query.id,
                "Definition": query.definition.to_fields(),
                "CreateIndex": query.create_index,
                "ModifyIndex": query.modify_index,
            }
            for query in queries
        ]
        save_document(self.path, VERSION, {"Queries": entries})


def shuffled(items: list[Any]) -> list[Any]:
    random.shuffle(items)
    return items
