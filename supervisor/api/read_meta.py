"""The headers Consul puts on catalog, health and query reads besides the index.

``X-Consul-KnownLeader`` and ``X-Consul-LastContact`` describe the agent's view of its
servers; a single-host agent is its own authority, so it always knows the "leader" and
has just heard from it; in cluster mode they say whether etcd is reachable and how long
ago it last answered. ``X-Consul-Effective-Consistency`` echoes the mode asked for (``?stale``,
``?consistent``, else ``leader``). ``?cached`` reads are answered from the agent's own
state, which is always current: ``X-Cache: HIT`` with ``Age: 0``.
"""

from __future__ import annotations

from supervisor.api.http import HttpError, Request


def read_headers(request: Request, contact: tuple[bool, int] = (True, 0)) -> dict[str, str]:
    """The headers for a read; raises a 400 for the combinations Consul refuses.
    ``contact``: whether the cluster's state is current, and ms since etcd last answered."""
    stale, consistent, cached = (request.has_arg(name) for name in ("stale", "consistent", "cached"))
    if stale and consistent:
        raise HttpError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
    if cached and consistent:
        raise HttpError(400, "Cannot specify ?cached with ?consistent, conflicting semantics.")
    headers = {
        "X-Consul-KnownLeader": "true" if contact[0] else "false",
        "X-Consul-LastContact": str(contact[1]),
        "X-Consul-Effective-Consistency": "stale" if stale else "consistent" if consistent else "leader",
    }
    if cached:
        headers.update({"X-Cache": "HIT", "Age": "0"})
    return headers
