"""Consul's blocking queries: hold a request until the answer changes or ``wait`` passes.

``?hash=`` (agent-local endpoints, header ``X-Consul-ContentHash``) and ``?index=``
(header ``X-Consul-Index``). ``wait`` defaults to 5 minutes, is capped at 10, and gets up
to wait/16 of random jitter as Consul does, so many clients do not return in lockstep.
A change wakes every waiter through one shared asyncio event: thousands of waiters cost
one set() call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from supervisor.api.http import HttpError, Request
from supervisor.changes import ChangeSignal
from supervisor.config.durations import parse_duration
from supervisor.config.limits import parse_uint

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0

T = TypeVar("T")


def parse_wait(request: Request) -> float:
    text = request.arg("wait")
    if text is None or text == "":
        wait = DEFAULT_WAIT
    else:
        seconds = parse_uint(text)
        try:
            wait = float(seconds) if seconds is not None else parse_duration(text)
        except ValueError:
            message = f"Invalid wait time {text[:40]!r}: use a duration such as 30s or 5m"
            raise HttpError(400, message) from None
    wait = min(wait, MAX_WAIT)
    return wait + random.uniform(0, wait / 16)


def parse_index(request: Request) -> int | None:
    text = request.arg("index")
    if text is None or text == "":
        return None
    index = parse_uint(text, 20)
    if index is None:
        message = f"Invalid index {text[:40]!r}: it must be a non-negative integer of at most 20 digits"
        raise HttpError(400, message)
    return index


def content_hash(data: Any) -> str:
    """A short stable hash of a JSON-able value (Consul printed a 64-bit hash as hex)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


async def block_until_changed(
    request: Request,
    changes: ChangeSignal,
    compute: Callable[[], T],
    key: Callable[[T], str | int],
    *,
    param: str,
) -> T:
    """Return ``compute()`` once ``key`` of it differs from the request's ``param`` (hash or
    index), or when the wait time is over. Without the parameter, return at once."""
    given_index = parse_index(request)  # validated everywhere, as Consul does
    given = request.arg(param)
    if param == "index":
        given = None if given_index is None else str(given_index)
    if given is None or given == "":
        return compute()
    deadline = time.monotonic() + parse_wait(request)
    changes.held += 1
    try:
        return await _wait(changes, compute, key, given, deadline, request.client_gone)
    finally:
        changes.held -= 1


async def _wait(
    changes: ChangeSignal,
    compute: Callable[[], T],
    key: Callable[[T], str | int],
    given: str,
    deadline: float,
    gone: asyncio.Event | None,
) -> T:
    while True:
        event = changes.current()
        result = compute()
        remaining = deadline - time.monotonic()
        if str(key(result)) != given or remaining <= 0 or (gone is not None and gone.is_set()):
            return result
        if gone is None:
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return compute()
            continue
        # Also end when the client hangs up (as Go's net/http cancels such a request), so
        # its connection is released now rather than when the wait runs out.
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(gone.wait())}
        done, pending = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if not done:
            return compute()
