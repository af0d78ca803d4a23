"""This agent's copy of the cluster's keys, kept current by one etcd watch.

Pure data, on the API's event loop: the watch thread hands over whole listings (``reset``,
after a start or a compaction) and whole watch messages (``apply``); both report whether
anything changed, so a re-listing that finds what the mirror already had moves nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from supervisor.catalog.index import Family
from supervisor.cluster.etcd import Event, KeyValue
from supervisor.cluster.layout import Kind, Layout, Parsed


class Mirror:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.kvs: dict[str, KeyValue] = {}
        self.revision = 0
        self.gone_at: dict[str, int] = {}  # node -> the revision its alive/ key went away
        # Per family of answers (catalog, intentions, queries): the latest revision that
        # deleted one of its keys; an answer that lost an item moves to it (alive/ counts
        # for the catalog: a dead host's instances leave ?passing answers). Keys no answer
        # shows (the CA's requests, tombstones) move none.
        self.removed_at: dict[Family, int] = {}

    def reset(self, kvs: Iterable[KeyValue], revision: int) -> set[str]:
        """Take a whole listing; returns the keys that differ from what the mirror had."""
        fresh = {kv.key: kv for kv in kvs}
        changed = {key for key in fresh.keys() | self.kvs.keys() if fresh.get(key) != self.kvs.get(key)}
        for key in set(self.kvs) - set(fresh):
            self._note_gone(key, revision)
        self.kvs = fresh
        self.revision = max(self.revision, revision)
        return changed

    def apply(self, events: Iterable[Event], revision: int) -> set[str]:
        """Take one watch message; returns the keys it changed."""
        changed: set[str] = set()
        for event in events:
            key = event.kv.key
            if event.kind == "delete":
                if self.kvs.pop(key, None) is not None:
                    changed.add(key)
                    self._note_gone(key, event.kv.mod_revision or revision)
            elif self.kvs.get(key) != event.kv:
                self.kvs[key] = event.kv
                changed.add(key)
        self.revision = max(self.revision, revision)
        return changed

    def _note_gone(self, key: str, revision: int) -> None:
        parsed = self.layout.parse(key)
        if parsed is not None and parsed.kind is Kind.ALIVE:
            self.gone_at[parsed.node] = revision
        family = self._family(key, parsed)
        if family is not None:
            self.removed_at[family] = max(self.removed_at.get(family, 0), revision)

    def _family(self, key: str, parsed: Parsed | None) -> Family | None:
        if parsed is not None:
            return None if parsed.kind is Kind.META else Family.CATALOG
        if key.startswith(f"{self.layout.root}intentions/"):
            return Family.INTENTIONS
        if key.startswith(f"{self.layout.root}queries/"):
            return Family.QUERIES
        return None

    def under(self, prefix: str) -> list[KeyValue]:
        return [kv for key, kv in self.kvs.items() if key.startswith(prefix)]
