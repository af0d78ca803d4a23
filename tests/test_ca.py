"""The Connect CA: root and leaf properties, openssl verification, rotation, persistence."""

from __future__ import annotations

import datetime
import itertools
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from supervisor.config.model import CAConfig
from supervisor.connect.ca import CertificateAuthority, serial_hex, validate_ca_config
from supervisor.connect.spiffe import InvalidSpiffeID, ServiceID, SigningID, parse, parse_service
from supervisor.errors import ConfigError, DataDirError

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def new_ca(path: Path | None, ttl: float = 72 * 3600) -> CertificateAuthority:
    counter = itertools.count(1)
    ca = CertificateAuthority(str(path) if path else None, "dc1", lambda: next(counter))
    ca.start(CAConfig(leaf_cert_ttl=ttl))
    return ca


def operator_root() -> tuple[str, str]:
    """A root an operator could put into connect.ca_config."""
    other = new_ca(None)
    root = other.active
    key = root.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key, root.cert.public_bytes(serialization.Encoding.PEM).decode()


def openssl_verify(tmp_path: Path, roots: list[str], leaf_pem: str) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of the leaf with the rest of CertPEM as untrusted intermediates."""
    blocks = [
        block + "-----END CERTIFICATE-----\n" for block in leaf_pem.split("-----END CERTIFICATE-----")[:-1]
    ]
    (tmp_path / "roots.pem").write_text("".join(roots))
    (tmp_path / "leaf.pem").write_text(blocks[0].lstrip())
    args = ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(tmp_path / "roots.pem")]
    if len(blocks) > 1:
        (tmp_path / "chain.pem").write_text("".join(block.lstrip() for block in blocks[1:]))
        args += ["-untrusted", str(tmp_path / "chain.pem")]
    return subprocess.run([*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)


def test_root_properties(tmp_path: Path) -> None:
    ca = new_ca(tmp_path / "ca.json")
    root = ca.active.cert
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    uris = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{ca.trust_domain}"]
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime <= datetime.timedelta(days=3651)
    assert ca.trust_domain.endswith(".consul") and len(ca.cluster_id) == 36
    roots = ca.roots_json()
    assert roots["TrustDomain"] == ca.trust_domain and roots["ActiveRootID"] == roots["Roots"][0]["ID"]
    assert roots["Roots"][0]["Active"] is True and "BEGIN CERTIFICATE" in roots["Roots"][0]["RootCert"]
    assert stat.S_IMODE((tmp_path / "ca.json").stat().st_mode) == 0o600


def test_leaf_properties(tmp_path: Path) -> None:
    ca = new_ca(None)
    before = datetime.datetime.now(datetime.UTC)
    first, second = ca.sign_leaf("web"), ca.sign_leaf("web")
    cert = first.cert
    assert first.key.curve.name == "secp256r1"
    assert (
        first.key.private_numbers().private_value != second.key.private_numbers().private_value
    )  # fresh key
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{ca.trust_domain}/ns/default/dc/dc1/svc/web"
    ]
    assert len(list(uris)) == 1
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert abs((before - cert.not_valid_before_utc) - datetime.timedelta(minutes=1)) < datetime.timedelta(
        seconds=5
    )
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(hours=72)
    data = first.to_json()
    assert data["Service"] == "web" and data["ServiceURI"].endswith("/svc/web")
    assert data["SerialNumber"] == serial_hex(cert.serial_number) and ":" in data["SerialNumber"]
    assert "BEGIN EC PRIVATE KEY" in data["PrivateKeyPEM"]


@needs_openssl
def test_leaf_verifies_with_openssl(tmp_path: Path) -> None:
    ca = new_ca(None)
    result = openssl_verify(tmp_path, [ca.roots_json()["Roots"][0]["RootCert"]], ca.sign_leaf("web").cert_pem)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
    other = new_ca(None)
    wrong = openssl_verify(
        tmp_path, [other.roots_json()["Roots"][0]["RootCert"]], ca.sign_leaf("web").cert_pem
    )
    assert wrong.returncode != 0


@needs_openssl
def test_rotation_keeps_old_root_and_cross_signs_the_new_one(tmp_path: Path) -> None:
    ca = new_ca(tmp_path / "ca.json")
    old_root_pem = ca.roots_json()["Roots"][0]["RootCert"]
    old_leaf = ca.sign_leaf("web")
    key, cert = operator_root()
    message = ca.apply(CAConfig(private_key=key, root_cert=cert))
    assert message is not None and "rotated" in message
    roots = ca.roots_json()
    assert [root["Active"] for root in roots["Roots"]] == [False, True]
    assert roots["ActiveRootID"] == roots["Roots"][1]["ID"]
    new_leaf = ca.sign_leaf("web")
    assert new_leaf.cert.issuer == x509.load_pem_x509_certificate(cert.encode()).subject
    # new leaves verify against the new root, and -- through the cross-signed root they
    # carry -- against the old root alone, for peers that have not seen the new root yet
    assert openssl_verify(tmp_path, [cert], new_leaf.cert_pem).returncode == 0
    assert openssl_verify(tmp_path, [old_root_pem], new_leaf.cert_pem).returncode == 0
    # leaves of the old root still verify against the served roots
    both = [root["RootCert"] for root in roots["Roots"]]
    assert openssl_verify(tmp_path, both, old_leaf.cert_pem).returncode == 0
    # the same config again is not a rotation; the state survives a restart
    assert ca.apply(CAConfig(private_key=key, root_cert=cert)) is None
    counter = itertools.count(100)
    again = CertificateAuthority(str(tmp_path / "ca.json"), "dc1", lambda: next(counter))
    assert again.start(CAConfig(private_key=key, root_cert=cert)) is None
    assert again.cluster_id == ca.cluster_id and len(again.roots) == 2


def test_old_root_is_dropped_after_its_last_leaf_expires(tmp_path: Path) -> None:
    ca = new_ca(tmp_path / "ca.json")
    ca.sign_leaf("web")
    old_expiry = ca.roots[0].last_leaf_expiry
    key, cert = operator_root()
    ca.apply(CAConfig(private_key=key, root_cert=cert))
    assert ca.next_prune_time() == old_expiry
    assert not ca.prune(now=old_expiry - 1)
    assert ca.prune(now=old_expiry + 1)
    assert len(ca.roots) == 1 and ca.roots[0].active
    assert len(json.loads((tmp_path / "ca.json").read_text())["Roots"]) == 1


def test_short_ttl_leaves_are_valid_now(tmp_path: Path) -> None:
    ca = new_ca(None, ttl=20)
    leaf = ca.sign_leaf("web")
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert leaf.valid_after <= now < leaf.valid_before
    assert 19 <= leaf.valid_before - leaf.valid_after <= 21


@pytest.mark.parametrize(
    ("key_kind", "expected"),
    [
        ("garbage", "not a PEM private key"),
        ("rsa", "must be an EC P-256 key"),
        ("mismatch", "does not belong"),
    ],
)
def test_operator_ca_config_is_validated(key_kind: str, expected: str) -> None:
    key, cert = operator_root()
    if key_kind == "garbage":
        key = "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
    elif key_kind == "rsa":
        key = (
            rsa.generate_private_key(65537, 2048)
            .private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            .decode()
        )
    else:
        key, _ = operator_root()
    with pytest.raises(ConfigError, match=expected):
        validate_ca_config(CAConfig(private_key=key, root_cert=cert))


def test_corrupt_ca_file_is_never_silently_replaced(tmp_path: Path) -> None:
    (tmp_path / "ca.json").write_text('{"Version": 1, "ClusterID": "x", "Ro')
    with pytest.raises(DataDirError, match="restore it from a backup"):
        new_ca(tmp_path / "ca.json")


def test_spiffe_parsing() -> None:
    parsed = parse("spiffe://abc.consul/ns/default/dc/dc1/svc/web")
    assert parsed == ServiceID("abc.consul", "default", "dc1", "web")
    assert parse("spiffe://ABC.consul") == SigningID("abc.consul")
    assert parse_service("spiffe://abc.consul/ns/default/dc/dc%2F1/svc/w%20b").datacenter == "dc/1"
    for bad in (
        "http://abc.consul/ns/default/dc/dc1/svc/web",
        "spiffe://abc.consul/svc/web",
        "not a uri",
        "",
    ):
        with pytest.raises(InvalidSpiffeID):
            parse_service(bad)
    with pytest.raises(InvalidSpiffeID):
        parse_service("spiffe://abc.consul")
