"""builtin_proxy.tls: SPIFFE URI parsing, and the Identity that turns the agent's roots and
leaf JSON into server and client contexts, checked over real TLS handshakes.

Certificates come from the repo's own CA (``supervisor.connect.ca``) persisted in tmp_path,
in the exact JSON the agent serves (``roots_json``, ``Leaf.to_json``). Handshakes run on
``socket.socketpair()`` ends, stepped alternately without blocking: no network, no threads.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builtin_proxy.tls import Identity, parse_service_uri, peer_uri
from supervisor.config.model import CAConfig
from supervisor.connect import spiffe
from supervisor.connect.ca import CertificateAuthority

# -- parse_service_uri ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://abc.consul/ns/default/dc/dc1/svc/web", ("abc.consul", "dc1", "web")),
        (
            "spiffe://ABC.Consul/ns/default/dc/DC1/svc/Web",
            ("abc.consul", "DC1", "Web"),
        ),  # only the host folds
        ("spiffe://abc.consul/ns/default/dc/east%2F1/svc/my%20api", ("abc.consul", "east/1", "my api")),
    ],
)
def test_parse_service_uri_gives_trust_domain_datacenter_and_service(
    uri: str, expected: tuple[str, str, str]
) -> None:
    assert parse_service_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://abc.consul",  # a CA's signing ID, never a client
        "spiffe://abc.consul/",
        "https://abc.consul/ns/default/dc/dc1/svc/web",
        "spiffe://abc.consul/ns/default/dc/dc1",
        "spiffe://abc.consul/ns/default/dc/dc1/svc/",
        "spiffe://abc.consul/ns/default/dc/dc1/svc/web/extra",
        "spiffe:///ns/default/dc/dc1/svc/web",
        "spiffe://abc.consul/dc/dc1/svc/web",
    ],
)
def test_parse_service_uri_refuses_what_is_not_a_service_identity(uri: str) -> None:
    assert parse_service_uri(uri) is None


@pytest.mark.parametrize("service", ["web", "my api", "a/b", "db%1", "ünï"])
def test_parse_service_uri_reads_back_the_uris_the_ca_issues(service: str) -> None:
    issued = spiffe.service_id("Cluster.consul", "dc 2", service).uri
    assert parse_service_uri(issued) == ("cluster.consul", "dc 2", service)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://abc.consul/ns/default/dc/dc1/svc/web?admin=1",
        "spiffe://abc.consul/ns/default/dc/dc1/svc/web#x",
    ],
)
def test_parse_service_uri_refuses_a_query_or_fragment_like_the_spiffe_parser(uri: str) -> None:
    with pytest.raises(spiffe.InvalidSpiffeID):
        spiffe.parse_service(uri)
    assert parse_service_uri(uri) is None


# -- certificates from the repo's CA ---------------------------------------------------------------


def new_ca(path: Path, cluster_id: str = "", ca: CAConfig | None = None) -> CertificateAuthority:
    counter = itertools.count(1)
    authority = CertificateAuthority(str(path), "dc1", lambda: next(counter), cluster_id=cluster_id)
    authority.start(ca or CAConfig())
    return authority


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return new_ca(tmp_path / "ca.json")


def identity_of(ca: CertificateAuthority, service: str) -> Identity:
    identity = Identity()
    assert identity.update_roots(ca.roots_json()) is False  # no leaf yet: nothing to build
    assert identity.update_leaf(ca.sign_leaf(service).to_json()) is True
    return identity


def client_context_without_certificate(roots: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata="".join(root["RootCert"] for root in roots["Roots"]))
    return context


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect(
    pairs: list[socket.socket], server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A TLS connection over a socketpair, handshaken in lock-step on one thread."""
    server_raw, client_raw = socket.socketpair()
    for raw in (server_raw, client_raw):
        raw.setblocking(False)
    server_tls = server.wrap_socket(server_raw, server_side=True, do_handshake_on_connect=False)
    client_tls = client.wrap_socket(client_raw, server_side=False, do_handshake_on_connect=False)
    pairs.extend((server_tls, client_tls))
    waiting = [server_tls, client_tls]
    for _ in range(50):
        for side in list(waiting):
            try:
                side.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            waiting.remove(side)
        if not waiting:
            # TLS 1.3: the server judges the client's certificate after the client is done;
            # a round trip of application data makes a refusal show on both sides.
            client_tls.send(b"?")
            pump_one_read(server_tls)
            return server_tls, client_tls
    raise AssertionError("the handshake did not finish")


