"""Leaf certificates per service, renewed before they expire and after a root rotation.

A leaf is issued on the first request for a service and then kept fresh: renewal is
scheduled at a random point between 60 % and 90 % of its lifetime (Consul 1.4's rule,
spreading renewals of many services), and the new leaf is delivered to callers blocked
on ``/v1/agent/connect/ca/leaf/<service>``. A leaf nobody asked for during a whole
lifetime is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.connect.ca import CertificateAuthority, Leaf

log = logging.getLogger("supervisor.leaves")

RENEW_EARLIEST = 0.6
RENEW_LATEST = 0.9


@dataclass
class _Entry:
    leaf: Leaf
    renew_at: float  # wall clock
    last_requested: float
    task: asyncio.Task[None] | None = None


def _margin(leaf: Leaf) -> float:
    """Never hand out a leaf this close to its expiry: a minute, or 5 % of a short lifetime."""
    return min(60.0, 0.05 * (leaf.valid_before - leaf.valid_after))


def renewal_time(leaf: Leaf, rng: random.Random) -> float:
    lifetime = leaf.valid_before - leaf.valid_after
    return leaf.valid_after + lifetime * rng.uniform(RENEW_EARLIEST, RENEW_LATEST)


class LeafManager:
    def __init__(
        self, ca: CertificateAuthority, on_change: Callable[[], None], rng: random.Random | None = None
    ):
        self.ca = ca
        self.on_change = on_change
        self.rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}

    def get(self, service: str) -> Leaf:
        now = time.time()
        entry = self._entries.get(service)
        if entry is None or now >= entry.leaf.valid_before - _margin(entry.leaf):
            entry = self._issue(service, now)  # none yet, or (renewal missed) about to expire
        entry.last_requested = now
        return entry.leaf

    def services(self) -> list[str]:
        """The services this manager has issued leaves for."""
        return list(self._entries)

    async def ensure(self, service: str) -> None:
        """(A local CA signs at once: nothing to wait for.)"""

    def reissue_all(self) -> None:
        """After a root rotation: every service gets a leaf from the new root right away."""
        now = time.time()
        for service in list(self._entries):
            self._issue(service, now)
        if self._entries:
            self.on_change()

    def close(self) -> None:
        for entry in self._entries.values():
            if entry.task is not None:
                entry.task.cancel()

    def _issue(self, service: str, now: float) -> _Entry:
        previous = self._entries.get(service)
        if previous is not None and previous.task is not None:
            previous.task.cancel()
        leaf = self.ca.sign_leaf(service)
        entry = _Entry(leaf, renewal_time(leaf, self.rng), previous.last_requested if previous else now)
        self._entries[service] = entry
        entry.task = asyncio.get_running_loop().create_task(
            self._renew_later(service, entry), name=f"leaf {service}"
        )
        log.debug(
            "issued leaf for %s (serial %x), renewal in %.0fs",
            service,
            leaf.cert.serial_number,
            entry.renew_at - now,
        )
        return entry

    async def _renew_later(self, service: str, entry: _Entry) -> None:
        await asyncio.sleep(max(0.0, entry.renew_at - time.time()))
        if self._entries.get(service) is not entry:
            return
        now = time.time()
        if now - entry.last_requested > entry.leaf.valid_before - entry.leaf.valid_after:
            del self._entries[service]  # nobody asked for it in a whole lifetime
            return
        self._issue(service, now)
        log.info("renewed the leaf certificate of %s", service)
        self.on_change()
