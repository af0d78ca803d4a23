"""Where the catalog's entries live, behind an interface.

``CatalogStorage`` is what the catalog writes this agent's entries to and what every
query reads: ``LocalStorage`` keeps them in memory (a single-host agent knows only its
own node); a cluster backend would merge the entries of every agent of the datacenter,
with no change to the catalog's callers or the HTTP endpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from supervisor.catalog.model import CheckResult, Entry, Node


class CatalogStorage(Protocol):
    def put_local(
        self, node: Node, entries: Mapping[str, Entry], node_checks: tuple[CheckResult, ...]
    ) -> None:
        """Replace this agent's entries (by service ID) and its node-level checks."""

    def entries(self) -> Iterable[Entry]:
        """Every entry of the datacenter, in a stable order."""

    def nodes(self) -> list[Node]:
        """Every node of the datacenter."""

    def node_checks(self, node_name: str) -> tuple[CheckResult, ...]:
        """Checks of a node that belong to no service."""


class LocalStorage:
    """This agent's entries, in memory."""

    def __init__(self) -> None:
        self._node: Node | None = None
        self._entries: list[Entry] = []
        self._node_checks: tuple[CheckResult, ...] = ()

    def put_local(
        self, node: Node, entries: Mapping[str, Entry], node_checks: tuple[CheckResult, ...]
    ) -> None:
        self._node = node
        self._entries = [entries[service_id] for service_id in sorted(entries)]
        self._node_checks = node_checks

    def entries(self) -> Iterable[Entry]:
        return self._entries

    def nodes(self) -> list[Node]:
        return [self._node] if self._node is not None else []

    def node_checks(self, node_name: str) -> tuple[CheckResult, ...]:
        if self._node is None or self._node.name != node_name:
            return ()
        return self._node_checks