def pump_one_read(sock: ssl.SSLSocket) -> bytes:
    for _ in range(50):
        try:
            return sock.recv(64)
        except ssl.SSLWantReadError:
            continue
    raise AssertionError("nothing to read")


# -- Identity ---------------------------------------------------------------------------------------


def test_an_identity_is_ready_only_with_both_roots_and_a_leaf(ca: CertificateAuthority) -> None:
    leaf_first = Identity()
    assert leaf_first.update_leaf(ca.sign_leaf("web").to_json()) is False
    ready_with_a_leaf_only = leaf_first.ready
    assert leaf_first.update_roots(ca.roots_json()) is True
    assert (ready_with_a_leaf_only, leaf_first.ready) == (False, True)
    assert leaf_first.generation == 1


def test_the_same_roots_or_leaf_again_rebuild_nothing(ca: CertificateAuthority) -> None:
    identity = Identity()
    leaf = ca.sign_leaf("web").to_json()
    identity.update_roots(ca.roots_json())
    identity.update_leaf(leaf)
    server = identity.server
    assert identity.update_roots(ca.roots_json()) is False
    assert identity.update_leaf(dict(leaf)) is False
    assert identity.server is server
    assert identity.generation == 1


def test_a_renewed_leaf_gives_new_contexts_and_leaves_the_old_ones_working(
    ca: CertificateAuthority, pairs: list[socket.socket]
) -> None:
    identity = identity_of(ca, "db")
    old_server, web_client = identity.server, identity_of(ca, "web").client
    assert old_server is not None and web_client is not None
    assert identity.update_leaf(ca.sign_leaf("db").to_json()) is True
    assert identity.generation == 2
    assert identity.server is not old_server and identity.client is not None
    # A connection set up on the old context keeps it: it still completes a handshake.
    server_tls, _ = connect(pairs, old_server, web_client)
    assert parse_service_uri(peer_uri(server_tls) or "") == (ca.trust_domain, "dc1", "web")


def test_expected_uri_is_the_uri_the_ca_puts_in_that_services_leaf(ca: CertificateAuthority) -> None:
    identity = identity_of(ca, "web")
    assert identity.expected_uri("db", "dc1") == ca.sign_leaf("db").uri
    # An agent spelling the trust domain in capitals changes nothing: hosts compare folded.
    identity.update_roots({**ca.roots_json(), "TrustDomain": ca.trust_domain.upper()})
    assert identity.expected_uri("db", "dc1") == ca.sign_leaf("db").uri


def test_mutual_tls_shows_each_side_the_others_spiffe_uri(
    ca: CertificateAuthority, pairs: list[socket.socket]
) -> None:
    db, web = identity_of(ca, "db"), identity_of(ca, "web")
    assert db.server is not None and web.client is not None
    server_tls, client_tls = connect(pairs, db.server, web.client)
    assert peer_uri(server_tls) == web.expected_uri("web", "dc1")
    assert peer_uri(client_tls) == web.expected_uri("db", "dc1")


def test_no_alpn_is_agreed_even_when_the_client_offers_h2(
    ca: CertificateAuthority, pairs: list[socket.socket]
) -> None:
    # Consul 1.2-1.5 offered h2 from a layer-4 proxy (issue 4466).
    db = identity_of(ca, "db")
    client = identity_of(ca, "web").client
    assert db.server is not None and client is not None
    client.set_alpn_protocols(["h2", "http/1.1"])
    server_tls, client_tls = connect(pairs, db.server, client)
    assert server_tls.selected_alpn_protocol() is None
    assert client_tls.selected_alpn_protocol() is None


