"""This agent as a member of the cluster: its lease and ``alive/`` key, anti-entropy of its
records, and the watch that keeps the mirror current. Two threads, blocking on etcd; the
API's loop only receives finished results (``deliver``), and nothing here is on the path
that starts, adopts or restarts a proxy.

* ``cluster-sync``: joins (the cluster's index base, a lease -- the one kept in data_dir
  if it is still alive, so a restarted agent does not blink -- the node's records), then
  keeps the lease alive every TTL/3 and writes what changed locally; a full sync (delete
  what this agent does not know under its name) at join, on every reconnect and every
  minute.
* ``cluster-watch``: lists the datacenter's keys once, then follows one watch; a watch
  cancelled by compaction lists again (the mirror's diff moves nothing that did not
  change).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from supervisor.cluster.deferral import OutputDeferral
from supervisor.cluster.etcd import (
    MAX_TXN_OPS,
    Credentials,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    Event,
    KeyValue,
    created_at,
    loads,
    op_delete,
    op_put,
    op_range,
)
from supervisor.cluster.etcdwatch import Watch
from supervisor.cluster.layout import Layout
from supervisor.cluster.records import encode, meta_record, read_index_base
from supervisor.cluster.secretfile import read_secret_file
from supervisor.cluster.state import ClusterState, MemberHealth
from supervisor.cluster.storage import ClusterStorage
from supervisor.config.model import ClusterConfig
from supervisor.state.atomic import atomic_write

log = logging.getLogger("supervisor.cluster")

FULL_SYNC_INTERVAL = 60.0
BASE_MARGIN = 10**12  # the cluster's indexes start this far above the wall clock in ms
RETRY_MIN, RETRY_MAX = 0.2, 5.0
# etcd refuses requests over --max-request-bytes (1.5 MiB by default), and the gateway sends
# keys and values in base64 (4/3 larger): a transaction carries at most this much raw data.
MAX_TXN_BYTES = 1024 * 1024
MAX_RECORD_BYTES = MAX_TXN_BYTES - 4096

Deliver = Callable[[Callable[[], None]], None]  # run on the API's loop


class NodeConflict(EtcdError):
    """Another live agent holds this node name."""


@dataclass(frozen=True)
class Identity:
    node_name: str
    node_id: str


def credentials_of(config: ClusterConfig) -> Credentials:
    password = ""
    if config.password_file:
        try:
            password = read_secret_file(config.password_file).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise EtcdError(f"cluster.password_file {config.password_file} is not UTF-8 text") from None
        except OSError as exc:
            raise EtcdError(
                f"cannot read cluster.password_file {config.password_file}: {exc.strerror}"
            ) from exc
    return Credentials(config.ca_file, config.cert_file, config.key_file, config.username, password)


class ClusterMember:
    def __init__(
        self,
        config: ClusterConfig,
        layout: Layout,
        identity: Identity,
        storage: ClusterStorage,
        deliver: Deliver,
        on_change: Callable[[], None],
        *,
        lease_file: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.layout = layout
        self.identity = identity
        self.storage = storage
        self.deliver = deliver
        self.on_change = on_change
        self.lease_file = lease_file
        self.clock = clock
        credentials = credentials_of(config)
        # A member that hangs (restarting, cut off) must cost less than the lease's life
        # before the next one is asked: a quarter of the TTL per try, at most 5 s.
        self.client = EtcdClient(
            config.endpoints, credentials, timeout=min(5.0, max(0.5, config.lease_ttl / 4))
        )
        self.watch_client = EtcdClient(config.endpoints, credentials)
        self.health = MemberHealth(since=clock())
        self._health_lock = threading.Lock()
        self.lease = 0
        self.base = 0
        self._joined = threading.Event()
        self._alive_missing = threading.Event()  # the mirror saw our alive/ key deleted
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._desired: dict[str, bytes] = {}
        self._desired_lock = threading.Lock()
        self._written: dict[str, bytes] | None = None  # what etcd holds under our name (None: unknown)
        own_checks = layout.checks(identity.node_name)
        self._deferral = OutputDeferral(config.check_update_interval, lambda key: key.startswith(own_checks))
        self._deferred_due: float | None = None  # when check output held back is to be written
        self._too_large: dict[str, int] = {}  # records too large for etcd (warned once per size)
        self._watch: Watch | None = None
        self._threads: list[threading.Thread] = []
        self.carry: Callable[[], None] | None = None  # once, after the first join (see Cluster)

    # -- the agent's side ------------------------------------------------------------------

    def start(self) -> None:
        log.info(
            "joining through %s as node %s",
            ", ".join(self.config.endpoints),
            self.identity.node_name,
        )
        for name, target in (("cluster-sync", self._run_sync), ("cluster-watch", self._run_watch)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def want(self, records: dict[str, bytes]) -> None:
        """This host's records now (from the API loop): written as soon as etcd takes them."""
        with self._desired_lock:
            self._desired = dict(records)
        self._wake.set()

    def stop(self) -> None:
        """Stop following the cluster; this host's records and lease stay (a restarted
        agent takes its lease back, so its instances do not blink)."""
        self._stop.set()
        self._wake.set()
        watch = self._watch
        if watch is not None:
            watch.close()
        for thread in self._threads:
            thread.join(10)
        self.client.close()
        self.watch_client.close()

    def leave(self) -> None:
        """Deregister this host at once: its records and its lease go (raises EtcdError)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.name == "cluster-sync":
                thread.join(10)
        node = self.identity.node_name
        ops = [op_delete(self.layout.node(node))]
        ops += [op_delete(prefix, prefix=True) for prefix in self.layout.own(node)[1:]]
        ops.append(op_delete(self.layout.alive(node)))
        self.client.txn([], ops)
        if self.lease:
            self.client.revoke(self.lease)
        self._forget_lease()
        with self._health_lock:
            log.info("%s", self.health.left(self.clock()))

    def status(self) -> dict[str, Any]:
        now = self.clock()
        with self._health_lock:
            health = self.health
            return {
                "State": str(health.state),
                "Since": round(now - health.since, 3),
                "Error": health.error,
                "LastContactMs": health.contact_ms(now),
                "Endpoints": list(self.config.endpoints),
                "Lease": f"{self.lease:x}" if self.lease else "",
                "IndexBase": self.base,
                "Revision": self.storage.mirror.revision,
                "KeyPrefix": self.layout.root,
            }

    def contact(self) -> tuple[bool, int]:
        """(whether the cluster is reachable, milliseconds since it last answered)."""
        with self._health_lock:
            return self.health.known_leader(), self.health.contact_ms(self.clock())

    @property
    def state(self) -> ClusterState:
        return self.health.state

    # -- outcomes ----------------------------------------------------------------------------

    def _reached(self) -> None:
        with self._health_lock:
            message = self.health.reached(self.clock())
        if message:
            log.info("%s", message)

    def _failed(self, exc: BaseException) -> None:
        with self._health_lock:
            message = self.health.failed(self.clock(), str(exc))
        if message:
            log.warning("%s", message)

    # -- cluster-sync ------------------------------------------------------------------------

    def _run_sync(self) -> None:
        retry = RETRY_MIN
        next_renewal = next_full = 0.0
        while not self._stop.is_set():
            try:
                if not self.lease:
                    self._join()
                    next_renewal = self.clock() + self._renew_every()
                    next_full = self.clock() + FULL_SYNC_INTERVAL
                now = self.clock()
                if now >= next_renewal:
                    self._renew()
                    next_renewal = now + self._renew_every()
                if self._alive_missing.is_set():
                    self._alive_missing.clear()
                    lease = self.lease
                    self._renew()  # (an expired lease: joining again puts alive/ back itself)
                    if self.lease == lease:
                        self._keep_alive_key()
                full = now >= next_full or self._written is None
                self._sync(full=full)
                if full:
                    next_full = now + FULL_SYNC_INTERVAL
                self._reached()
                retry = RETRY_MIN
                wait = min(next_renewal, next_full, self._deferred_due or next_full) - self.clock()
                self._wake.wait(max(0.0, wait))
                self._wake.clear()
            except EtcdError as exc:
                self._failed(exc)
                self._written = None  # (after an outage: a full sync)
                # Never longer than the renewal interval: a refused write must not cost the lease.
                self._stop.wait(min(retry, self._renew_every()))
                retry = min(retry * 2, RETRY_MAX)
            except Exception as exc:
                log.exception("internal error in the sync thread; retrying")
                self._failed(exc)
                self._stop.wait(RETRY_MAX)

    def _renew_every(self) -> float:
        return max(0.5, self.config.lease_ttl / 3)

    def _join(self) -> None:
        self.base = self._index_base()
        base = self.base
        self.deliver(lambda: self.storage.set_base(base))
        self.lease = self._take_lease()
        node = self.identity.node_name
        alive = self.layout.alive(node)
        value = encode({"node_id": self.identity.node_id, "pid": os.getpid()})
        back = op_delete(self.layout.tombstone(node))  # (seen dead before: not any more)
        result = self.client.txn(
            [created_at(alive, 0)],
            [op_put(alive, value, self.lease), back],
            [op_range(alive)],
        )
        if not result.succeeded:
            held = result.ranged(0)
            if held and held[0].lease != self.lease:
                owner = loads(held[0].value).get("node_id", "")
                if owner != self.identity.node_id:
                    self.client.revoke(self.lease)  # (taken for nothing: not kept, not leaked)
                    self._forget_lease()
                    self.lease = 0
                    raise NodeConflict(
                        f"node name {node!r} is taken by a live agent with node ID {owner}; "
                        "give this host another node_name"
                    )
            self.client.put(alive, value, self.lease)  # ours from before a restart: under this lease now
        self._written = None
        if self.carry is not None:
            try:
                self.carry()
            except EtcdError as exc:  # (e.g. a host role that may not write intentions)
                log.warning(
                    "could not carry this agent's intentions and queries into the cluster (%s); "
                    "they stay in data_dir/connect, and the next start tries again",
                    exc,
                )
            self.carry = None
        self._joined.set()

    def _index_base(self) -> int:
        """The cluster's index base: written once by the first agent. It is 10^12 above the
        wall clock in milliseconds -- single-host agents' indexes start from the wall clock,
        so an agent that joins years later still never sees an index go backwards. Read
        first and written only when missing: a host whose etcd role may only read it joins."""
        key = self.layout.meta()
        held, _, _ = self.client.range(key)
        if not held:
            proposed = max(int(time.time() * 1000) + BASE_MARGIN, self.storage.index.value + 1)
            result = self.client.txn(
                [created_at(key, 0)], [op_put(key, meta_record(proposed))], [op_range(key)]
            )
            if result.succeeded:
                log.info("created the cluster under %s (index base %d)", self.layout.root, proposed)
                return proposed
            held = result.ranged(0)
        base = read_index_base(held[0].value) if held else 0
        if not base:
            raise EtcdError(
                f"{key} in etcd holds no usable index_base; restore it from a backup "
                f"(or, for a new cluster, delete {self.layout.root} and restart the agents)"
            )
        return base

    def _take_lease(self) -> int:
        kept = self._kept_lease()
        if kept and self.client.keepalive(kept) > 0:
            log.info("took back lease %x (this host's instances stayed registered)", kept)
            return kept
        lease, _ttl = self.client.grant(max(2, round(self.config.lease_ttl)))
        self._save_lease(lease)
        return lease

    def _renew(self) -> None:
        if self._keepalive_anywhere():
            return
        log.warning("lease %x had expired (not renewed within lease_ttl); joining again", self.lease)
        self.lease = 0
        self._join()

    def _keepalive_anywhere(self) -> bool:
        if self.client.keepalive(self.lease) > 0:
            return True
        # A member that has just restarted may not know the lease yet: only when every member
        # says it has expired has it (joining again re-creates alive/: a blink elsewhere).
        for _ in range(len(self.config.endpoints) - 1):
            self.client.rotate()
            if self.client.keepalive(self.lease) > 0:
                return True
        return False

    def alive_gone(self) -> None:
        """The mirror saw this host's ``alive/`` key go while the lease lives (from the API
        loop): the sync thread puts it back."""
        self._alive_missing.set()
        self._wake.set()

    def _keep_alive_key(self) -> None:
        """Put ``alive/`` back (only if it is still missing: the create is guarded)."""
        node = self.identity.node_name
        alive = self.layout.alive(node)
        value = encode({"node_id": self.identity.node_id, "pid": os.getpid()})
        back = op_delete(self.layout.tombstone(node))
        result = self.client.txn([created_at(alive, 0)], [op_put(alive, value, self.lease), back])
        if result.succeeded:
            log.warning("alive/%s had been deleted under a live lease: put it back", node)

    def _sync(self, *, full: bool) -> None:
        with self._desired_lock:
            desired = dict(self._desired)
        if not desired:
            return  # (the catalog has not published yet)
        if full or self._written is None:
            written = self._read_own()
        else:
            written = self._written
        desired, self._deferred_due = self._deferral.select(desired, written, self.clock())
        for key in [key for key, value in desired.items() if len(key) + len(value) > MAX_RECORD_BYTES]:
            size = len(desired.pop(key))
            if self._too_large.get(key) != size:
                self._too_large[key] = size
                log.warning(
                    "%s is not published to the cluster: its record is %d bytes, more than etcd "
                    "takes in one request; this host keeps serving it locally",
                    key[len(self.layout.root) :],
                    size,
                )
        for batch in _batches(
            [(key, value) for key, value in desired.items() if written.get(key) != value],
            [key for key in written if key not in desired],
        ):
            self.client.txn([], batch)
        self._deferral.written()
        self._written = desired

    def _read_own(self) -> dict[str, bytes]:
        node = self.identity.node_name
        found: dict[str, bytes] = {}
        kvs, _, _ = self.client.range(self.layout.node(node))
        found.update((kv.key, kv.value) for kv in kvs)
        for prefix in self.layout.own(node)[1:]:
            kvs, _ = self.client.range_all(prefix)
            found.update((kv.key, kv.value) for kv in kvs)
        return found

    # -- the lease file -----------------------------------------------------------------------

    def _kept_lease(self) -> int:
        if self.lease_file is None:
            return 0
        try:
            with open(self.lease_file, encoding="utf-8") as handle:
                data = json.load(handle)
            if data.get("node_id") == self.identity.node_id and data.get("prefix") == self.layout.root:
                return int(data.get("lease", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return 0

    def _save_lease(self, lease: int) -> None:
        if self.lease_file is None:
            return
        body = {"lease": lease, "node_id": self.identity.node_id, "prefix": self.layout.root}
        try:
            os.makedirs(os.path.dirname(self.lease_file), mode=0o700, exist_ok=True)
            atomic_write(self.lease_file, json.dumps(body).encode(), mode=0o600)
        except OSError as exc:
            log.warning("cannot keep the lease in %s (%s): a restart will blink", self.lease_file, exc)

    def _forget_lease(self) -> None:
        if self.lease_file is not None:
            try:
                os.unlink(self.lease_file)
            except OSError:
                pass

    # -- cluster-watch -------------------------------------------------------------------------

    def _run_watch(self) -> None:
        start, listed = 0, False
        retry = RETRY_MIN
        while not self._stop.is_set():
            if not self._joined.wait(0.5):
                continue
            try:
                if not listed:
                    kvs, revision = self.watch_client.range_all(self.layout.root)
                    self.deliver(functools.partial(self._reset, kvs, revision))
                    start, listed = revision + 1, True
                watch = self._watch = Watch(self.watch_client, self.layout.root, start)
                if self._stop.is_set():
                    break
                for message in watch.messages():
                    if message.events:
                        events = message.events
                        self.deliver(functools.partial(self._apply, events, message.revision))
                        start = max(start, max(event.kv.mod_revision for event in events) + 1)
                    elif not message.created:
                        start = max(start, message.revision + 1)  # a progress notice: nothing missed
                    self._reached()
                    retry = RETRY_MIN
            except EtcdCompacted:
                log.info("the watch fell behind etcd's compaction; listing the cluster again")
                listed = False
            except EtcdError as exc:
                if self._stop.is_set():
                    break
                self._failed(exc)
                self._stop.wait(retry)
                retry = min(retry * 2, RETRY_MAX)
            except Exception:
                log.exception("internal error in the watch thread; listing again")
                listed = False
                self._stop.wait(RETRY_MAX)

    def _reset(self, kvs: list[KeyValue], revision: int) -> None:
        if self.storage.mirror_reset(kvs, revision):
            self.on_change()

    def _apply(self, events: tuple[Event, ...], revision: int) -> None:
        if self.storage.mirror_apply(events, revision):
            self.on_change()


def _batches(puts: list[tuple[str, bytes]], deletes: list[str]) -> Iterator[list[dict[str, Any]]]:
    """The writes in transactions etcd takes: at most MAX_TXN_OPS operations and
    MAX_TXN_BYTES of keys and values each."""
    batch: list[dict[str, Any]] = []
    size = 0
    for op, weight in [
        *((op_put(k, v), len(k) + len(v)) for k, v in puts),
        *((op_delete(k), len(k)) for k in deletes),
    ]:
        if batch and (len(batch) == MAX_TXN_OPS or size + weight > MAX_TXN_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(op)
        size += weight + 64  # (each operation's own JSON)
    if batch:
        yield batch
