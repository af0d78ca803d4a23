"""Discovery: ``/v1/health/...`` and ``/v1/catalog/...``, index-blocking, Consul's shapes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import identify, require_operator
from supervisor.api.blocking import block_until_changed
from supervisor.api.catalog_shapes import catalog_entry_json, check_json, health_entry_json, node_json
from supervisor.api.connect_endpoints import valid_service_name
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.results import Results
from supervisor.api.router import READ_METHODS, Router
from supervisor.controlplane import ControlPlane


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
        results = self.results
        data, index = await block_until_changed(
            request, self.plane.changes, lambda: results.get(key, compute), lambda r: r[1], param="index"
        )
        return Response.json(data, headers={"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true"})

    def _health(self, request: Request, connect: bool) -> tuple[Any, Callable[[], Any]]:
        name = valid_service_name(request.params["service"])
        tags = tuple(request.query.get("tag", []))
        passing = truthy(request, "passing")
        catalog = self.plane.catalog

        def compute() -> Any:
            return [
                health_entry_json(e)
                for e in catalog.select(name, connect=connect, tags=tags, passing=passing)
            ]

        return ("health", connect, name, tags, passing), compute

    async def health_service(self, request: Request) -> Response:
        connect = truthy(request, "connect")
        return await self._blocking(request, *self._health(request, connect))

    async def health_connect(self, request: Request) -> Response:
        return await self._blocking(request, *self._health(request, True))

    async def health_checks(self, request: Request) -> Response:
        name = valid_service_name(request.params["service"])
        catalog = self.plane.catalog

        def compute() -> Any:
            return [check_json(check, catalog.node.name) for check in catalog.service_checks(name)]

        return await self._blocking(request, ("checks", name), compute)

    def _catalog(self, request: Request, connect: bool) -> tuple[Any, Callable[[], Any]]:
        name = valid_service_name(request.params["service"])
        tags = tuple(request.query.get("tag", []))
        catalog = self.plane.catalog
        return ("catalog", connect, name, tags), lambda: [
            catalog_entry_json(entry) for entry in catalog.select(name, connect=connect, tags=tags)
        ]

    async def catalog_service(self, request: Request) -> Response:
        return await self._blocking(request, *self._catalog(request, False))

    async def catalog_connect(self, request: Request) -> Response:
        return await self._blocking(request, *self._catalog(request, True))

    async def catalog_services(self, request: Request) -> Response:
        return await self._blocking(request, ("services",), self.plane.catalog.services)

    async def catalog_nodes(self, request: Request) -> Response:
        catalog = self.plane.catalog

        def compute() -> Any:
            return [node_json(node) for node in catalog.nodes()]

        return await self._blocking(request, ("nodes",), compute)

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
