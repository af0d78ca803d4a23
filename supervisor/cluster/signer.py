"""The cluster's CA signer, on hosts configured with ``cluster.ca_signer``, and the leaf
requests every host makes (see ``authority.py`` for the keys and the trust model).

Both run on the API's event loop, woken by the mirror; their etcd writes go to a worker
thread. The signer holds ``ca/signer`` under its node lease; its writes are fenced by that
key's create revision.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from supervisor.catalog.errors import Unavailable
from supervisor.cluster.authority import (
    ClusterAuthority,
    SealError,
    certificate_request,
    read_roots,
    request_value,
    roots_document,
    seal,
    unseal,
)
from supervisor.cluster.etcd import EtcdClient, EtcdError, KeyValue, created_at, op_delete, op_put
from supervisor.cluster.layout import Kind, Layout
from supervisor.cluster.records import BadRecord, decode, encode, read_instance
from supervisor.config.model import CAConfig
from supervisor.connect.ca import CertificateAuthority, Leaf, Root, _config_hash
from supervisor.connect.leaves import LeafManager
from supervisor.connect.spiffe import service_id

log = logging.getLogger("supervisor.cluster.ca")

REQUEST_PATIENCE = 60.0  # seconds an unanswered leaf request is waited for before it is made again
LeaseOf = Callable[[], int]  # this host's node lease (0: not joined)


@dataclass
class _Context:
    """What the signer and the leaf requests share."""

    client: EtcdClient
    layout: Layout
    node: str
    lease: LeaseOf
    kvs: Callable[[], dict[str, KeyValue]]
    base: Callable[[], int]


async def _blocking(call: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, call)


class Signer:
    def __init__(
        self, context: _Context, local: CertificateAuthority, kek: bytes, ca_config: CAConfig
    ) -> None:
        self.context = context
        self.local = local
        self.kek = kek
        self.ca_config = ca_config
        self.ca: CertificateAuthority | None = None  # the cluster's, with keys (while signing)
        self._loaded_at = -1  # the ca/roots revision self.ca was built from
        self._signing = False
        self._answered: set[str] = set()
        self._broken: str = ""

    async def step(self) -> None:
        context = self.context
        kvs = context.kvs()
        lease = context.lease()
        if not lease:
            return
        holder = kvs.get(context.layout.ca_signer())
        if holder is None:
            await self._campaign(lease)
            return
        ours = holder.lease == lease and _json(holder.value).get("node") == context.node
        if not ours:
            if self._signing:
                log.warning(
                    "cluster: this host is no longer the CA signer (%s is)", _json(holder.value).get("node")
                )
            self._signing, self.ca = False, None
            return
        if not self._signing:
            self._signing = True
            log.info("cluster: this host is the CA signer now")
        fence = holder.create_revision
        roots = kvs.get(context.layout.ca_roots())
        if roots is None:
            await self._bootstrap(fence)
            return
        ca = self._load(roots, kvs)
        if ca is None:
            return
        if self.ca_config.private_key and _config_hash(self.ca_config) != ca.active.config_hash:
            message = ca.apply(self.ca_config)
            await self._publish(ca, fence)
            log.warning("cluster: %s", message or "CA root rotated")
            return
        requests = [kv for key, kv in kvs.items() if key.startswith(context.layout.ca_requests())]
        self._answered &= {kv.key for kv in requests}  # (answered requests are deleted by their host)
        for kv in requests:
            await self._answer(ca, kv, kvs, fence)

    # -- holding the signer key ----------------------------------------------------------------

    async def _campaign(self, lease: int) -> None:
        key = self.context.layout.ca_signer()
        value = encode({"node": self.context.node})
        await _blocking(lambda: self.context.client.txn([created_at(key, 0)], [op_put(key, value, lease)]))

    def _fenced(
        self, fence: int, ops: list[dict[str, Any]], extra: list[dict[str, Any]] | None = None
    ) -> bool:
        compare = [created_at(self.context.layout.ca_signer(), fence), *(extra or [])]
        result = self.context.client.txn(compare, ops)
        if not result.succeeded:
            log.warning("cluster: a CA write was refused: this host is no longer the signer (or raced)")
        return result.succeeded

    # -- the roots -----------------------------------------------------------------------------

    async def _bootstrap(self, fence: int) -> None:
        """No cluster CA yet: this host's own becomes it (its proxies keep their leaves)."""
        layout, local = self.context.layout, self.local
        ops = [op_put(layout.ca_roots(), encode(roots_document(local)))]
        ops += [op_put(layout.ca_key(root.id), self._sealed(root)) for root in local.roots]
        guard = [created_at(layout.ca_roots(), 0)]
        if await _blocking(lambda: self._fenced(fence, ops, guard)):
            log.info(
                "cluster: published this host's CA as the cluster's (trust domain %s)", local.trust_domain
            )

    async def _publish(self, ca: CertificateAuthority, fence: int) -> None:
        layout = self.context.layout
        ops = [op_put(layout.ca_roots(), encode(roots_document(ca)))]
        ops += [op_put(layout.ca_key(root.id), self._sealed(root)) for root in ca.roots]
        await _blocking(lambda: self._fenced(fence, ops))
        self._loaded_at = -1

    def _sealed(self, root: Root) -> str:
        pem = root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return seal(self.kek, pem, root.id)

    def _load(self, roots_kv: KeyValue, kvs: dict[str, KeyValue]) -> CertificateAuthority | None:
        if self.ca is not None and self._loaded_at == roots_kv.mod_revision:
            return self.ca
        published = read_roots(roots_kv, 0)
        if published is None:
            return None
        ca = CertificateAuthority(
            None, self.local.datacenter, lambda: 1, self.ca_config.leaf_cert_ttl, published.cluster_id
        )
        try:
            for root in published.roots:
                sealed = kvs.get(self.context.layout.ca_key(root.id))
                if sealed is None:
                    raise SealError(f"no sealed key for root {root.id} in etcd")
                key = serialization.load_pem_private_key(
                    unseal(self.kek, sealed.value.decode(), root.id), None
                )
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise SealError(f"the key of root {root.id} is not an EC key")
                ca.roots.append(
                    Root(
                        root.cert,
                        key,
                        root.active,
                        root.source,
                        root.config_hash,
                        0,
                        0,
                        root.cross_signed,
                        root.last_leaf_expiry,
                    )
                )
        except (SealError, ValueError) as exc:
            if str(exc) != self._broken:
                self._broken = str(exc)
                log.error("cluster: this host cannot sign: %s", exc)
            return None
        self.ca, self._loaded_at, self._broken = ca, roots_kv.mod_revision, ""
        return ca

    # -- leaf requests -----------------------------------------------------------------------

    async def _answer(
        self, ca: CertificateAuthority, request: KeyValue, kvs: dict[str, KeyValue], fence: int
    ) -> None:
        layout = self.context.layout
        node, _, request_id = request.key[len(layout.ca_requests()) :].partition("/")
        issued = layout.ca_issued(node, request_id)
        if issued in kvs or request.key in self._answered:
            return
        alive = kvs.get(layout.alive(node))
        if alive is None or not alive.lease:
            return  # the asking host is gone; its request goes with its lease
        try:
            answer = {"cert": self._certify(ca, node, request, kvs)}
        except BadRecord as exc:
            answer = {"error": str(exc)}
            log.warning("cluster: refused the leaf request %s of host %s: %s", request_id, node, exc)
        self._answered.add(request.key)
        ops = [op_put(issued, encode(answer), alive.lease)]
        await _blocking(lambda: self._fenced(fence, ops))

    def _certify(
        self, ca: CertificateAuthority, node: str, request: KeyValue, kvs: dict[str, KeyValue]
    ) -> str:
        value = decode(request.value)
        service = str(value.get("service", ""))
        if not service or not _registered_on(self.context.layout, kvs, node, service):
            raise BadRecord(f"service {service!r} is not registered on host {node}")
        try:
            csr = x509.load_pem_x509_csr(str(value.get("csr", "")).encode())
        except ValueError as exc:
            raise BadRecord(f"not a CSR: {exc}") from None
        public = csr.public_key()
        if not csr.is_signature_valid or not isinstance(public, ec.EllipticCurvePublicKey):
            raise BadRecord("the CSR is not signed by an EC key of its own")
        cert, chain = ca.certify(service, public)
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (cert, *chain))


