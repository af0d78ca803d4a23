"""Reaping hosts that stayed dead: Consul's ``reconnect_timeout`` (72 h by default).

A host whose ``alive/`` key is gone is failed, not gone: its records stay (critical) so
that a host that comes back after a reboot or a long partition keeps its registrations.
The first agent to see it dead writes ``tombstones/<node>`` with the time; once the
timeout has passed, any agent deletes the host's records in one transaction that also
requires the host to still be dead and the tombstone to be the one it read -- so several
agents trying at once, or the host coming back at that moment, cannot go wrong. No leader
is needed. A host that comes back deletes its own tombstone when it joins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from supervisor.cluster.etcd import EtcdClient, KeyValue, created_at, modified_at, op_delete, op_put
from supervisor.cluster.layout import Kind, Layout
from supervisor.cluster.records import BadRecord, decode, encode

log = logging.getLogger("supervisor.cluster")


def plan(
    kvs: dict[str, KeyValue], layout: Layout, own: str, timeout: float, now: float
) -> tuple[list[str], list[tuple[str, KeyValue]]]:
    """(hosts to mark dead now, (host, its tombstone) to reap now): pure, from the mirror."""
    nodes = set()
    for key in kvs:
        parsed = layout.parse(key)
        if parsed is not None and parsed.kind is Kind.NODE:
            nodes.add(parsed.node)
    mark, reap = [], []
    prefix = layout.tombstones()
    for key, stone in kvs.items():  # a tombstone of a host whose records went otherwise
        if key.startswith(prefix) and key[len(prefix) :] not in nodes:
            reap.append((key[len(prefix) :], stone))
    for node in sorted(nodes - {own}):
        if layout.alive(node) in kvs:
            continue
        tombstone = kvs.get(layout.tombstone(node))
        if tombstone is None:
            mark.append(node)
            continue
        try:
            failed_at = float(decode(tombstone.value).get("failed_at", now))
        except (BadRecord, TypeError, ValueError):
            failed_at = 0.0  # (unreadable: as old as can be)
        if now - failed_at >= timeout:
            reap.append((node, tombstone))
    return mark, reap


class Reaper:
    def __init__(
        self,
        client: EtcdClient,
        layout: Layout,
        own: str,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.layout = layout
        self.own = own
        self.timeout = timeout
        self.clock = clock

    def step(self, kvs: dict[str, KeyValue]) -> None:
        """Blocking (a worker thread); raises EtcdError."""
        mark, reap = plan(kvs, self.layout, self.own, self.timeout, self.clock())
        layout = self.layout
        for node in mark:
            value = encode({"failed_at": self.clock()})
            self.client.txn(
                [created_at(layout.alive(node), 0), created_at(layout.tombstone(node), 0)],
                [op_put(layout.tombstone(node), value)],
            )
        for node, tombstone in reap:
            ops: list[dict[str, Any]] = [op_delete(layout.node(node)), op_delete(layout.tombstone(node))]
            ops += [
                op_delete(layout.services(node), prefix=True),
                op_delete(layout.checks(node), prefix=True),
            ]
            result = self.client.txn(
                [
                    created_at(layout.alive(node), 0),
                    modified_at(layout.tombstone(node), tombstone.mod_revision),
                ],
                ops,
            )
            if result.succeeded:
                log.warning("reaped host %s: dead for longer than reconnect_timeout", node)
