"""``/v1/connect/intentions``: create, read, update, delete, list, exact, check, match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import identify, require_operator
from supervisor.api.blocking import block_until_changed
from supervisor.api.connect_shapes import intention_json
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.results import Results
from supervisor.api.router import READ_METHODS, Router
from supervisor.api.selection import Selection
from supervisor.catalog.index import Family
from supervisor.catalog.intentions import IntentionFields, parse_intention
from supervisor.controlplane import ControlPlane
from supervisor.errors import ConfigError


def _decode(body: Any) -> IntentionFields:
    try:
        return parse_intention(body, "request body")
    except ConfigError as exc:
        raise HttpError(400, "Invalid intention: " + "; ".join(str(p) for p in exc.problems)) from None


@dataclass
class IntentionEndpoints:
    plane: ControlPlane
    results: Results

    def register(self, router: Router) -> None:
        router.add(("GET", "HEAD", "POST", "PUT"), "/v1/connect/intentions", self.collection)
        router.add(("GET", "HEAD", "PUT", "POST", "DELETE"), "/v1/connect/intentions/exact", self.exact)
        router.add(READ_METHODS, "/v1/connect/intentions/check", self.check)
        router.add(READ_METHODS, "/v1/connect/intentions/match", self.match)
        router.add(("GET", "HEAD", "PUT", "POST", "DELETE"), "/v1/connect/intentions/:id", self.single)

    def _operator(self, request: Request) -> None:
        view = self.plane.view
        assert view is not None
        require_operator(identify(request, view), view)

    async def collection(self, request: Request) -> Response:
        self._operator(request)
        store = self.plane.intentions
        if request.method in ("POST", "PUT"):
            intention_id = await self.plane.create_intention(_decode(request.json()))
            return Response.json({"ID": intention_id})
        selection = Selection.of(request)

        def compute() -> Any:
            return selection.apply(intention_json(i) for i in store.sorted())

        data, index = await block_until_changed(
            request,
            self.plane.changes,
            lambda: self.results.get(("intentions", selection.key), compute, (Family.INTENTIONS,)),
            lambda r: r[1],
            param="index",
        )
        return Response.json(data, headers={"X-Consul-Index": str(index)})

    async def single(self, request: Request) -> Response:
        self._operator(request)
        store = self.plane.intentions
        intention_id = request.params["id"]
        if request.method in ("PUT", "POST"):
            await self.plane.update_intention(intention_id, _decode(request.json()))
            return Response()
        if request.method == "DELETE":
            await self.plane.delete_intention(intention_id)
            return Response()
        return Response.json(intention_json(store.get(intention_id)))

    def _pair(self, request: Request) -> tuple[str, str]:
        source, destination = request.arg("source"), request.arg("destination")
        if not source or not destination:
            raise HttpError(400, "both 'source' and 'destination' query parameters are required")
        return source, destination

    async def exact(self, request: Request) -> Response:
        """Consul 1.9+'s intentions by name (current clients use only these): GET reads,
        PUT creates or replaces, DELETE removes (``true`` whether or not it existed)."""
        self._operator(request)
        source, destination = self._pair(request)
        store = self.plane.intentions
        intention = store.exact(source, destination)
        if request.method in ("PUT", "POST"):
            body = request.json()
            if not isinstance(body, dict):
                raise HttpError(400, "Request decode failed: expected a JSON object")
            fields = _decode({**body, "SourceName": source, "DestinationName": destination})
            if intention is None:
                await self.plane.create_intention(fields)
            else:
                await self.plane.update_intention(intention.id, fields)
            return Response.json(True)
        if request.method == "DELETE":
            if intention is not None:
                await self.plane.delete_intention(intention.id)
            return Response.json(True)
        if intention is None:
            raise HttpError(404, f"Intention not found: {source} => {destination}")
        return Response.json(intention_json(intention))

    async def check(self, request: Request) -> Response:
        self._operator(request)
        source, destination = self._pair(request)
        view = self.plane.view
        assert view is not None
        acl = view.config.acl
        allowed, _ = self.plane.intentions.decide(
            source, destination, default_allow=acl.default_policy == "allow", acls_enabled=acl.enabled
        )
        return Response.json({"Allowed": allowed})

    def _authorize_match(self, request: Request, by: str, names: tuple[str, ...]) -> None:
        # Apart from the handler so that the held blocking query pins no AgentView.
        view = self.plane.view
        assert view is not None
        caller = identify(request, view)
        if caller.is_proxy:
            # A proxy watches the intentions that decide who may connect to it (to cache
            # its authorization decisions); nothing else.
            if by != "destination" or names != (caller.service_name,):
                raise HttpError(
                    403, "Permission denied: a proxy token may only match intentions for its own service"
                )
        else:
            require_operator(caller, view)

    async def match(self, request: Request) -> Response:
        by = request.arg("by")
        if by not in ("source", "destination"):
            raise HttpError(400, "'by' must be 'source' or 'destination'")
        names = tuple(request.query.get("name", []))
        if not names:
            raise HttpError(400, "at least one 'name' query parameter is required")
        self._authorize_match(request, by, names)
        store = self.plane.intentions

        def compute() -> Any:
            return {name: [intention_json(i) for i in store.match(by, name)] for name in names}

        data, index = await block_until_changed(
            request,
            self.plane.changes,
            lambda: self.results.get(("match", by, names), compute, (Family.INTENTIONS,)),
            lambda r: r[1],
            param="index",
        )
        return Response.json(data, headers={"X-Consul-Index": str(index)})
