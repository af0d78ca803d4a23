"""Per-query result tracking for blocking queries: an answer's index moves only when the
answer does, and a thousand waiters of the same query cost one computation per change."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from supervisor.catalog.index import Family, Index

ContentIndex = Callable[[tuple[Family, ...], Any], int]


@dataclass
class _Cached:
    data: Any
    digest: str
    result_index: int
    at_index: int


class Results:
    """Remembers, per query, the index at which its result last changed.

    A blocking query on ``/v1/health/service/web`` must not return just because an
    unrelated service changed. Each computed result is hashed; its index only moves
    when the content does. Results are also reused while the global index stands still,
    so a thousand waiters of the same query cost one computation per change.
    """

    def __init__(self, index: Index, capacity: int = 4096, content_index: ContentIndex | None = None) -> None:
        """``content_index``: cluster mode's rule, an answer's index taken from its content
        and the deletions in its families (the same on every agent), instead of the index
        at which this agent saw it change."""
        self.index = index
        self.capacity = capacity
        self.content_index = content_index
        self._cache: OrderedDict[Hashable, _Cached] = OrderedDict()

    def get(
        self, key: Hashable, compute: Callable[[], Any], families: tuple[Family, ...] = (Family.CATALOG,)
    ) -> tuple[Any, int]:
        cached = self._cache.get(key)
        current = self.index.value
        if cached is not None and cached.at_index == current:
            self._cache.move_to_end(key)
            return cached.data, cached.result_index
        data = compute()
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
        if cached is not None and cached.digest == digest:
            result_index = cached.result_index
        elif self.content_index is not None:
            result_index = self.content_index(families, data)
            if cached is not None and result_index <= cached.result_index:
                result_index = current  # (cannot happen with a mirror's answers; never backwards)
        else:
            result_index = current
        self._cache[key] = _Cached(data, digest, result_index, current)
        self._cache.move_to_end(key)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return data, result_index
