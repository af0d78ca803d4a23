"""Authorizing inbound connections, without an agent round trip per connection.

The first connection from a client identity asks the agent
(``POST /v1/agent/connect/authorize``); the answer is cached per identity. The cache is
emptied whenever the intentions that name this service change (a blocking watch on
``/v1/connect/intentions/match``), so a new deny takes effect within milliseconds, and
entries also expire after ``TTL`` as a safety net (ACL policy changes are not in that
watch). Concurrent first connections from one identity share a single request. An
agent that cannot answer means "denied": the proxy fails closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("builtin_proxy.authz")

TTL = 60.0
Decision = Callable[[bool, str], None]


class Authorizer:
    def __init__(self, service: str, submit: Callable[..., None]) -> None:
        self.service = service
        self.submit = submit  # Requests.submit
        self._cache: dict[str, tuple[bool, str, float]] = {}
        self._waiting: dict[str, list[Decision]] = {}
        self._epoch = 0

    def authorize(self, uri: str, serial: str, decide: Decision) -> None:
        cached = self._cache.get(uri)
        if cached is not None and cached[2] > time.monotonic():
            decide(cached[0], cached[1])
            return
        waiters = self._waiting.get(uri)
        if waiters is not None:
            waiters.append(decide)
            return
        self._waiting[uri] = [decide]
        epoch = self._epoch
        body = {"Target": self.service, "ClientCertURI": uri, "ClientCertSerial": serial}
        self.submit(
            "POST",
            "/v1/agent/connect/authorize",
            body,
            lambda data, error: self._answered(uri, epoch, data, error),
        )

    def _answered(self, uri: str, epoch: int, data: Any, error: Exception | None) -> None:
        if error is not None or not isinstance(data, dict):
            allowed, reason = False, f"authorization failed: {error or 'bad answer'}"
            log.warning("cannot authorize %s: %s (connection refused)", uri, error)
        else:
            allowed, reason = bool(data.get("Authorized")), str(data.get("Reason", ""))
            if epoch == self._epoch:  # an answer from before an intention change is not kept
                self._cache[uri] = (allowed, reason, time.monotonic() + TTL)
        for decide in self._waiting.pop(uri, []):
            decide(allowed, reason)

    def invalidate(self) -> None:
        """Intentions changed: every cached decision may be wrong now."""
        self._epoch += 1
        self._cache.clear()
