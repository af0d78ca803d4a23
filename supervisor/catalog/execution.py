"""Running a prepared query against the catalog: what ``/v1/query/:id/execute`` and the
DNS interface's ``<query>.query.<domain>`` both answer."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.catalog.catalog import Catalog
from supervisor.catalog.model import Entry
from supervisor.catalog.queries import PreparedQuery, Queries


@dataclass(frozen=True)
class QueryResult:
    query: PreparedQuery
    service: str
    entries: tuple[Entry, ...]

    @property
    def dns_ttl(self) -> str:
        return self.query.definition.dns_ttl


def execute(queries: Queries, catalog: Catalog, name_or_id: str, *, connect: bool = False) -> QueryResult:
    """The healthy instances the query finds (critical ones never; warning ones unless it
    asks for only passing), filtered by its node and service metadata. Raises NotFound."""
    query, service = queries.resolve(name_or_id)
    entries = catalog.select(
        service.service,
        connect=connect or service.connect,
        tags=service.tags or (),
        passing=service.only_passing,
        exclude_critical=True,
    )
    node_meta = service.node_meta or {}
    service_meta = service.service_meta or {}
    chosen = tuple(
        entry
        for entry in entries
        if all(entry.node.meta.get(key) == value for key, value in node_meta.items())
        and all(entry.instance.meta.get(key) == value for key, value in service_meta.items())
    )
    return QueryResult(query, service.service, chosen)
