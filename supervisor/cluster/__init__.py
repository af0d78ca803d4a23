"""Cluster mode: agents on many hosts form one mesh through etcd (``cluster`` config block).

``Cluster`` puts the parts together for the composition root: the catalog storage that
merges this host with the mirror of etcd (``storage.py``), and the member that keeps this
host's lease and records in etcd and the mirror current (``member.py``). Without a
``cluster`` block none of this is built and the agent is the single-host agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from supervisor.catalog.errors import Conflict, Unavailable
from supervisor.catalog.index import Index
from supervisor.catalog.intentions import Intention, IntentionFields, Intentions
from supervisor.catalog.queries import PreparedQuery, Queries
from supervisor.cluster.authority import ClusterAuthority, SealError, load_kek
from supervisor.cluster.documents import DocumentWriter, read_intentions, read_queries
from supervisor.cluster.etcd import EtcdClient, EtcdError, KeyValue, created_at, op_put
from supervisor.cluster.layout import Layout
from supervisor.cluster.leaves import ClusterLeaves
from supervisor.cluster.member import ClusterMember, Deliver, Identity, credentials_of
from supervisor.cluster.reaper import Reaper
from supervisor.cluster.records import Render, meta_record, read_index_base
from supervisor.cluster.signer import CAContext, Signer
from supervisor.cluster.state import ClusterState
from supervisor.cluster.storage import ClusterStorage
from supervisor.config.model import AgentConfig
from supervisor.connect.ca import CertificateAuthority
from supervisor.connect.leaves import LeafManager
from supervisor.state.atomic import atomic_write

__all__ = ["Cluster", "ClusterState"]

T = TypeVar("T")
log = logging.getLogger("supervisor.cluster")


class Cluster:
    def __init__(
        self, config: AgentConfig, node_id: str, index: Index, render: Render, data_dir: str | None
    ) -> None:
        cluster = config.cluster
        self.layout = Layout(cluster.key_prefix, config.datacenter)
        self.identity = Identity(config.node_name, node_id)
        self.storage = ClusterStorage(self.layout, config.node_name, index, render, self._publish)
        self.config = cluster
        self.lease_file = os.path.join(data_dir, "cluster", "lease.json") if data_dir else None
        self.member: ClusterMember | None = None
        # Writes of intentions, queries and the CA (its own connection: the sync and watch
        # threads have theirs). Made now, connected on first use.
        self.writer = DocumentWriter(EtcdClient(cluster.endpoints, credentials_of(cluster)), self.layout)
        self.authority: ClusterAuthority | None = None
        self.leaves: ClusterLeaves | None = None
        self.signer: Signer | None = None
        self._signer_task: asyncio.Task[None] | None = None
        self._reaper_task: asyncio.Task[None] | None = None
        self._base_reported = False
        self._signer_wake: asyncio.Event | None = None
        self._pending: dict[str, bytes] | None = None
        self._moved: asyncio.Event | None = None  # set by ``mirror_moved``: the mirror went forward

    def start(
        self,
        deliver: Deliver,
        on_change: Callable[[], None],
        carried: tuple[list[Intention], list[PreparedQuery]] = ([], []),
    ) -> None:
        """``on_change`` runs on the API loop after the mirror changed; ``carried``: this
        agent's intentions and queries from its single-host days, taken into the cluster
        once (at the first join), each conflict reported."""
        self.member = ClusterMember(
            self.config,
            self.layout,
            self.identity,
            self.storage,
            deliver,
            on_change,
            lease_file=self.lease_file,
        )
        if self._pending is not None:
            self.member.want(self._pending)
        if (carried[0] or carried[1]) and not self._carried_before():
            writer = self.writer
            self.member.carry = lambda: self._carry(writer, *carried)
        self.member.start()

    # -- a single-host agent's intentions and queries, into the cluster -------------------------

    def _marker(self) -> str | None:
        return os.path.join(os.path.dirname(self.lease_file), "carried.json") if self.lease_file else None

    def _carried_before(self) -> bool:
        marker = self._marker()
        if marker is None:
            return False
        try:
            with open(marker, encoding="utf-8") as handle:
                return bool(json.load(handle).get("prefix") == self.layout.root)
        except (OSError, ValueError, AttributeError):
            return False

    def _carry(
        self, writer: DocumentWriter, intentions: list[Intention], queries: list[PreparedQuery]
    ) -> None:
        """On the sync thread, right after joining. Raises EtcdError (then tried again at
        the next join); what was carried already comes back as a conflict with itself and
        is recognised as such."""
        taken, conflicts = 0, 0
        for intention in intentions:
            fields = IntentionFields(
                intention.source_name,
                intention.destination_name,
                intention.action,
                intention.description,
                intention.meta,
            )
            try:
                writer.create_intention(fields, intention.id, intention.created_at)
                taken += 1
            except Conflict as exc:
                if f"(ID {intention.id})" not in str(exc):
                    conflicts += 1
                    log.warning("kept the cluster's intention, not this agent's %s: %s", intention, exc)
        for query in queries:
            try:
                writer.create_query(query.definition, query.id)
                taken += 1
            except Conflict as exc:
                if f"(ID {query.id})" not in str(exc):
                    conflicts += 1
                    log.warning("kept the cluster's query, not this agent's %r: %s", query.name, exc)
        log.info(
            "carried %d of this agent's intentions and prepared queries into the cluster "
            "(%d conflicts; data_dir/connect keeps the single-host copies)",
            taken,
            conflicts,
        )
        marker = self._marker()
        if marker is not None:
            os.makedirs(os.path.dirname(marker), mode=0o700, exist_ok=True)
            atomic_write(marker, json.dumps({"prefix": self.layout.root}).encode(), mode=0o600)

    def _publish(self, records: dict[str, bytes]) -> None:
        if self.member is None:
            self._pending = records  # (the catalog's first publication comes before start)
        else:
            self.member.want(records)

    # -- the cluster's CA (on the API loop) -------------------------------------------------------

    def attach_ca(
        self,
        local: CertificateAuthority,
        local_leaves: LeafManager,
        config: AgentConfig,
        on_change: Callable[[], None],
    ) -> tuple[ClusterAuthority, ClusterLeaves]:
        """Called by the control plane once its own CA is up: the cluster's CA wraps it."""
        storage = self.storage
        context = CAContext(
            self.writer.client,
            self.layout,
            self.identity.node_name,
            lambda: self.member.lease if self.member is not None else 0,
            lambda: storage.mirror.kvs,
            lambda: storage.base,
            lambda: storage.records,
        )
        self.authority = ClusterAuthority(local)
        self.leaves = ClusterLeaves(context, self.authority, local_leaves, config.datacenter, on_change)
        if self.config.ca_signer:
            try:
                kek = load_kek(self.config.ca_key_file)
            except SealError as exc:
                log.error("this host cannot be a CA signer: %s", exc)
            else:
                self.signer = Signer(context, local, kek, config.ca)
                self._signer_task = asyncio.get_running_loop().create_task(
                    self._sign(), name="cluster CA signer"
                )
        self.ca_changed()
        reaper = Reaper(
            self.writer.client, self.layout, self.identity.node_name, self.config.reconnect_timeout
        )
        self._reaper_task = asyncio.get_running_loop().create_task(self._reap(reaper), name="cluster reaper")
        return self.authority, self.leaves

    async def _reap(self, reaper: Reaper) -> None:
        """Every few seconds, from a snapshot of the mirror: mark dead hosts, reap old ones."""
        interval = max(1.0, min(30.0, self.config.lease_ttl))
        while True:
            await asyncio.sleep(interval)
            if not self.storage.listed:
                continue
            snapshot = dict(self.storage.mirror.kvs)
            try:
                await asyncio.get_running_loop().run_in_executor(None, reaper.step, snapshot)
                await asyncio.get_running_loop().run_in_executor(None, self._check_base, snapshot)
            except EtcdError as exc:
                log.debug("the reaper's step failed: %s", exc)

    def _check_base(self, snapshot: dict[str, KeyValue]) -> None:
        """``meta/cluster`` holds the index base every agent uses: put it back if it was
        deleted; say so if it was changed under running agents (their indexes would differ)."""
        base = self.storage.base
        if not base:
            return
        key = self.layout.meta()
        held = snapshot.get(key)
        if held is None:
            if self.writer.client.txn([created_at(key, 0)], [op_put(key, meta_record(base))]).succeeded:
                log.warning("%s had been deleted: put the cluster's index base back", key)
            return
        theirs = read_index_base(held.value)
        if theirs != base and not self._base_reported:
            self._base_reported = True
            log.error(
                "%s holds index base %s, not the %d this agent joined with: restart this agent "
                "(clients may see indexes jump)",
                key,
                theirs or "nothing usable",
                base,
            )

    def ca_changed(self) -> None:
        if self.authority is None or self.leaves is None:
            return
        first = self.authority.cluster is None
        if self.authority.refresh(self.storage.mirror.kvs, self.layout, self.storage.base):
            log.info("the cluster's CA root is %s", self.authority.active_id)
            if first and self.authority.local_in_use():
                # Switching from this host's own CA: the cluster's roots go out first, its leaves
                # after a grace (asked for now), so no proxy sees a leaf before its root.
                log.info("moving this host's proxies to the cluster's CA")
                self.leaves.prefetch(self.leaves.local.services())
                grace = self.authority.SWITCH_GRACE
                asyncio.get_running_loop().call_later(grace, self.leaves.on_change)
            else:
                self.leaves.roots_changed()
        self.leaves.refresh()
        if self._signer_wake is not None:
            self._signer_wake.set()

    async def _sign(self) -> None:
        assert self.signer is not None
        self._signer_wake = asyncio.Event()
        while True:
            try:
                await asyncio.wait_for(self._signer_wake.wait(), 1.0)
            except TimeoutError:
                pass
            self._signer_wake.clear()
            try:
                await self.signer.step()
            except EtcdError as exc:
                log.debug("the CA signer's step failed: %s", exc)
            except Exception:  # (the signer must outlive a bug: every host depends on it)
                log.exception("internal error in the CA signer; it goes on")
                await asyncio.sleep(1.0)

    def close_ca(self) -> None:
        for task in (self._signer_task, self._reaper_task):
            if task is not None:
                task.cancel()
        if self.leaves is not None:
            self.leaves.close()

    def stop(self) -> None:
        if self.member is not None:
            self.member.stop()
        self.writer.client.close()

    # -- intentions and prepared queries (on the API loop) ---------------------------------------

    def refresh_documents(self, intentions: Intentions, queries: Queries) -> bool:
        """Hand the mirror's intentions and queries to the stores the API reads."""
        storage = self.storage
        if not storage.documents_changed:
            return False
        storage.documents_changed = False
        kvs, base = storage.mirror.kvs, storage.base
        changed = intentions.replace_all(read_intentions(kvs, self.layout, base))
        return queries.replace_all(read_queries(kvs, self.layout, base)) or changed

    def mirror_moved(self) -> None:
        member = self.member
        if member is not None and member.lease and self.storage.listed:
            if self.layout.alive(self.identity.node_name) not in self.storage.mirror.kvs:
                member.alive_gone()  # deleted by hand under a live lease
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    def seen(self, modify_index: int) -> int:
        """The etcd revision behind an index this agent handed out."""
        return modify_index - self.storage.base

    async def write(self, call: Callable[[DocumentWriter], T]) -> T:
        """Run a write on a worker thread, then wait until this agent's mirror has it (a
        client that reads back what it just wrote sees it)."""
        writer = self.writer
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, call, writer)
        except EtcdError as exc:
            raise Unavailable(f"the cluster's store (etcd) did not take the change: {exc}") from None
        revision: Any = result[1] if isinstance(result, tuple) else result
        await self._until(int(revision))
        return result

    async def _until(self, revision: int, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.storage.mirror.revision < revision:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return  # written; this agent's watch is behind (it catches up by itself)
            if self._moved is None:
                self._moved = asyncio.Event()
            try:
                await asyncio.wait_for(self._moved.wait(), remaining)
            except TimeoutError:
                return

    def leave(self) -> None:
        if self.member is not None:
            self.member.leave()

    def contact(self) -> tuple[bool, int]:
        return self.member.contact() if self.member is not None else (False, 0)

    def status(self) -> dict[str, Any]:
        if self.member is None:
            return {"State": str(ClusterState.JOINING)}
        return self.member.status()
