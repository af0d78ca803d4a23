"""Prepared queries: stored service lookups, executed by name or ID, persisted in data_dir.

Supported: ``Service.Service``, ``Tags`` (``!tag`` excludes), ``OnlyPassing`` (else only
critical instances are left out, as in Consul), ``NodeMeta``, ``ServiceMeta``,
``Connect`` (Connect-capable instances), ``DNS.TTL``, and ``name_prefix_match``
templates with ``${name.full}``, ``${name.prefix}``, ``${name.suffix}`` and
``${match(N)}``. Failover is accepted and reported as 0 failovers: discovery is local
to this agent.
"""

from __future__ import annotations

import json
import os
import random
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from supervisor.config.keys import check_safe_id
from supervisor.config.schema import Bool, Context, Custom, Int, Invalid, List, Map, Obj, Opaque, Str
from supervisor.errors import ConfigError, ConfigProblem, DataDirError, load_error
from supervisor.state.atomic import atomic_write

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
        re.compile(value)
    except re.error as exc:
        raise Invalid(f"invalid regular expression: {exc}") from None
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
class PreparedQuery:
    id: str
    name: str
    fields: dict[str, Any]  # the cleaned definition (snake_case)
    create_index: int
    modify_index: int

    @property
    def service(self) -> dict[str, Any]:
        service: dict[str, Any] = self.fields["service"]
        return service

    @property
    def template(self) -> dict[str, Any] | None:
        template: dict[str, Any] | None = self.fields.get("template") or None
        return template

    def to_json(self, show_token: bool) -> dict[str, Any]:
        service = self.service
        failover = service.get("failover", {})
        template = self.template or {}
        return {
            "ID": self.id,
            "Name": self.name,
            "Session": self.fields.get("session", ""),
            "Token": self.fields.get("token", "")
            if show_token
            else ("<hidden>" if self.fields.get("token") else ""),
            "Service": {
                "Service": service["service"],
                "Failover": {
                    "NearestN": failover.get("nearest_n", 0),
                    "Datacenters": failover.get("datacenters"),
                },
                "OnlyPassing": service.get("only_passing", False),
                "IgnoreCheckIDs": service.get("ignore_check_ids"),
                "Near": service.get("near", ""),
                "Tags": service.get("tags"),
                "NodeMeta": service.get("node_meta"),
                "ServiceMeta": service.get("service_meta"),
                "Connect": service.get("connect", False),
            },
            "DNS": {"TTL": self.fields.get("dns", {}).get("ttl", "")},
            "Template": {
                "Type": template.get("type", ""),
                "Regexp": template.get("regexp", ""),
                "RemoveEmptyTags": template.get("remove_empty_tags", False),
            },
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class QueryError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_query(body: Any, source: str = "<api>") -> dict[str, Any]:
    ctx = Context(source)
    cleaned = SCHEMA.validate(body, "", ctx)
    if ctx.problems or not isinstance(cleaned, dict):
        raise ConfigError(ctx.problems or [ConfigProblem(source, "", "expected a JSON object")])
    if cleaned.get("template") and not cleaned.get("name"):
        raise ConfigError.single(source, "Name", "a template query needs a name (the prefix it matches)")
    return cleaned


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
        raise QueryError(400, f"unknown template expression ${{{expression}}}")

    return re.sub(r"\$\{([^}]*)\}", replace_one, text)


class QueryStore:
    def __init__(self, path: str | None, next_index: Any, on_change: Any) -> None:
        self.path = path
        self.next_index = next_index
        self.on_change = on_change
        self.queries: dict[str, PreparedQuery] = {}

    def load(self) -> None:
        if self.path is None or not os.path.exists(self.path):
            return
        try:
            with open(self.path) as handle:
                data = json.load(handle)
            for entry in data["Queries"]:
                fields = parse_query(entry["Definition"], self.path)
                self.queries[entry["ID"]] = PreparedQuery(
                    entry["ID"],
                    fields.get("name", ""),
                    fields,
                    int(entry["CreateIndex"]),
                    int(entry["ModifyIndex"]),
                )
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise load_error(exc)(f"{self.path} cannot be read ({exc}); restore it or move it away") from exc

    def save(self) -> None:
        if self.path is None:
            return
        document = {
            "Version": 1,
            "Queries": [
                {
                    "ID": q.id,
                    "Definition": q.fields,
                    "CreateIndex": q.create_index,
                    "ModifyIndex": q.modify_index,
                }
                for q in self.list()
            ],
        }
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            atomic_write(self.path, json.dumps(document, indent=1).encode(), mode=0o600)
        except OSError as exc:
            raise DataDirError(f"cannot write {self.path}: {exc.strerror}") from exc

    def list(self) -> list[PreparedQuery]:
        return sorted(self.queries.values(), key=lambda query: (query.name, query.id))

    def create(self, fields: dict[str, Any]) -> PreparedQuery:
        self._check_name(fields.get("name", ""), None)
        index = self.next_index()
        query = PreparedQuery(str(uuid.uuid4()), fields.get("name", ""), fields, index, index)
        return self._store(query)

    def update(self, query_id: str, fields: dict[str, Any]) -> PreparedQuery:
        current = self.queries.get(query_id)
        if current is None:
            raise QueryError(404, f"Query not found: {query_id}")
        self._check_name(fields.get("name", ""), query_id)
        return self._store(
            replace(current, name=fields.get("name", ""), fields=fields, modify_index=self.next_index())
        )

    def delete(self, query_id: str) -> None:
        if self.queries.pop(query_id, None) is None:
            raise QueryError(404, f"Query not found: {query_id}")
        self.next_index()
        self.save()
        self.on_change()

    def _check_name(self, name: str, own_id: str | None) -> None:
        if not name:
            return
        for query in self.queries.values():
            if query.name == name and query.id != own_id:
                raise QueryError(409, f"name {name!r} aliases an existing query name (ID {query.id})")

    def _store(self, query: PreparedQuery) -> PreparedQuery:
        self.queries[query.id] = query
        self.save()
        self.on_change()
        return query

    def resolve(self, name_or_id: str) -> tuple[PreparedQuery, dict[str, Any]]:
        """The query for an ID or name (templates by longest prefix) and its service spec."""
        if name_or_id in self.queries:
            query = self.queries[name_or_id]
            return query, dict(query.service)
        for query in self.queries.values():
            if query.name == name_or_id and not query.template:
                return query, dict(query.service)
        templates = [q for q in self.queries.values() if q.template and name_or_id.startswith(q.name)]
        if not templates:
            raise QueryError(404, f"Query not found: {name_or_id}")
        query = max(templates, key=lambda q: len(q.name))
        template = query.template or {}
        regexp = template.get("regexp", "")
        match = re.match(regexp, name_or_id) if regexp else None
        service = dict(query.service)
        service["service"] = interpolate(service["service"], name_or_id, query.name, match)
        tags = [interpolate(tag, name_or_id, query.name, match) for tag in service.get("tags") or []]
        service["tags"] = [tag for tag in tags if tag] if template.get("remove_empty_tags") else tags
        return query, service


def shuffled(items: list[Any]) -> list[Any]:
    random.shuffle(items)
    return items
