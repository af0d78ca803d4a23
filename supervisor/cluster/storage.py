"""The catalog's storage in cluster mode: this host's entries, merged with every other
host's from the mirror of etcd.

This host's entries are handed to the cluster member to publish (the agent stays
authoritative for its name). Reads come from the mirror -- every host's entries, this one's
included, so every agent gives the same answer -- once it has been listed; before that
(etcd unreachable since the start) from this host's own state. A synthetic ``serfHealth``
check is critical once a host's ``alive/`` key is gone, so a dead host's instances leave
``?passing`` and Connect discovery everywhere.

Indexes: ``index_base + etcd revision`` for everything read from etcd, the same value on
every agent; the shared index advances to it with every watch message and never goes
backwards (``Index.advance``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar, cast

from supervisor.catalog.catalog import SERF_ALIVE, SERF_CHECK, SERF_NAME
from supervisor.catalog.index import Family, Index
from supervisor.catalog.model import CheckResult, Entry, Instance, Node, RemoteInstance
from supervisor.catalog.status import CheckStatus
from supervisor.catalog.storage import LocalStorage
from supervisor.cluster.etcd import Event, KeyValue
from supervisor.cluster.layout import Kind, Layout
from supervisor.cluster.mirror import Mirror
from supervisor.cluster.records import (
    BadRecord,
    Render,
    decode,
    encode,
    host_records,
    read_check,
    read_instance,
    read_node,
    service_record,
)

log = logging.getLogger("supervisor.cluster")

DEAD_OUTPUT = "Agent not live or unreachable"

Publish = Callable[[dict[str, bytes]], None]
T = TypeVar("T")


class _Remote:
    """Every host's nodes, node checks and entries, built from the mirror when it changes."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.node_checks: dict[str, tuple[CheckResult, ...]] = {}
        self.entries: list[Entry] = []


