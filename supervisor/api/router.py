"""Map (method, path) to handlers; ``:name`` segments become ``request.params``, a last
``*name`` segment takes the rest of the path.

Domain errors raised by a handler become their HTTP status here (the domain knows
nothing of HTTP): not found 404, a conflict 409, an unusable definition 400. As in
Consul, empty segments are ignored (``//v1/agent/self`` is routed), a known path with
another method is a 405 naming the allowed ones, ``OPTIONS`` answers with them, and
``?pretty`` indents a JSON answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import unquote

from supervisor.api.http import Handler, HttpError, Request, Response
from supervisor.catalog.errors import CatalogError, Conflict, InvalidDefinition, NotFound, Unavailable

# Consul accepted PUT and POST interchangeably on its write endpoints.
WRITE_METHODS = ("PUT", "POST")
READ_METHODS = ("GET", "HEAD")

STATUS_OF: tuple[tuple[type[CatalogError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (InvalidDefinition, 400),
    (Unavailable, 503),
)


def status_of(error: CatalogError) -> int:
    return next((status for kind, status in STATUS_OF if isinstance(error, kind)), 400)


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    segments: tuple[str, ...]
    handler: Handler

    def match(self, parts: list[str]) -> dict[str, str] | None:
        segments = self.segments
        params = {}
        if segments and segments[-1].startswith("*"):
            if len(parts) < len(segments) - 1:
                return None
            params[segments[-1][1:]] = "/".join(parts[len(segments) - 1 :])
            segments, parts = segments[:-1], parts[: len(segments) - 1]
        if len(parts) != len(segments):
            return None
        for pattern, part in zip(segments, parts, strict=True):
            if pattern.startswith(":"):
                if not part:
                    return None
                params[pattern[1:]] = part
            elif pattern != part:
                return None
        return params


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, methods: tuple[str, ...], pattern: str, handler: Handler) -> None:
        self.routes.append(Route(methods, tuple(pattern.strip("/").split("/")), handler))

    async def __call__(self, request: Request) -> Response:
        # Match on the raw path so an encoded "/" (%2F) inside an ID stays one segment.
        parts = [_unquote(part) for part in request.raw_path.split("/") if part]
        allowed: list[str] = []
        for route in self.routes:
            params = route.match(parts)
            if params is None:
                continue
            if request.method not in route.methods:
                allowed.extend(route.methods)
                continue
            request.params = params
            try:
                response = await route.handler(request)
            except CatalogError as exc:
                raise HttpError(status_of(exc), str(exc)) from None
            return _pretty(response) if request.has_arg("pretty") else response
        if allowed:
            methods = ",".join(["OPTIONS", *sorted(set(allowed))])
            if request.method == "OPTIONS":
                return Response(headers={"Allow": methods})
            raise HttpError(405, f"method {request.method} not allowed", {"Allow": methods})
        raise HttpError(404, f"Invalid URL path: {request.path!r} is not an endpoint of this agent")


def _pretty(response: Response) -> Response:
    """Consul's ``?pretty``: four-space indents and a final newline."""
    if not response.headers.get("Content-Type", "").startswith("application/json") or not response.body:
        return response
    body = json.dumps(json.loads(response.body), indent=4).encode() + b"\n"
    return Response(response.status, body, response.headers)


def _unquote(part: str) -> str:
    return unquote(part)
