"""Map (method, path) to handlers; ``:name`` segments become ``request.params``."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.api.http import Handler, HttpError, Request, Response

# Consul accepted PUT and POST interchangeably on its write endpoints.
WRITE = ("PUT", "POST")
READ = ("GET", "HEAD")


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
            return await route.handler(request)
        if allowed:
            raise HttpError(
                405, f"Method {request.method} not allowed", {"Allow": ", ".join(sorted(set(allowed)))}
            )
        raise HttpError(404, f"Invalid URL path: {request.path!r} is not an endpoint of this agent")


def _unquote(part: str) -> str:
    from urllib.parse import unquote

    return unquote(part)
