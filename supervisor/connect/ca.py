"""The Connect certificate authority: a root (generated or the operator's), and leaves.

Roots are EC P-256, valid 10 years, with a ``spiffe://<trust-domain>`` URI SAN. Leaves get
a fresh EC P-256 key on every issuance, CN = service name, exactly one SPIFFE URI SAN,
client and server auth, and are valid from now - 1 minute for ``leaf_cert_ttl`` (72 h).

Rotation (``connect.ca_config`` changed): the new root becomes active; the old root is
kept, and served, until the last leaf it signed has expired. The old root also
cross-signs the new one and the cross-signed certificate rides along with new leaves,
so a peer that still only trusts the old root accepts them too.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from supervisor.config.model import CAConfig
from supervisor.connect.spiffe import SigningID, service_id
from supervisor.errors import ConfigError
from supervisor.state.documents import Damaged, damaged, load_document, save_document

ROOT_VALIDITY = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(minutes=1)
CA_STATE_VERSION = 1
CA_REMEDY = (
    "restore it from a backup, or delete it to create a new CA (every proxy will then get new certificates)"
)


def colon_hex(data: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in data)


def serial_hex(serial: int) -> str:
    """Consul's serial format: colon-separated lowercase hex of the big-endian bytes."""
    length = max(1, (serial.bit_length() + 7) // 8)
    return colon_hex(serial.to_bytes(length, "big"))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    """The certificate's key; every root and leaf of this CA is EC (P-256)."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{cert.subject.rfc4514_string()}: not an EC key")
    return key


def _key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


@dataclass
class Root:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    active: bool
    source: str  # "generated" or "config"
    config_hash: str  # the ca_config that produced it ("" when generated)
    create_index: int
    modify_index: int
    cross_signed: x509.Certificate | None = None  # this root's key, signed by the previous root
    last_leaf_expiry: float = 0.0  # wall time: the root can be dropped once inactive and past this

    @property
    def id(self) -> str:
        return colon_hex(self.cert.fingerprint(hashes.SHA1()))

    @property
    def signing_key_id(self) -> str:
        return colon_hex(_key_id(ec_public_key(self.cert)))

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            "SerialNumber": self.cert.serial_number,
            "SigningKeyID": self.signing_key_id,
            "ExternalTrustDomain": "",
            "NotBefore": self.cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "NotAfter": self.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "RootCert": _pem(self.cert),
            "IntermediateCerts": None,
            "Active": self.active,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(frozen=True)
class Leaf:
    service: str
    uri: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # intermediates to send along (during rotation)
    modify_index: int

    @property
    def cert_pem(self) -> str:
        return "".join(_pem(cert) for cert in (self.cert, *self.chain))

    @property
    def key_pem(self) -> str:
        return _key_pem(self.key)

    @property
    def valid_after(self) -> float:
        return self.cert.not_valid_before_utc.timestamp()

    @property
    def valid_before(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()

    def to_json(self) -> dict[str, Any]:
        return {
            "SerialNumber": serial_hex(self.cert.serial_number),
            "CertPEM": self.cert_pem,
            "PrivateKeyPEM": self.key_pem,
            "Service": self.service,
            "ServiceURI": self.uri,
            "ValidAfter": self.cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "ValidBefore": self.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "CreateIndex": self.modify_index,
            "ModifyIndex": self.modify_index,
        }


def config_hash(ca: CAConfig) -> str:
    if not ca.private_key:
        return ""
    return hashlib.sha256((ca.private_key + "\0" + ca.root_cert).encode()).hexdigest()[:16]


@dataclass
class CertificateAuthority:
    """Owns the roots and signs leaves. Not thread-safe: lives on the API's event loop."""

    path: str | None  # data_dir/connect/ca.json; None: in memory only (-dev)
    datacenter: str
    next_index: Callable[[], int]
    leaf_ttl: float = 72 * 3600.0
    cluster_id: str = ""
    roots: list[Root] = field(default_factory=list)
    roots_index: int = 0

    @property
    def trust_domain(self) -> str:
        return f"{self.cluster_id}.consul"

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return (self.trust_domain,)

    @property
    def active_id(self) -> str:
        return self.active.id

    @property
    def active(self) -> Root:
        for root in self.roots:
            if root.active:
                return root
        raise RuntimeError("the CA has no active root")

    # -- set-up and rotation -------------------------------------------------------------

    def start(self, ca: CAConfig) -> str | None:
        """Load the persisted state and make ``ca`` current; returns a log message if rotated."""
        self._load()
        if not self.cluster_id:
            self.cluster_id = str(uuid.uuid4())
        self.leaf_ttl = ca.leaf_cert_ttl
        return self.apply(ca)

    def apply(self, ca: CAConfig) -> str | None:
        """Install the root that ``ca`` describes if it differs from the active one."""
        self.leaf_ttl = ca.leaf_cert_ttl
        wanted = config_hash(ca)
        if self.roots and self.active.config_hash == wanted:
            return None
        if ca.private_key:
            cert, key = _load_operator_root(ca)
            source = "config"
        else:
            cert, key = self._generate_root()
            source = "generated"
        index = self.next_index()
        previous = self.active if self.roots else None
        new = Root(cert, key, True, source, wanted, index, index)
        message = None
        if previous is not None:
            previous.active = False
            previous.modify_index = index
            new.cross_signed = _cross_sign(new, previous)
            message = (
                f"CA root rotated: new root {new.id} is active; the old root {previous.id} is still "
                "trusted until the leaves it signed have expired"
            )
        self.roots.append(new)
        self.roots_index = index
        self.save()
        return message

    def prune(self, now: float | None = None) -> bool:
        """Drop inactive roots whose last leaf has expired; True if any was dropped."""
        now = time.time() if now is None else now
        keep = [root for root in self.roots if root.active or root.last_leaf_expiry > now]
        if len(keep) == len(self.roots):
            return False
        self.roots = keep
        self.roots_index = self.next_index()
        self.save()
        return True

    def next_prune_time(self) -> float | None:
        expiries = [root.last_leaf_expiry for root in self.roots if not root.active]
        return min(expiries) if expiries else None

    # -- leaves -------------------------------------------------------------------------------

    def sign_leaf(self, service: str) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        cert, chain = self.certify(service, key.public_key())
        return Leaf(
            service,
            service_id(self.trust_domain, self.datacenter, service).uri,
            cert,
            key,
            chain,
            self.next_index(),
        )

    def certify(
        self, service: str, public_key: ec.EllipticCurvePublicKey
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """A leaf certificate for ``service`` on ``public_key`` (a key this CA has not seen:
        a cluster signer certifies keys other hosts made), with the chain to send along."""
        root = self.active
        spiffe = service_id(self.trust_domain, self.datacenter, service)
        # Backdated for clock skew between hosts: 1 minute, or a tenth of a (test-short) TTL.
        skew = min(CLOCK_SKEW, datetime.timedelta(seconds=self.leaf_ttl / 10))
        not_before = _now() - skew
        not_after = not_before + datetime.timedelta(seconds=self.leaf_ttl)
        builder = (
            x509.CertificateBuilder()
            # (X.509 caps a CN at 64 characters; the identity is the SPIFFE URI, not the CN)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:64])]))
            .issuer_name(root.cert.subject)
            .public_key(public_key)
            .serial_number(secrets.randbits(63) | 1)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe.uri)]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=True,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False
            )
        )
        cert = builder.sign(root.key, hashes.SHA256())
        expiry = not_after.timestamp()
        if expiry > root.last_leaf_expiry:
            root.last_leaf_expiry = expiry
            self.save()
        chain = (root.cross_signed,) if root.cross_signed is not None and len(self.roots) > 1 else ()
        return cert, chain

    def roots_json(self) -> dict[str, Any]:
        return {
            "ActiveRootID": self.active.id,
            "TrustDomain": self.trust_domain,
            "Roots": [root.to_json() for root in self.roots],
        }

    # -- internals ----------------------------------------------------------------------------

    def _generate_root(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        serial = secrets.randbits(63) | 1
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"proxy-supervisor CA {serial % 100000}")])
        not_before = _now() - CLOCK_SKEW
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_before + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(SigningID(self.trust_domain).uri)]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def _load(self) -> None:
        if self.path is None:
            return
        # Never silently replace a CA: every proxy's trust depends on it.
        data = load_document(self.path, CA_STATE_VERSION, CA_REMEDY)
        if data is None:
            return
        try:
            self.cluster_id = str(uuid.UUID(data["ClusterID"]))
            self.roots = [_root_from_json(entry) for entry in data["Roots"]]
            self.roots_index = self.next_index()
            if sum(1 for root in self.roots if root.active) != 1:
                raise Damaged("expected exactly one active root")
        except (ValueError, KeyError, TypeError) as exc:
            raise damaged(self.path, exc, CA_REMEDY) from exc

    def save(self) -> None:
        if self.path is None:
            return
        save_document(
            self.path,
            CA_STATE_VERSION,
            {"ClusterID": self.cluster_id, "Roots": [_root_to_json(root) for root in self.roots]},
        )


