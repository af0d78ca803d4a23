"""``/v1/query``: prepared queries (create, read, update, delete, list, execute)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import identify, require_operator
from supervisor.api.blocking import block_until_changed
from supervisor.api.catalog_endpoints import truthy
from supervisor.api.catalog_shapes import health_entry_json
from supervisor.api.connect_shapes import query_json
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.read_meta import read_headers
from supervisor.api.results import Results
from supervisor.api.router import READ_METHODS, Router
from supervisor.catalog.execution import execute
from supervisor.catalog.index import Family
from supervisor.catalog.queries import QueryDefinition, parse_query, shuffled
from supervisor.config.limits import parse_uint
from supervisor.controlplane import ControlPlane
from supervisor.errors import ConfigError


@dataclass
class QueryEndpoints:
    plane: ControlPlane
    results: Results

    def register(self, router: Router) -> None:
        router.add(("GET", "HEAD", "POST", "PUT"), "/v1/query", self.collection)
        router.add(READ_METHODS, "/v1/query/:id/execute", self.execute)
        router.add(READ_METHODS, "/v1/query/:id/explain", self.explain)
        router.add(("GET", "HEAD", "PUT", "POST", "DELETE"), "/v1/query/:id", self.single)

    def _caller(self, request: Request, operator: bool = True) -> bool:
        """Check access; True if the caller may see tokens stored in queries."""
        view = self.plane.view
        assert view is not None
        caller = identify(request, view)
        if caller.is_proxy and not operator:
            return False
        require_operator(caller, view)
        return caller.is_master or not view.config.acl.enabled

    def _decode(self, request: Request) -> QueryDefinition:
        try:
            return parse_query(request.json(), "request body")
        except ConfigError as exc:
            raise HttpError(
                400, "Invalid prepared query: " + "; ".join(str(p) for p in exc.problems)
            ) from None

    async def collection(self, request: Request) -> Response:
        show = self._caller(request)
        store = self.plane.queries
        if request.method in ("POST", "PUT"):
            query_id = await self.plane.create_query(self._decode(request))
            return Response.json({"ID": query_id})
        headers = read_headers(request, self.plane.contact())
        data, index = await block_until_changed(
            request,
            self.plane.changes,
            lambda: self.results.get(
                ("queries", show), lambda: [query_json(q, show) for q in store.list()], (Family.QUERIES,)
            ),
            lambda r: r[1],
            param="index",
        )
        return Response.json(data, headers={"X-Consul-Index": str(index), **headers})

    async def single(self, request: Request) -> Response:
        show = self._caller(request)
        store = self.plane.queries
        query_id = request.params["id"]
        if request.method in ("PUT", "POST"):
            await self.plane.update_query(query_id, self._decode(request))
            return Response()
        if request.method == "DELETE":
            await self.plane.delete_query(query_id)
            return Response()
        query = store.get(query_id)
        return Response.json(
            [query_json(query, show)],
            headers={
                "X-Consul-Index": str(query.modify_index),
                **read_headers(request, self.plane.contact()),
            },
        )

    async def execute(self, request: Request) -> Response:
        self._caller(request, operator=False)
        name_or_id = request.params["id"]
        self.plane.queries.resolve(name_or_id)  # 404 now, not inside the blocking loop
        connect = truthy(request, "connect")
        limit_text = request.arg("limit")
        limit = parse_uint(limit_text) if limit_text else None
        if limit_text and limit is None:
            raise HttpError(400, f"Invalid limit {limit_text[:40]!r}: it must be a non-negative integer")

        def compute() -> Any:
            return self._execute(name_or_id, connect)

        data, index = await block_until_changed(
            request,
            self.plane.changes,
            lambda: self.results.get(
                ("execute", name_or_id, connect), compute, (Family.QUERIES, Family.CATALOG)
            ),
            lambda r: r[1],
            param="index",
        )
        nodes = shuffled(list(data["Nodes"]))  # a copy: the cached answer stays as it is
        if limit:
            nodes = nodes[:limit]
        return Response.json(
            {**data, "Nodes": nodes},
            headers={"X-Consul-Index": str(index), **read_headers(request, self.plane.contact())},
        )

    def _execute(self, name_or_id: str, connect_param: bool) -> dict[str, Any]:
        view = self.plane.view
        assert view is not None
        result = execute(self.plane.queries, self.plane.catalog, name_or_id, connect=connect_param)
        return {
            "Service": result.service,
            "Nodes": [health_entry_json(entry) for entry in result.entries],
            "DNS": {"TTL": result.dns_ttl},
            "Datacenter": view.config.datacenter,
            "Failovers": 0,
        }

    async def explain(self, request: Request) -> Response:
        show = self._caller(request)
        query, service = self.plane.queries.resolve(request.params["id"])
        rendered = query_json(query, show)
        rendered["Service"]["Service"] = service.service
        rendered["Service"]["Tags"] = list(service.tags) if service.tags is not None else None
        return Response.json({"Query": rendered})
