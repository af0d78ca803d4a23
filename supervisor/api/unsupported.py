"""Consul endpoints this agent deliberately does not have: a 501 that says so.

A client that reads a 404 as "key absent" (a KV get, a session lookup) must not be told
that by an agent that has no KV store at all; every one of these paths answers 501 Not
Implemented naming proxy-supervisor and what it lacks. Paths Consul never had stay 404.
"""

from __future__ import annotations

from supervisor.api.http import Handler, HttpError, Request, Response
from supervisor.api.router import Router

ALL_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE", "PATCH")

# (path prefix, what Consul serves there)
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("/v1/kv", "the KV store"),
    ("/v1/session", "sessions"),
    ("/v1/event", "user events"),
    ("/v1/acl", "ACL management (tokens come from the agent's acl config)"),
    ("/v1/agent/token", "setting ACL tokens through the API"),
    ("/v1/txn", "transactions"),
    ("/v1/coordinate", "network coordinates"),
    ("/v1/operator", "operator endpoints (Raft, autopilot, keyring)"),
    ("/v1/snapshot", "snapshots"),
    ("/v1/catalog/register", "catalog registration (register through /v1/agent/service/register)"),
    ("/v1/catalog/deregister", "catalog deregistration (use /v1/agent/service/deregister)"),
    ("/v1/config", "configuration entries"),
    ("/v1/discovery-chain", "discovery chains"),
    ("/v1/agent/join", "joining a Serf cluster"),
    ("/v1/agent/force-leave", "forcing a Serf member out"),
    ("/v1/agent/monitor", "log streaming (see the agent's log file)"),
    ("/v1/internal", "Consul's internal UI endpoints"),
)


def register(router: Router) -> None:
    """Add these after every real endpoint: real routes are matched first."""
    for prefix, what in UNSUPPORTED:
        router.add(ALL_METHODS, f"{prefix}/*rest", _refuse(what))


def _refuse(what: str) -> Handler:
    async def handler(request: Request) -> Response:
        raise HttpError(
            501,
            f"proxy-supervisor does not implement {what} ({request.method} {request.path}): it is a "
            "sidecar-proxy supervisor with Consul's agent API for services, health and Connect, "
            "not a Consul server; see the API compatibility table in its README",
        )

    return handler
