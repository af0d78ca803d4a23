"""Map (method, path) to handlers; ``:name`` segments become ``request.params``.

Domain errors raised by a handler become their HTTP status here (the domain knows
nothing of HTTP): not found 404, a conflict 409, an unusable definition 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from supervisor.api.http import Handler, HttpError, Request, Response
from supervisor.catalog.errors import CatalogError, Conflict, InvalidDefinition, NotFound

# Consul accepted PUT and POST interchangeably on its write endpoints.
WRITE_METHODS = ("PUT", "POST")
READ_METHODS = ("GET", "HEAD")

STATUS_OF: tuple[tuple[type[CatalogError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (InvalidDefinition, 400),
)


def status_of(error: CatalogError) -> int:
    return next((status for kind, status in STATUS_OF if isinstance(error, kind)), 400)


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    segments: tuple[str, ...]
    handler: Handler

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params = {}
        for pattern, part in zip(self.segments, parts, strict=True):
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
        parts = [_unquote(part) for part in request.raw_path.strip("/").split("/")]
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
                return await route.handler(request)
            except CatalogError as exc:
                raise HttpError(status_of(exc), str(exc)) from None
        if allowed:
            raise HttpError(
                405, f"Method {request.method} not allowed", {"Allow": ", ".join(sorted(set(allowed)))}
            )
        raise HttpError(404, f"Invalid URL path: {request.path!r} is not an endpoint of this agent")


def _unquote(part: str) -> str:
    return unquote(part)