def test_a_client_without_a_certificate_is_refused(
    ca: CertificateAuthority, pairs: list[socket.socket]
) -> None:
    db = identity_of(ca, "db")
    assert db.server is not None
    with pytest.raises(ssl.SSLError, match="peer did not return a certificate"):
        connect(pairs, db.server, client_context_without_certificate(ca.roots_json()))


def test_peers_of_another_ca_are_refused_both_ways(
    ca: CertificateAuthority, tmp_path: Path, pairs: list[socket.socket]
) -> None:
    stranger = identity_of(new_ca(tmp_path / "other.json", cluster_id=ca.cluster_id), "web")
    db = identity_of(ca, "db")
    assert db.server is not None and db.client is not None
    assert stranger.server is not None and stranger.client is not None
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        connect(pairs, db.server, stranger.client)
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        connect(pairs, stranger.server, db.client)


def test_a_client_that_does_not_verify_sees_no_peer_uri(
    ca: CertificateAuthority, tmp_path: Path, pairs: list[socket.socket]
) -> None:
    # peer_uri reports the *verified* peer: an unverified certificate is not an identity.
    db, web = identity_of(ca, "db"), identity_of(ca, "web")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.load_cert_chain(*leaf_files(web, tmp_path))
    assert db.server is not None
    _, client_tls = connect(pairs, db.server, client)
    assert peer_uri(client_tls) is None


def leaf_files(identity: Identity, directory: Path) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_text(identity.leaf_cert_pem)
    key.write_text(identity.leaf_key_pem)
    return str(cert), str(key)


def test_during_a_root_rotation_both_roots_are_trusted(
    ca: CertificateAuthority, tmp_path: Path, pairs: list[socket.socket]
) -> None:
    # The operator's new root (any EC P-256 root will do: one of a second CA here).
    donor = new_ca(tmp_path / "donor.json").active
    old_only = identity_of(ca, "web")  # a proxy that has not seen the rotation yet
    old_leaf_db = identity_of(ca, "db")
    assert ca.apply(CAConfig(private_key=_pem_key(donor), root_cert=_pem_cert(donor))) is not None
    new_leaf_db = identity_of(ca, "db")  # trusts both roots; its leaf is from the new one
    assert len(ca.roots_json()["Roots"]) == 2
    assert new_leaf_db.server is not None and old_leaf_db.server is not None
    assert old_only.client is not None and new_leaf_db.client is not None
    # A new leaf is accepted by a peer that only trusts the old root (the cross-signed
    # root rides along in CertPEM) ...
    _, client_tls = connect(pairs, new_leaf_db.server, old_only.client)
    assert peer_uri(client_tls) == old_only.expected_uri("db", "dc1")
    # ... and a leaf of the old root by a proxy that already has the new roots.
    _, client_tls = connect(pairs, old_leaf_db.server, new_leaf_db.client)
    assert peer_uri(client_tls) == new_leaf_db.expected_uri("db", "dc1")


def _pem_key(root: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return str(
        root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    )


def _pem_cert(root: Any) -> str:
    return str(root.to_json()["RootCert"])


# -- loading the leaf into OpenSSL --------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_building_contexts_leaves_no_file_descriptor_open(ca: CertificateAuthority) -> None:
    identity = Identity()
    identity.update_roots(ca.roots_json())
    before = open_fds()
    for _ in range(3):  # renewals
        identity.update_leaf(ca.sign_leaf("web").to_json())
    assert identity.generation == 3
    assert open_fds() - before == set()


def test_without_memfd_the_leaf_goes_through_a_private_directory_that_is_removed(
    ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pairs: list[socket.socket]
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    db, web = identity_of(ca, "db"), identity_of(ca, "web")
    assert list(scratch.iterdir()) == []  # the private key is not left on disk
    assert db.server is not None and web.client is not None
    server_tls, _ = connect(pairs, db.server, web.client)
    assert peer_uri(server_tls) == web.expected_uri("web", "dc1")