def _registered_on(layout: Layout, kvs: dict[str, KeyValue], node: str, service: str) -> bool:
    """``service`` runs on ``node``: an instance of it, or a proxy for it, is registered there."""
    prefix = layout.services(node)
    for key, kv in kvs.items():
        if not key.startswith(prefix):
            continue
        try:
            instance = read_instance(decode(kv.value), key[len(prefix) :])
        except BadRecord:
            continue
        if service in (instance.name, instance.connect_target):
            return True
    return False


# -- leaves for this host's services ----------------------------------------------------------


@dataclass
class _Pending:
    service: str
    key: ec.EllipticCurvePrivateKey
    done: asyncio.Future[Leaf] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    asked: float = field(default_factory=time.monotonic)

    def stale(self) -> bool:
        """Unanswered for long: its key may have gone with a lease etcd lost, ask again."""
        return time.monotonic() - self.asked > REQUEST_PATIENCE


class ClusterLeaves:
    """The LeafManager of cluster mode: leaves from the cluster's signer, asked for with a
    CSR (the key never leaves this host). Until the cluster has a CA, the local one's."""

    RENEW_AT = (0.45, 0.55)  # of the lifetime: early, so a signer outage of ~a day is invisible

    def __init__(
        self,
        context: _Context,
        authority: ClusterAuthority,
        local: LeafManager,
        datacenter: str,
        on_change: Callable[[], None],
    ) -> None:
        self.context = context
        self.authority = authority
        self.local = local
        self.datacenter = datacenter
        self.on_change = on_change
        self.leaves: dict[str, Leaf] = {}
        self._issued_by: dict[str, str] = {}  # service -> the active root ID when it was issued
        self._pending: dict[str, _Pending] = {}  # request ID -> what was asked
        self._renewals: dict[str, asyncio.TimerHandle] = {}
        self.rng = random.Random()

    def get(self, service: str) -> Leaf:
        """The leaf to serve now. During a switch from this host's own CA (while leaves it
        signed are alive, its root stays trusted), its leaves until the cluster's roots have
        reached every proxy and a cluster leaf is here."""
        authority = self.authority
        if authority.cluster is None:
            return self.local.get(service)
        leaf = self.leaves.get(service)
        switching = authority.local_in_use()
        if leaf is not None and (not switching or authority.settled()):
            return leaf
        if switching:
            return self.local.get(service)
        raise Unavailable(f"no leaf certificate for {service} yet: the cluster's CA signer has not answered")

    async def ensure(self, service: str, timeout: float = 15.0) -> None:
        """Have a current leaf for ``service`` (asks the signer and waits for it if not)."""
        authority = self.authority
        if authority.cluster is None:
            return
        leaf = self.leaves.get(service)
        current = (
            leaf is not None
            and self._issued_by.get(service) == authority.active_id
            and leaf.valid_before > time.time()
        )
        if current:
            return
        for request_id, waiting in list(self._pending.items()):
            if waiting.service == service and waiting.stale():
                del self._pending[request_id]
        pending = next((p for p in self._pending.values() if p.service == service), None)
        if pending is None:
            pending = await self._request(service)
        if authority.local_in_use():
            return  # (this host's own leaf is served meanwhile; the answer wakes the waiters)
        try:
            await asyncio.wait_for(asyncio.shield(pending.done), timeout)
        except TimeoutError:
            raise Unavailable(
                f"no leaf certificate for {service}: no CA signer answered within {timeout:.0f}s "
                "(is a host with cluster.ca_signer up?)"
            ) from None

    def prefetch(self, services: list[str]) -> None:
        """Ask for cluster leaves for these services now (a switch has begun)."""
        for service in services:
            if service not in self.leaves and not any(p.service == service for p in self._pending.values()):
                asyncio.get_running_loop().create_task(self._quiet_request(service), name=f"leaf {service}")

    async def _quiet_request(self, service: str) -> None:
        try:
            await self._request(service)
        except Unavailable as exc:
            log.warning("cluster: %s", exc)

    async def _request(self, service: str) -> _Pending:
        lease = self.context.lease()
        if not lease:
            raise Unavailable("this host has not joined the cluster yet; try again in a moment")
        key = ec.generate_private_key(ec.SECP256R1())
        request_id = uuid.uuid4().hex
        pending = _Pending(service, key)
        self._pending[request_id] = pending
        where = self.context.layout.ca_request(self.context.node, request_id)
        value = request_value(certificate_request(key, service), service)
        try:
            await _blocking(lambda: self.context.client.put(where, value, lease))
        except EtcdError as exc:
            self._pending.pop(request_id, None)
            raise Unavailable(f"cannot ask the cluster for a leaf for {service}: {exc}") from None
        return pending

    def refresh(self) -> None:
        """After the mirror moved: take issued leaves; renew all after a root change."""
        context = self.context
        kvs = context.kvs()
        for request_id, pending in list(self._pending.items()):
            answer = kvs.get(context.layout.ca_issued(context.node, request_id))
            if answer is None:
                continue
            del self._pending[request_id]
            self._forget_request(request_id)
            try:
                value = decode(answer.value)
                if "error" in value:
                    raise BadRecord(str(value["error"]))
                leaf = self._leaf(pending, str(value["cert"]), context.base() + answer.mod_revision)
            except (BadRecord, KeyError, ValueError) as exc:
                log.error("cluster: the signer refused a leaf for %s: %s", pending.service, exc)
                if not pending.done.done():
                    pending.done.set_exception(
                        Unavailable(f"the CA signer refused a leaf for {pending.service}: {exc}")
                    )
                    pending.done.exception()  # (retrieved: waiters see it, nobody else needs to)
                continue
            self.leaves[pending.service] = leaf
            self._issued_by[pending.service] = self.authority.active_id
            self._schedule_renewal(pending.service, leaf)
            if not pending.done.done():
                pending.done.set_result(leaf)
            log.info("cluster: leaf for %s issued by the cluster's CA", pending.service)
            self.on_change()

    def roots_changed(self) -> None:
        for service in list(self.leaves):
            asyncio.get_running_loop().create_task(self._renew(service), name=f"leaf {service}")

    def _leaf(self, pending: _Pending, chain_pem: str, index: int) -> Leaf:
        certs = x509.load_pem_x509_certificates(chain_pem.encode())
        if not certs:
            raise BadRecord("no certificate")
        uri = service_id(self.authority.trust_domain, self.datacenter, pending.service).uri
        return Leaf(pending.service, uri, certs[0], pending.key, tuple(certs[1:]), index)

    def _forget_request(self, request_id: str) -> None:
        layout, node = self.context.layout, self.context.node
        ops = [op_delete(layout.ca_request(node, request_id)), op_delete(layout.ca_issued(node, request_id))]
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, _quietly, lambda: self.context.client.txn([], ops))

    def _schedule_renewal(self, service: str, leaf: Leaf) -> None:
        previous = self._renewals.pop(service, None)
        if previous is not None:
            previous.cancel()
        lifetime = leaf.valid_before - leaf.valid_after
        when = leaf.valid_after + lifetime * self.rng.uniform(*self.RENEW_AT)
        loop = asyncio.get_running_loop()
        self._renewals[service] = loop.call_later(
            max(0.0, when - time.time()), lambda: loop.create_task(self._renew(service))
        )

    async def _renew(self, service: str) -> None:
        try:
            await self.ensure_new(service)
        except Unavailable as exc:
            log.warning("cluster: renewing the leaf of %s failed (%s); the current one is kept", service, exc)

    async def ensure_new(self, service: str) -> None:
        pending = await self._request(service)
        await asyncio.wait_for(asyncio.shield(pending.done), 60)

    def close(self) -> None:
        for handle in self._renewals.values():
            handle.cancel()


def _quietly(call: Callable[[], Any]) -> None:
    try:
        call()
    except EtcdError as exc:
        log.debug("cluster: cleaning up a leaf request failed: %s", exc)


def _json(data: bytes) -> dict[str, Any]:
    try:
        return decode(data)
    except BadRecord:
        return {}


__all__ = ["ClusterLeaves", "Kind", "Signer", "_Context"]
