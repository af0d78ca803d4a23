"""One Connect CA for the cluster, without its key on every host.

    ca/roots                 the roots: certificates only (cluster ID, active flag, cross-signs)
    ca/key/<root-id>         a root's private key, sealed (AES-256-GCM) with the key-encryption
                             key that only signer hosts have (``cluster.ca_key_file``)
    ca/signer                which host signs: created under that host's lease, so it goes
                             when the host does, and another signer host takes it
    ca/csr/<node>/<req>      a host asks for a leaf (a CSR, under its own lease)
    ca/issued/<node>/<req>   the signer's answer (under the asking host's lease)

Every write of the signer is a transaction that requires ``ca/signer`` to be the very key
it created (its create revision is the fencing token): a signer whose lease ran out and
was replaced can no longer write anything.

A host gets leaves for services registered on it only: the signer checks the asking host's
records in the catalog before it signs, and signs the CSR's public key with a subject and
SAN it sets itself. The first signer publishes its own (single-host) CA as the cluster's,
so that host's proxies keep their certificates; other hosts serve their old roots beside
the cluster's until the leaves their own CA signed have expired, so nothing in flight is
refused during the switch.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from supervisor.cluster.etcd import KeyValue
from supervisor.cluster.layout import Layout
from supervisor.cluster.records import BadRecord, decode, encode
from supervisor.cluster.secretfile import read_secret_file
from supervisor.config.limits import key_encryption_key
from supervisor.connect.ca import CertificateAuthority, Root
from supervisor.errors import SupervisorError

log = logging.getLogger("supervisor.cluster")


class SealError(SupervisorError):
    """The key-encryption key is unusable, or a sealed CA key does not open with it."""


def load_kek(path: str) -> bytes:
    """32 random bytes, raw or as 64 hex digits (``openssl rand -hex 32``)."""
    try:
        data = read_secret_file(path, 256)
    except OSError as exc:
        raise SealError(f"cannot read cluster.ca_key_file {path}: {exc.strerror}") from exc
    kek = key_encryption_key(data)
    if kek is not None:
        return kek
    raise SealError(f"cluster.ca_key_file {path}: expected 32 random bytes (make one: openssl rand -hex 32)")


def seal(kek: bytes, secret: bytes, label: str) -> str:
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(kek).encrypt(nonce, secret, label.encode())).decode()


def unseal(kek: bytes, sealed: str, label: str) -> bytes:
    try:
        raw = base64.b64decode(sealed)
        return AESGCM(kek).decrypt(raw[:12], raw[12:], label.encode())
    except Exception as exc:
        raise SealError(f"the CA key for root {label} does not open with this host's ca_key_file") from exc


# -- the published roots ----------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedRoot:
    id: str
    cert: x509.Certificate
    active: bool
    cross_signed: x509.Certificate | None
    source: str
    config_hash: str
    last_leaf_expiry: float


@dataclass(frozen=True)
class ClusterRoots:
    cluster_id: str
    roots: tuple[PublishedRoot, ...]
    index: int

    @property
    def trust_domain(self) -> str:
        return f"{self.cluster_id}.consul"

    @property
    def active(self) -> PublishedRoot:
        return next(root for root in self.roots if root.active)


def roots_document(ca: CertificateAuthority) -> dict[str, Any]:
    return {
        "ClusterID": ca.cluster_id,
        "Roots": [
            {
                "CertPEM": _pem(root.cert),
                "Active": root.active,
                "CrossSignedPEM": _pem(root.cross_signed) if root.cross_signed is not None else "",
                "Source": root.source,
                "ConfigHash": root.config_hash,
                "LastLeafExpiry": root.last_leaf_expiry,
            }
            for root in ca.roots
        ],
    }


def read_roots(kv: KeyValue | None, base: int) -> ClusterRoots | None:
    if kv is None:
        return None
    try:
        document = decode(kv.value)
        roots = []
        cluster_id = document["ClusterID"]
        if not isinstance(cluster_id, str) or not _UUID.fullmatch(cluster_id):
            raise BadRecord(f"ClusterID {cluster_id!r} is not a UUID")
        for entry in document["Roots"]:
            cert = x509.load_pem_x509_certificate(str(entry["CertPEM"]).encode())
            if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
                raise BadRecord("a root without an EC key")
            if not cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME):
                raise BadRecord("a root without a common name")
            expiry = float(entry.get("LastLeafExpiry", 0.0))
            if not math.isfinite(expiry):
                raise BadRecord("LastLeafExpiry is not a number")
            cross = str(entry.get("CrossSignedPEM") or "")
            roots.append(
                PublishedRoot(
                    id=Root(cert, _NO_KEY, False, "", "", 0, 0).id,
                    cert=cert,
                    active=bool(entry["Active"]),
                    cross_signed=x509.load_pem_x509_certificate(cross.encode()) if cross else None,
                    source=str(entry.get("Source", "")),
                    config_hash=str(entry.get("ConfigHash", "")),
                    last_leaf_expiry=expiry,
                )
            )
        if sum(1 for root in roots if root.active) != 1:
            raise BadRecord("not exactly one active root")
        return ClusterRoots(cluster_id, tuple(roots), base + kv.mod_revision)
    except (BadRecord, KeyError, TypeError, ValueError, AttributeError) as exc:
        log.error("the CA roots in etcd are unreadable (%s); keeping the last good ones", exc)
        return None


_NO_KEY: Any = None  # (Root.id needs only the certificate)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _root_json(root: PublishedRoot, index: int) -> dict[str, Any]:
    stub = Root(root.cert, _NO_KEY, root.active, root.source, root.config_hash, index, index)
    data = stub.to_json()
    return data


class ClusterAuthority:
    """What the Connect endpoints read in cluster mode (the local CA's interface): the
    cluster's roots, plus this host's own old roots while leaves they signed are alive."""

    SWITCH_GRACE = 2.0  # seconds between serving the cluster's roots and handing out its leaves

    def __init__(
        self,
        local: CertificateAuthority,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.cluster: ClusterRoots | None = None
        self.clock = clock
        self.monotonic = monotonic
        self.switch_started: float | None = None  # when the cluster's roots were first served here
        self._refused_at = 0  # the ca/roots revision last found unreadable (logged once)

    def refresh(self, kvs: dict[str, KeyValue], layout: Layout, base: int) -> bool:
        """Take the roots from the mirror; True when the active root changed."""
        kv = kvs.get(layout.ca_roots())
        if kv is None:
            return False
        if self.cluster is not None and self.cluster.index == base + kv.mod_revision:
            return False
        if kv.mod_revision == self._refused_at:
            return False  # (already refused, and said so once)
        fresh = read_roots(kv, base)
        if fresh is None:
            self._refused_at = kv.mod_revision
            return False
        previous = self.cluster.active.id if self.cluster is not None else None
        self.cluster = fresh
        if previous is None:
            self.switch_started = self.monotonic()
        return previous != fresh.active.id

    def signed_by_cluster(self, cert: x509.Certificate) -> bool:
        """``cert`` is signed by one of the cluster's roots."""
        if self.cluster is None or cert.signature_hash_algorithm is None:
            return False
        for root in self.cluster.roots:
            public = root.cert.public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey) or cert.issuer != root.cert.subject:
                continue
            try:
                public.verify(
                    cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
                )
            except InvalidSignature:
                continue
            return True
        return False

    def local_in_use(self) -> bool:
        return bool(self._local_in_use())

    def settled(self) -> bool:
        """Leaves of the cluster's CA may be handed out: every local proxy has had time to
        take the roots that trust them (a leaf must never reach a peer before its root)."""
        if self.switch_started is None or not self._local_in_use():
            return True
        return self.monotonic() - self.switch_started >= self.SWITCH_GRACE

    def _local_in_use(self) -> list[Root]:
        """This host's own roots that signed leaves still valid (none once the cluster CA is
        this host's own, as on the first signer)."""
        if self.cluster is None:
            return []
        known = {root.id for root in self.cluster.roots}
        now = self.clock()
        return [root for root in self.local.roots if root.id not in known and root.last_leaf_expiry > now]

    @property
    def trust_domain(self) -> str:
        return self.cluster.trust_domain if self.cluster is not None else self.local.trust_domain

    @property
    def trust_domains(self) -> tuple[str, ...]:
        domains = [self.trust_domain]
        if self._local_in_use() and self.local.trust_domain not in domains:
            domains.append(self.local.trust_domain)
        return tuple(domains)

    @property
    def roots_index(self) -> int:
        if self.cluster is None:
            return self.local.roots_index
        return max(self.cluster.index, self.local.roots_index if self._local_in_use() else 0)

    @property
    def active_id(self) -> str:
        return self.cluster.active.id if self.cluster is not None else self.local.active.id

    def roots_json(self) -> dict[str, Any]:
        if self.cluster is None:
            return self.local.roots_json()
        cluster = self.cluster
        roots = [_root_json(root, cluster.index) for root in cluster.roots]
        for root in self._local_in_use():
            data = root.to_json()
            data["Active"] = False
            roots.append(data)
        return {
            "ActiveRootID": cluster.active.id,
            "TrustDomain": cluster.trust_domain,
            "TrustDomains": list(self.trust_domains),  # (ours: every domain accepted now)
            "Roots": roots,
        }


def certificate_request(key: ec.EllipticCurvePrivateKey, service: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, service[:64])]))
        .sign(key, _sha256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def request_value(csr_pem: str, service: str) -> bytes:
    return encode({"csr": csr_pem, "service": service})