def _root_to_json(root: Root) -> dict[str, Any]:
    return {
        "CertPEM": _pem(root.cert),
        "KeyPEM": _key_pem(root.key),
        "Active": root.active,
        "Source": root.source,
        "ConfigHash": root.config_hash,
        "CrossSignedPEM": _pem(root.cross_signed) if root.cross_signed is not None else "",
        "LastLeafExpiry": root.last_leaf_expiry,
        "CreateIndex": root.create_index,
    }


def _root_from_json(entry: dict[str, Any]) -> Root:
    key = serialization.load_pem_private_key(entry["KeyPEM"].encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("a root key is not an EC key")
    cross = entry.get("CrossSignedPEM") or ""
    return Root(
        cert=x509.load_pem_x509_certificate(entry["CertPEM"].encode()),
        key=key,
        active=bool(entry["Active"]),
        source=str(entry.get("Source", "generated")),
        config_hash=str(entry.get("ConfigHash", "")),
        create_index=int(entry.get("CreateIndex", 0)),
        modify_index=int(entry.get("CreateIndex", 0)),
        cross_signed=x509.load_pem_x509_certificate(cross.encode()) if cross else None,
        last_leaf_expiry=float(entry.get("LastLeafExpiry", 0.0)),
    )


def _cross_sign(new: Root, previous: Root) -> x509.Certificate:
    """The new root's subject and key, issued by the previous root: lets peers that only
    trust the previous root verify leaves of the new one during the change-over."""
    not_before = _now() - CLOCK_SKEW
    return (
        x509.CertificateBuilder()
        .subject_name(new.cert.subject)
        .issuer_name(previous.cert.subject)
        .public_key(ec_public_key(new.cert))
        .serial_number(secrets.randbits(63) | 1)
        .not_valid_before(not_before)
        .not_valid_after(min(new.cert.not_valid_after_utc, previous.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ec_public_key(new.cert)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(previous.key.public_key()), critical=False
        )
        .sign(previous.key, hashes.SHA256())
    )


def validate_ca_config(ca: CAConfig) -> None:
    """Check an operator-supplied root at config load time (raises ConfigError)."""
    if ca.private_key:
        _load_operator_root(ca)


def _load_operator_root(ca: CAConfig) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The operator's ``connect.ca_config`` root: checked now, so a bad one is a config error."""
    where = "connect.ca_config"
    try:
        key = serialization.load_pem_private_key(ca.private_key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError.single(
            "", f"{where}.private_key", f"not a PEM private key without a password ({exc})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError.single("", f"{where}.private_key", "must be an EC P-256 key (as Consul's CA used)")
    try:
        cert = x509.load_pem_x509_certificate(ca.root_cert.encode())
    except ValueError as exc:
        raise ConfigError.single("", f"{where}.root_cert", f"not a PEM certificate ({exc})") from None
    public = cert.public_key()
    if (
        not isinstance(public, ec.EllipticCurvePublicKey)
        or public.public_numbers() != key.public_key().public_numbers()
    ):
        raise ConfigError.single("", f"{where}.root_cert", "does not belong to private_key")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError.single(
            "", f"{where}.root_cert", "is not a CA certificate (BasicConstraints CA:TRUE)"
        )
    try:
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ConfigError.single("", f"{where}.root_cert", "is not self-signed") from None
    return cert, key