class ClusterStorage:
    def __init__(self, layout: Layout, own_node: str, index: Index, render: Render, publish: Publish) -> None:
        self.layout = layout
        self.own_node = own_node
        self.index = index
        self.render = render
        self.publish = publish
        self.local = LocalStorage()
        self.mirror = Mirror(layout)
        self.base = 0  # the cluster's index base, once this agent has read it
        self._remote: _Remote | None = None
        self._bad: set[str] = set()
        self.records: dict[str, bytes] = {}
        self._encoded: dict[str, tuple[Instance, bytes]] = {}  # service ID -> its instance and record
        self.documents_changed = True  # intentions or queries moved since last read (first: the listing)
        self._overlaid = False  # the view shows this host from its own state (``_add_own_state``)
        self._parsed: dict[str, tuple[tuple[int, int], Any]] = {}  # key -> (its revisions, what it reads as)

    # -- this host ------------------------------------------------------------------------------

    def put_local(
        self, node: Node, entries: Mapping[str, Entry], node_checks: tuple[CheckResult, ...]
    ) -> None:
        self.local.put_local(node, entries, node_checks)
        records = host_records(
            self.layout, node, entries, node_checks, self._service_value, skip_check=SERF_CHECK
        )
        self._encoded = {sid: cached for sid, cached in self._encoded.items() if sid in entries}
        if records != self.records:
            self.records = records
            self.publish(records)
            if self._overlaid:
                self._remote = None  # the view shows this host from its own state: build it again

    def _service_value(self, instance: Instance) -> bytes:
        """An instance's record, rendered again only when the instance changed: the catalog
        publishes on every check result, and most of them change no instance."""
        cached = self._encoded.get(instance.service_id)
        if cached is not None and (cached[0] is instance or cached[0] == instance):
            return cached[1]
        value = encode(service_record(instance, self.render))
        self._encoded[instance.service_id] = (instance, value)
        return value

    # -- the mirror (on the API loop, from the watch thread) ------------------------------------

    def set_base(self, base: int) -> None:
        if base != self.base:
            self._parsed.clear()  # (indexes in parsed records carry the base)
        self.base = base
        self.index.advance(base + self.mirror.revision)

    def mirror_reset(self, kvs: Iterable[KeyValue], revision: int) -> bool:
        changed = self.mirror.reset(kvs, revision)
        return self._after_mirror(changed)

    def mirror_apply(self, events: Iterable[Event], revision: int) -> bool:
        changed = self.mirror.apply(events, revision)
        return self._after_mirror(changed)

    def _after_mirror(self, changed: set[str]) -> bool:
        if self.base:
            self.index.advance(self.base + self.mirror.revision)
        if changed:
            self._remote = None
            for key in changed:
                if key not in self.mirror.kvs:
                    self._parsed.pop(key, None)  # (a deleted key's parse is never asked for again)
            shared = (f"{self.layout.root}intentions/", f"{self.layout.root}queries/")
            self.documents_changed |= any(key.startswith(shared) for key in changed)
        return bool(changed)

    # -- reads (the CatalogStorage protocol) ------------------------------------------------

    @property
    def listed(self) -> bool:
        """The mirror has been filled from etcd at least once."""
        return self.mirror.revision > 0

    def entries(self) -> Iterable[Entry]:
        if not self.listed:
            return self.local.entries()
        return self._view().entries

    def nodes(self) -> list[Node]:
        if not self.listed:
            return self.local.nodes()
        return sorted(self._view().nodes.values(), key=lambda node: node.name)

    def node_checks(self, node_name: str) -> tuple[CheckResult, ...]:
        if not self.listed:
            return self.local.node_checks(node_name)
        return self._view().node_checks.get(node_name, ())

    def remote_nodes(self) -> dict[str, Node]:
        return {name: node for name, node in self._view().nodes.items() if name != self.own_node}

    def alive(self, node_name: str) -> bool:
        return self.layout.alive(node_name) in self.mirror.kvs

    def content_index(self, families: Collection[Family], data: Any) -> int:
        """A read's index from what it returns: the latest change among its items, or the
        latest deletion among the keys it is made of (an answer that lost an item). Every
        agent has the same mirror, so every agent gives the same index for the same answer."""
        removed = max((self.mirror.removed_at.get(family, 0) for family in families), default=0)
        return max(latest_modify_index(data), self.base + removed)

    # -- building other hosts' view --------------------------------------------------------

    def _view(self) -> _Remote:
        if self._remote is None:
            self._remote = self._build()
        return self._remote

    def _build(self) -> _Remote:
        remote = _Remote()
        services: dict[str, list[KeyValue]] = {}
        checks: dict[str, list[KeyValue]] = {}
        for kv in self.mirror.kvs.values():
            parsed = self.layout.parse(kv.key)
            if parsed is None:
                continue
            try:
                if parsed.kind is Kind.NODE:
                    remote.nodes[parsed.node] = self._read(kv, self._node, parsed.node)
                elif parsed.kind is Kind.SERVICE:
                    services.setdefault(parsed.node, []).append(kv)
                elif parsed.kind is Kind.CHECK:
                    checks.setdefault(parsed.node, []).append(kv)
            except BadRecord as exc:
                self._report_bad(kv.key, exc)
        for name, node in remote.nodes.items():
            node_checks, service_checks = self._checks_of(name, checks.get(name, []))
            remote.node_checks[name] = node_checks
            for kv in sorted(services.get(name, []), key=lambda kv: kv.key):
                service_id = kv.key[len(self.layout.services(name)) :]
                try:
                    instance = self._read(kv, self._instance, service_id)
                except BadRecord as exc:
                    self._report_bad(kv.key, exc)
                    continue
                own = service_checks.get(service_id, ())
                entry = Entry(node, instance, (*node_checks, *own), self.base + kv.mod_revision)
                remote.entries.append(entry)
        self._overlaid = self.own_node not in remote.nodes
        if self._overlaid:
            self._add_own_state(remote)
        remote.entries.sort(key=lambda entry: (entry.node.name, entry.instance.service_id))
        return remote

    def _read(self, kv: KeyValue, reader: Callable[[KeyValue, str], T], item: str) -> T:
        """``reader(kv, item)``, parsed once per version of the key: a change anywhere rebuilds the
        whole view, and decoding every record again cost ~0.1 s per change at 200 hosts.
        Raises ``BadRecord`` (remembered as well)."""
        stamp = (kv.create_revision, kv.mod_revision)
        cached = self._parsed.get(kv.key)
        if cached is not None and cached[0] == stamp:
            result = cached[1]
        else:
            try:
                result = reader(kv, item)
            except BadRecord as exc:
                result = exc
            self._parsed[kv.key] = (stamp, result)
        if isinstance(result, BadRecord):
            raise result
        return cast(T, result)

    def _add_own_state(self, remote: _Remote) -> None:
        """This host while its node record is not in the mirror (just after joining, before
        the watch brings it back; or a record there no agent wrote): an agent always lists
        itself, as a Consul agent does."""
        for node in self.local.nodes():
            remote.nodes[node.name] = node
            remote.node_checks[node.name] = self.local.node_checks(node.name)
        remote.entries.extend(self.local.entries())

    def _checks_of(
        self, node: str, kvs: list[KeyValue]
    ) -> tuple[tuple[CheckResult, ...], dict[str, tuple[CheckResult, ...]]]:
        node_checks = [self._serf(node)]
        by_service: dict[str, list[CheckResult]] = {}
        prefix = len(self.layout.checks(node))
        for kv in sorted(kvs, key=lambda kv: kv.key):
            try:
                check = self._read(kv, self._check, kv.key[prefix:])
            except BadRecord as exc:
                self._report_bad(kv.key, exc)
                continue
            if check.service_id:
                by_service.setdefault(check.service_id, []).append(check)
            else:
                node_checks.append(check)
        return tuple(node_checks), {sid: tuple(found) for sid, found in by_service.items()}

    # readers of one record (``_read``); ``item``: the node's, instance's or check's name

    def _node(self, kv: KeyValue, item: str) -> Node:
        return read_node(decode(kv.value), item, self.base + kv.mod_revision)

    def _instance(self, kv: KeyValue, item: str) -> RemoteInstance:
        return read_instance(decode(kv.value), item)

    def _check(self, kv: KeyValue, item: str) -> CheckResult:
        base = self.base
        return read_check(decode(kv.value), item, base + kv.create_revision, base + kv.mod_revision)

    def _serf(self, node: str) -> CheckResult:
        alive = self.mirror.kvs.get(self.layout.alive(node))
        if alive is not None:
            status, output = CheckStatus.PASSING, SERF_ALIVE
            created, modified = alive.create_revision, alive.mod_revision
        else:
            status, output = CheckStatus.CRITICAL, DEAD_OUTPUT
            created = modified = self.mirror.gone_at.get(node, 1)
        return CheckResult(
            SERF_CHECK, SERF_NAME, status, output, "", "", "", (), self.base + created, self.base + modified
        )

    def _report_bad(self, key: str, exc: BadRecord) -> None:
        if key not in self._bad:
            self._bad.add(key)
            log.warning("skipped %s in etcd, which no agent wrote: %s", key, exc)


def latest_modify_index(data: Any) -> int:
    """The largest ``ModifyIndex`` anywhere in a JSON answer (0: none)."""
    if isinstance(data, dict):
        own = data.get("ModifyIndex")
        found = own if isinstance(own, int) else 0
        return max(
            found,
            *(latest_modify_index(value) for value in data.values() if isinstance(value, dict | list)),
            0,
        )
    if isinstance(data, list):
        return max((latest_modify_index(item) for item in data), default=0)
    return 0
