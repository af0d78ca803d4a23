"""The cluster's CA signer, on hosts configured with ``cluster.ca_signer``, and the leaf
requests every host makes (see ``authority.py`` for the keys and the trust model).

Both run on the API's event loop, woken by the mirror; their etcd writes go to a worker
thread. The signer holds ``ca/signer`` under its node lease; its writes are fenced by that
key's create revision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from supervisor.cluster.authority import (
    SealError,
    read_roots,
    roots_document,
    seal,
    unseal,
)
from supervisor.cluster.etcd import EtcdClient, KeyValue, created_at, loads, modified_at, op_delete, op_put
from supervisor.cluster.layout import Layout
from supervisor.cluster.records import BadRecord, decode, encode, read_instance
from supervisor.config.model import CAConfig
from supervisor.connect.ca import CertificateAuthority, Root, config_hash

log = logging.getLogger("supervisor.cluster")

LeaseOf = Callable[[], int]  # this host's node lease (0: not joined)


@dataclass
class CAContext:
    """What the signer and the leaf requests share."""

    client: EtcdClient
    layout: Layout
    node: str
    lease: LeaseOf
    kvs: Callable[[], dict[str, KeyValue]]
    base: Callable[[], int]
    own_records: Callable[[], dict[str, bytes]] = dict  # this host's records as it publishes them


async def blocking(call: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, call)


class Signer:
    def __init__(
        self, context: CAContext, local: CertificateAuthority, kek: bytes, ca_config: CAConfig
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
        if not holder.lease:
            # Written by hand, without a lease: it would never go, and nobody would sign again.
            key, seen = context.layout.ca_signer(), holder.mod_revision
            await blocking(lambda: context.client.txn([modified_at(key, seen)], [op_delete(key)]))
            log.warning("removed %s, which held no lease (a signer must hold it under its host's lease)", key)
            return
        ours = holder.lease == lease and loads(holder.value).get("node") == context.node
        if not ours:
            if self._signing:
                log.warning("this host is no longer the CA signer (%s is)", loads(holder.value).get("node"))
            self._signing, self.ca = False, None
            return
        if not self._signing:
            self._signing = True
            log.info("this host is the CA signer now")
        fence = holder.create_revision
        roots = kvs.get(context.layout.ca_roots())
        if roots is None:
            await self._bootstrap(fence)
            return
        ca = self._load(roots, kvs)
        if ca is None:
            return
        if self.ca_config.private_key and config_hash(self.ca_config) != ca.active.config_hash:
            message = ca.apply(self.ca_config)
            await self._publish(ca, fence)
            log.warning("%s", message or "CA root rotated")
            return
        requests = [kv for key, kv in kvs.items() if key.startswith(context.layout.ca_requests())]
        self._answered &= {kv.key for kv in requests}  # (answered requests are deleted by their host)
        for kv in requests:
            await self._answer(ca, kv, kvs, fence)

    # -- holding the signer key ----------------------------------------------------------------

    async def _campaign(self, lease: int) -> None:
        key = self.context.layout.ca_signer()
        value = encode({"node": self.context.node})
        await blocking(lambda: self.context.client.txn([created_at(key, 0)], [op_put(key, value, lease)]))

    def _fenced(
        self, fence: int, ops: list[dict[str, Any]], extra: list[dict[str, Any]] | None = None
    ) -> bool:
        compare = [created_at(self.context.layout.ca_signer(), fence), *(extra or [])]
        result = self.context.client.txn(compare, ops)
        if not result.succeeded:
            log.warning("a CA write was refused: this host is no longer the signer (or raced)")
        return result.succeeded

    # -- the roots -----------------------------------------------------------------------------

    async def _bootstrap(self, fence: int) -> None:
        """No cluster CA yet: this host's own becomes it (its proxies keep their leaves)."""
        layout, local = self.context.layout, self.local
        ops = [op_put(layout.ca_roots(), encode(roots_document(local)))]
        ops += [op_put(layout.ca_key(root.id), self._sealed(root)) for root in local.roots]
        guard = [created_at(layout.ca_roots(), 0)]
        if await blocking(lambda: self._fenced(fence, ops, guard)):
            log.info("published this host's CA as the cluster's (trust domain %s)", local.trust_domain)

    async def _publish(self, ca: CertificateAuthority, fence: int) -> None:
        layout = self.context.layout
        ops = [op_put(layout.ca_roots(), encode(roots_document(ca)))]
        ops += [op_put(layout.ca_key(root.id), self._sealed(root)) for root in ca.roots]
        await blocking(lambda: self._fenced(fence, ops))
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
                log.error("this host cannot sign: %s", exc)
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
            log.warning("refused the leaf request %s of host %s: %s", request_id, node, exc)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the signing of the others
            answer = {"error": f"cannot sign it: {type(exc).__name__}"}
            log.warning("cannot sign the leaf request %s of host %s: %s", request_id, node, exc)
        self._answered.add(request.key)
        ops = [op_put(issued, encode(answer), alive.lease)]
        await blocking(lambda: self._fenced(fence, ops))

    def _certify(
        self, ca: CertificateAuthority, node: str, request: KeyValue, kvs: dict[str, KeyValue]
    ) -> str:
        value = decode(request.value)
        service = str(value.get("service", ""))
        if not service or not registered_on(self.context.layout, mirror_values(kvs), node, service):
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


def registered_on(layout: Layout, records: Iterable[tuple[str, bytes]], node: str, service: str) -> bool:
    """``service`` runs on ``node``: an instance of it, or a proxy for it, is registered
    there (``records``: keys and values, from the mirror or this host's own)."""
    prefix = layout.services(node)
    for key, value in records:
        if not key.startswith(prefix):
            continue
        try:
            instance = read_instance(decode(value), key[len(prefix) :])
        except BadRecord:
            continue
        if service in (instance.name, instance.connect_target):
            return True
    return False


def mirror_values(kvs: dict[str, KeyValue]) -> Iterator[tuple[str, bytes]]:
    """The mirror's keys and values, as ``registered_on`` reads them."""
    return ((key, kv.value) for key, kv in kvs.items())
