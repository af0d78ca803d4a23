"""Rendered answers, reused while nothing they depend on has changed.

Building an answer (select, records, wire format in pure Python) costs ~300 us; a
resolver under load asks the same few names again and again. An entry is keyed by the
query as sent (all but its ID: the name in the client's own letter case, type, flags,
EDNS0 buffer) and the transport, and holds up to ``variants`` renderings, each shuffled on
its own; a query picks one at random, so answers still spread load over the instances.
An entry is good for one version (the catalog's index and the second of the SOA serial)
and the configuration it was made under.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

Key = tuple[bytes, str]
Version = tuple[int, int]


@dataclass
class _Entry:
    version: Version
    variants: list[bytes] = field(default_factory=list)


class AnswerCache:
    def __init__(self, variants: int = 4, max_keys: int = 512, max_bytes: int = 4096) -> None:
        self.variants = variants
        self.max_keys = max_keys
        self.max_bytes = max_bytes  # larger answers are rare and would take the memory
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._config: Any = None

    def get(self, key: Key, version: Version, config: Any, rng: random.Random) -> bytes | None:
        """A rendering to reuse; None when one more is to be made (or nothing is kept)."""
        if config is not self._config:
            self._entries.clear()
            self._config = config
            return None
        entry = self._entries.get(key)
        if entry is None or entry.version != version or len(entry.variants) < self.variants:
            return None
        return rng.choice(entry.variants)

    def put(self, key: Key, version: Version, wire: bytes) -> None:
        if len(wire) > self.max_bytes:
            return
        entry = self._entries.get(key)
        if entry is None or entry.version != version:
            entry = self._entries[key] = _Entry(version)
        self._entries.move_to_end(key)
        entry.variants.append(wire)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
