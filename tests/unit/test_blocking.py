"""Consul's blocking queries (``supervisor/api/blocking.py``) on a real ``ChangeSignal``:
``?index=``/``?hash=``/``?wait=`` parsing, an answer at once when the client's index is
already stale, a held request that ends when a change moves its answer (and not when an
unrelated change fires), the wait bound, and a client that hangs up. Waits are tens of
milliseconds; changes are fired from the event loop, as the control plane fires them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

from supervisor.api.blocking import (
    DEFAULT_WAIT,
    MAX_WAIT,
    block_until_changed,
    content_hash,
    parse_index,
    parse_wait,
)
from supervisor.api.http import HttpError, Request
from supervisor.changes import ChangeSignal

T = TypeVar("T")


def make_request(query: str = "", client_gone: asyncio.Event | None = None) -> Request:
    parts = urlsplit(f"/v1/health/service/web?{query}")
    return Request(
        method="GET",
        path=parts.path,
        raw_path=parts.path,
        query=parse_qs(parts.query, keep_blank_values=True),
        headers={},
        body=b"",
        remote="127.0.0.1:50000",
        client_gone=client_gone,
    )


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


class State:
    """What a query reads: an index that moves only when the answer does."""

    def __init__(self, index: int = 7) -> None:
        self.index = index
        self.computed = 0

    def compute(self) -> tuple[str, int]:
        self.computed += 1
        return f"answer@{self.index}", self.index


def index_of(result: tuple[str, int]) -> int:
    return result[1]


async def held(query: str, state: State, changes: ChangeSignal, **kwargs: Any) -> tuple[str, int]:
    return await block_until_changed(
        make_request(query, **kwargs), changes, state.compute, index_of, param="index"
    )


# -- parsing ---------------------------------------------------------------------------------


def test_an_index_is_a_non_negative_integer_of_up_to_20_digits_or_absent() -> None:
    assert parse_index(make_request()) is None
    assert parse_index(make_request("index=")) is None  # empty: do not block
    assert parse_index(make_request("index=0")) == 0
    assert parse_index(make_request("index=1700000000123")) == 1700000000123
    assert parse_index(make_request("index=" + "9" * 20)) == int("9" * 20)


@pytest.mark.parametrize("text", ["-1", "1.5", "²", "1" * 21])
def test_a_malformed_index_is_a_400_that_says_what_an_index_is(text: str) -> None:
    with pytest.raises(HttpError) as caught:
        parse_index(make_request(f"index={text}"))
    assert caught.value.status == 400
    assert "Invalid index" in caught.value.message and "non-negative integer" in caught.value.message


@pytest.mark.parametrize(
    ("query", "seconds"),
    [("", DEFAULT_WAIT), ("wait=1m30s", 90.0), ("wait=45", 45.0), ("wait=3h", MAX_WAIT)],
    ids=["absent", "duration", "bare-seconds", "capped-at-ten-minutes"],
)
def test_wait_is_a_duration_with_up_to_a_sixteenth_of_jitter(
    monkeypatch: pytest.MonkeyPatch, query: str, seconds: float
) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: low)
    assert parse_wait(make_request(query)) == seconds
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert parse_wait(make_request(query)) == seconds * 17 / 16


@pytest.mark.parametrize("text", ["soon", "-5s"])
def test_a_malformed_wait_on_a_blocking_request_is_a_400_with_an_example(text: str) -> None:
    with pytest.raises(HttpError) as caught:
        run(held(f"index=7&wait={text}", State(), ChangeSignal()))
    assert caught.value.status == 400
    assert "Invalid wait time" in caught.value.message and "30s" in caught.value.message


def test_content_hash_depends_on_content_not_on_key_order() -> None:
    first = content_hash({"ID": "web", "Port": 8080, "Tags": ["a"]})
    assert first == content_hash({"Tags": ["a"], "Port": 8080, "ID": "web"})
    assert first != content_hash({"ID": "web", "Port": 8081, "Tags": ["a"]})
    assert len(first) == 16 and int(first, 16) >= 0


# -- holding a request -----------------------------------------------------------------------


def test_without_an_index_or_with_a_stale_one_the_answer_comes_at_once() -> None:
    state = State(index=9)

    async def scenario() -> tuple[tuple[str, int], tuple[str, int], float]:
        started = time.monotonic()
        unblocked = await held("wait=10s", state, ChangeSignal())
        stale = await held("index=7&wait=10s", state, ChangeSignal())
        return unblocked, stale, time.monotonic() - started

    unblocked, stale, elapsed = run(scenario())
    assert unblocked == stale == ("answer@9", 9)
    assert elapsed < 1.0 and state.computed == 2  # one read each, no waiting


def test_a_current_index_is_held_until_a_change_moves_the_answer() -> None:
    state = State(index=7)

    async def scenario() -> tuple[tuple[str, int], bool]:
        changes = ChangeSignal()
        request = asyncio.ensure_future(held("index=7&wait=10s", state, changes))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        pending = not request.done()
        state.index = 8
        changes.fire()
        return await request, pending

    result, was_pending = run(scenario())
    assert was_pending
    assert result == ("answer@8", 8)


def test_a_change_that_leaves_the_answer_alone_keeps_the_request_held() -> None:
    state = State(index=7)

    async def scenario() -> tuple[tuple[str, int], bool]:
        changes = ChangeSignal()
        request = asyncio.ensure_future(held("index=7&wait=10s", state, changes))
        await asyncio.sleep(0)
        changes.fire()  # something else changed: this query's answer is the same
        for _ in range(3):
            await asyncio.sleep(0)
        still_held = not request.done()
        state.index = 12
        changes.fire()
        return await request, still_held

    result, still_held = run(scenario())
    assert still_held
    assert result == ("answer@12", 12)
    assert state.computed >= 3  # held, re-read after the unrelated change, re-read after the real one


def test_the_wait_bound_ends_a_request_nothing_changed_for() -> None:
    state = State(index=7)

    async def scenario() -> tuple[tuple[str, int], float]:
        started = time.monotonic()
        result = await held("index=7&wait=50ms", state, ChangeSignal())
        return result, time.monotonic() - started

    result, elapsed = run(scenario())
    assert result == ("answer@7", 7)  # the unchanged answer, with the same index
    assert 0.05 <= elapsed < 2.0


def test_unrelated_changes_do_not_push_the_wait_bound_back() -> None:
    state = State(index=7)

    async def scenario() -> float:
        changes = ChangeSignal()
        loop = asyncio.get_running_loop()
        ticker: list[asyncio.TimerHandle] = []

        def tick() -> None:
            changes.fire()
            ticker.append(loop.call_later(0.01, tick))

        tick()
        started = time.monotonic()
        try:
            await asyncio.wait_for(held("index=7&wait=100ms", state, changes), 3)
        finally:
            ticker[-1].cancel()
        return time.monotonic() - started

    assert run(scenario()) < 2.0


def test_a_client_that_hangs_up_ends_its_held_request() -> None:
    state = State(index=7)

    async def scenario() -> tuple[tuple[str, int], float]:
        gone = asyncio.Event()
        asyncio.get_running_loop().call_soon(gone.set)
        started = time.monotonic()
        result = await held("index=7&wait=10s", state, ChangeSignal(), client_gone=gone)
        return result, time.monotonic() - started

    result, elapsed = run(scenario())
    assert result == ("answer@7", 7) and elapsed < 1.0


def test_a_hash_query_blocks_on_the_hash_and_still_validates_the_index() -> None:
    def by_hash(query: str, value: str, changes: ChangeSignal) -> Coroutine[Any, Any, dict[str, str]]:
        return block_until_changed(
            make_request(query),
            changes,
            lambda: {"ContentHash": value},
            lambda d: d["ContentHash"],
            param="hash",
        )

    async def scenario() -> tuple[bool, dict[str, str]]:
        changes = ChangeSignal()
        same = asyncio.ensure_future(by_hash("hash=abc&wait=10s", "abc", changes))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        held_on_same_hash = not same.done()
        same.cancel()
        return held_on_same_hash, await by_hash("hash=old&wait=10s", "abc", changes)

    held_on_same_hash, answer = run(scenario())
    assert held_on_same_hash
    assert answer == {"ContentHash": "abc"}
    with pytest.raises(HttpError) as caught:
        run(by_hash("hash=abc&index=nope", "abc", ChangeSignal()))
    assert caught.value.status == 400
