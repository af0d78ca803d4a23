"""Discovery: ``/v1/health/...`` and ``/v1/catalog/...``, index-blocking, Consul's shapes,
narrowed by ``?filter=`` and ``?node-meta=`` where Consul 1.5 takes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import identify, require_operator
from supervisor.api.blocking import block_until_changed
from supervisor.api.catalog_shapes import (
    catalog_entry_json,
    check_json,
    health_entry_json,
    node_json,
    node_services_json,
)
from supervisor.api.connect_endpoints import valid_service_name
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.read_meta import read_headers
from supervisor.api.results import Results
from supervisor.api.router import READ_METHODS, Router
from supervisor.api.selection import Selection
from supervisor.catalog.status import CheckStatus
from supervisor.controlplane import ControlPlane

CHECK_STATES = ("any", *CheckStatus)


def _health_node_meta(item: Any) -> Any:
    return item["Node"]["Meta"]


def _catalog_node_meta(item: Any) -> Any:
    return item["NodeMeta"]


def _node_meta(item: Any) -> Any:
    return item["Meta"]


def truthy(request: Request, name: str) -> bool:
    """Consul's boolean query flags: present without a value, or a true-ish value."""
    if not request.has_arg(name):
        return False
    value = (request.arg(name) or "").lower()
    if value in ("", "1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise HttpError(400, f"Invalid value for {name!r}: {value!r} (use true or false)")


@dataclass
class CatalogEndpoints:
    plane: ControlPlane
    results: Results

    def register(self, router: Router) -> None:
        router.add(READ_METHODS, "/v1/health/service/:service", self.health_service)
        router.add(READ_METHODS, "/v1/health/connect/:service", self.health_connect)
        router.add(READ_METHODS, "/v1/health/checks/:service", self.health_checks)
        router.add(READ_METHODS, "/v1/health/state/:state", self.health_state)
        router.add(READ_METHODS, "/v1/health/node/:node", self.health_node)
        router.add(READ_METHODS, "/v1/catalog/node/:node", self.catalog_node)
        router.add(READ_METHODS, "/v1/catalog/services", self.catalog_services)
        router.add(READ_METHODS, "/v1/catalog/service/:service", self.catalog_service)
        router.add(READ_METHODS, "/v1/catalog/connect/:service", self.catalog_connect)
        router.add(READ_METHODS, "/v1/catalog/nodes", self.catalog_nodes)
        router.add(READ_METHODS, "/v1/catalog/datacenters", self.datacenters)
        router.add(READ_METHODS, "/v1/status/leader", self.leader)
        router.add(READ_METHODS, "/v1/status/peers", self.peers)

    def _check_access(self, request: Request) -> None:
        """Discovery is open to proxies; other callers follow the ACL rules."""
        view = self.plane.view
        assert view is not None
        caller = identify(request, view)
        if not caller.is_proxy:
            require_operator(caller, view)

    async def _blocking(self, request: Request, key: Any, compute: Callable[[], Any]) -> Response:
        self._check_access(request)
        headers = read_headers(request, self.plane.contact())
        results = self.results
        data, index = await block_until_changed(
            request, self.plane.changes, lambda: results.get(key, compute), lambda r: r[1], param="index"
        )
        return Response.json(data, headers={"X-Consul-Index": str(index), **headers})

    def _health(self, request: Request, connect: bool) -> tuple[Any, Callable[[], Any]]:
        name = valid_service_name(request.params["service"])
        tags = tuple(request.query.get("tag", []))
        passing = truthy(request, "passing")
        selection = Selection.of(request, node_meta=True)
        catalog = self.plane.catalog

        def compute() -> Any:
            entries = catalog.select(name, connect=connect, tags=tags, passing=passing)
            return selection.apply((health_entry_json(e) for e in entries), _health_node_meta)

        return ("health", connect, name, tags, passing, selection.key), compute

    async def health_service(self, request: Request) -> Response:
        connect = truthy(request, "connect")
        return await self._blocking(request, *self._health(request, connect))

    async def health_connect(self, request: Request) -> Response:
        return await self._blocking(request, *self._health(request, True))

    async def health_checks(self, request: Request) -> Response:
        name = valid_service_name(request.params["service"])
        selection = Selection.of(request, node_meta=True)
        catalog = self.plane.catalog

        def compute() -> Any:
            return selection.apply(check_json(check, node) for node, check in catalog.service_checks(name))

        return await self._blocking(request, ("checks", name, selection.key), compute)

    async def health_state(self, request: Request) -> Response:
        state = request.params["state"]
        if state not in CHECK_STATES:
            raise HttpError(400, f"Invalid check state {state!r}: use any, passing, warning or critical")
        selection = Selection.of(request, node_meta=True)
        catalog = self.plane.catalog
        wanted = None if state == "any" else CheckStatus(state)

        def compute() -> Any:
            checks = catalog.all_checks()
            return selection.apply(
                check_json(check, node) for node, check in checks if wanted in (None, check.status)
            )

        return await self._blocking(request, ("state", state, selection.key), compute)

    async def health_node(self, request: Request) -> Response:
        node_name = request.params["node"]
        selection = Selection.of(request)
        catalog = self.plane.catalog

        def compute() -> Any:
            return selection.apply(check_json(check, node_name) for check in catalog.node_health(node_name))

        return await self._blocking(request, ("node-health", node_name, selection.key), compute)

    def _catalog(self, request: Request, connect: bool) -> tuple[Any, Callable[[], Any]]:
        name = valid_service_name(request.params["service"])
        tags = tuple(request.query.get("tag", []))
        selection = Selection.of(request, node_meta=True)
        catalog = self.plane.catalog

        def compute() -> Any:
            entries = catalog.select(name, connect=connect, tags=tags)
            return selection.apply((catalog_entry_json(entry) for entry in entries), _catalog_node_meta)

        return ("catalog", connect, name, tags, selection.key), compute

    async def catalog_service(self, request: Request) -> Response:
        return await self._blocking(request, *self._catalog(request, False))

    async def catalog_connect(self, request: Request) -> Response:
        return await self._blocking(request, *self._catalog(request, True))

    async def catalog_services(self, request: Request) -> Response:
        selection = Selection.of(request, node_meta=True)
        catalog = self.plane.catalog

        def compute() -> Any:
            if not selection.node_meta:
                return catalog.services()
            nodes = {node.name for node in catalog.nodes() if _matches(node.meta, selection.node_meta)}
            return catalog.services(lambda entry: entry.node.name in nodes)

        return await self._blocking(request, ("services", selection.key), compute)

    async def catalog_nodes(self, request: Request) -> Response:
        selection = Selection.of(request, node_meta=True)
        catalog = self.plane.catalog

        def compute() -> Any:
            return selection.apply((node_json(node) for node in catalog.nodes()), _node_meta)

        return await self._blocking(request, ("nodes", selection.key), compute)

    async def catalog_node(self, request: Request) -> Response:
        """A node and its services; ``null`` for a node this datacenter does not have (as
        Consul: clients read that as "no such node", not as an error)."""
        node_name = request.params["node"]
        selection = Selection.of(request)
        catalog = self.plane.catalog

        def compute() -> Any:
            node = next((node for node in catalog.nodes() if node.name == node_name), None)
            if node is None:
                return None
            return node_services_json(node, catalog.node_entries(node_name), selection.apply_values)

        return await self._blocking(request, ("node", node_name, selection.key), compute)

    async def datacenters(self, request: Request) -> Response:
        view = self.plane.view
        assert view is not None
        return Response.json([view.config.datacenter])

    async def leader(self, request: Request) -> Response:
        view = self.plane.view
        assert view is not None
        return Response.json(view.api_address)

    async def peers(self, request: Request) -> Response:
        view = self.plane.view
        assert view is not None
        return Response.json([view.api_address])


def _matches(meta: Any, wanted: tuple[tuple[str, str], ...]) -> bool:
    return all(meta.get(key) == value for key, value in wanted)
