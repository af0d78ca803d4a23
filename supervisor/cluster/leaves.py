"""Leaves for this host's services from the cluster's CA: a CSR under this host's lease,
answered by the signer (``signer.py``); the key never leaves the host. Until the cluster
has a CA, and during a switch from this host's own CA, the local leaves are served."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from supervisor.catalog.errors import Unavailable
from supervisor.cluster.authority import ClusterAuthority, certificate_request, request_value
from supervisor.cluster.etcd import EtcdError, op_delete
from supervisor.cluster.records import BadRecord, decode
from supervisor.cluster.signer import CAContext, blocking, mirror_values, registered_on
from supervisor.connect.ca import Leaf
from supervisor.connect.leaves import LeafManager
from supervisor.connect.spiffe import service_id

log = logging.getLogger("supervisor.cluster")

REQUEST_PATIENCE = 60.0  # seconds an unanswered leaf request is waited for before it is made again
REGISTRATION_PATIENCE = 10.0  # seconds a request waits for its service's record to be in etcd


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
        context: CAContext,
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
        self._moved: asyncio.Event | None = None  # set by ``refresh``: the mirror moved
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
        pending = self._pending_for(service)
        if pending is None:
            await self._until_registered(service)
            pending = self._pending_for(service) or await self._request(service)  # (asked meanwhile?)
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

    def _pending_for(self, service: str) -> _Pending | None:
        return next((p for p in self._pending.values() if p.service == service), None)

    async def _quiet_request(self, service: str) -> None:
        try:
            await self._until_registered(service)
            if self._pending_for(service) is None:
                await self._request(service)
        except Unavailable as exc:
            log.warning("%s", exc)

    async def _request(self, service: str) -> _Pending:
        """Put a CSR (the caller made sure etcd has the registration: ``_until_registered``).
        Nothing is awaited before the request is pending, so callers asking at once share it."""
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
            await blocking(lambda: self.context.client.put(where, value, lease))
        except EtcdError as exc:
            self._pending.pop(request_id, None)
            raise Unavailable(f"cannot ask the cluster for a leaf for {service}: {exc}") from None
        return pending

    async def _until_registered(self, service: str) -> None:
        """Until etcd has this host's registration of ``service``. The signer signs only for
        services registered on the asking host, and its watch sees keys in revision order:
        a request put after the registration is never refused as one that came before it
        (just after a start, or a registration, the catalog's write may not be in yet)."""
        context = self.context
        layout, node = context.layout, context.node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REGISTRATION_PATIENCE
        while not registered_on(layout, mirror_values(context.kvs()), node, service):
            remaining = deadline - loop.time()
            if not registered_on(layout, context.own_records().items(), node, service):
                raise Unavailable(
                    f"no leaf certificate for {service}: it is not registered on host {node} "
                    "(the cluster's CA signs leaves only for services registered on the asking host)"
                )
            if remaining <= 0:
                raise Unavailable(
                    f"no leaf certificate for {service}: its registration has not reached the "
                    f"cluster's store in {REGISTRATION_PATIENCE:.0f}s (is etcd reachable?)"
                )
            if self._moved is None:
                self._moved = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), remaining)

    def refresh(self) -> None:
        """After the mirror moved: take issued leaves; renew all after a root change."""
        if self._moved is not None:
            self._moved.set()
            self._moved = None
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
                log.error("the signer refused a leaf for %s: %s", pending.service, exc)
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
            log.info("leaf for %s issued by the cluster's CA", pending.service)
            self.on_change()

    def roots_changed(self) -> None:
        for service in list(self.leaves):
            asyncio.get_running_loop().create_task(self._renew(service), name=f"leaf {service}")

    def _leaf(self, pending: _Pending, chain_pem: str, index: int) -> Leaf:
        """The signer's answer, taken only if it is what was asked for: our key, the service's
        SPIFFE ID, signed by one of the cluster's roots (a forged answer is refused)."""
        certs = x509.load_pem_x509_certificates(chain_pem.encode())
        if not certs:
            raise BadRecord("no certificate")
        leaf = certs[0]
        public = leaf.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or (
            public.public_numbers() != pending.key.public_key().public_numbers()
        ):
            raise BadRecord("the certificate is not for the key this host asked with")
        uri = service_id(self.authority.trust_domain, self.datacenter, pending.service).uri
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [uri]:
            raise BadRecord(f"the certificate names {uris}, not {uri}")
        if not self.authority.signed_by_cluster(leaf):
            raise BadRecord("the certificate is not signed by the cluster's CA")
        return Leaf(pending.service, uri, leaf, pending.key, tuple(certs[1:]), index)

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
        except (Unavailable, TimeoutError) as exc:
            log.warning(
                "renewing the leaf of %s failed (%s); the current one is kept, another try in 60 s",
                service,
                exc or "no answer",
            )
            asyncio.get_running_loop().call_later(
                60.0, lambda: asyncio.get_running_loop().create_task(self._renew(service))
            )

    async def ensure_new(self, service: str) -> None:
        await self._until_registered(service)
        pending = await self._request(service)
        await asyncio.wait_for(asyncio.shield(pending.done), 60)

    def close(self) -> None:
        for handle in self._renewals.values():
            handle.cancel()


def _quietly(call: Callable[[], Any]) -> None:
    try:
        call()
    except EtcdError as exc:
        log.debug("cleaning up a leaf request failed: %s", exc)
