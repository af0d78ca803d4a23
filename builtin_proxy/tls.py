"""The proxy's TLS identity: CA roots and its leaf, turned into server and client contexts.

Both contexts are rebuilt whenever the roots or the leaf change (renewal, rotation);
new connections take the current ones, established connections keep theirs. TLS 1.2+,
client certificates required and verified against every current root. The only ALPN
protocol is this project's tunnel protocol (``frames.py``), offered by our upstream side
and selected by our public side; never ``h2``: this is a layer-4 proxy (Consul 1.2-1.5
wrongly offered it, issue 4466).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from typing import Any

from supervisor.connect.spiffe import InvalidSpiffeID, parse_service

TUNNEL_ALPN = "x-proxy-supervisor-tunnel/1"
TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"


def parse_service_uri(uri: str) -> tuple[str, str, str] | None:
    """(trust domain, datacenter, service) of a Connect service identity, else None (the
    agent's own parser: one set of rules for what counts as an identity)."""
    try:
        identity = parse_service(uri or "")
    except InvalidSpiffeID:
        return None
    return identity.trust_domain, identity.datacenter, identity.service


def peer_uri(sock: ssl.SSLSocket) -> str | None:
    """The first URI SAN of the verified peer certificate."""
    cert = sock.getpeercert()
    if not cert:
        return None
    for entry in cert.get("subjectAltName", ()):
        if len(entry) == 2 and entry[0] == "URI":
            return str(entry[1])
    return None


def _load_chain(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` only reads files: hand it an in-memory file where Linux has one
    (memfd: the key never touches a disk), else a private temporary directory."""
    if hasattr(os, "memfd_create"):
        fds = []
        try:
            for content in (cert_pem, key_pem):
                fd = os.memfd_create("proxy-leaf", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, content.encode())
            context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            return
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="proxy-leaf-") as directory:
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, content in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(content)
        context.load_cert_chain(cert_path, key_path)


class Identity:
    """Current roots + leaf, and the contexts built from them (lives on the event loop)."""

    def __init__(self) -> None:
        self.trust_domain = ""
        self.trust_domains: tuple[str, ...] = ()  # every domain a server may be in (a CA switch)
        self.roots_pem: tuple[str, ...] = ()
        self.leaf_cert_pem = ""
        self.leaf_key_pem = ""
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        self.tunnel_client: ssl.SSLContext | None = None  # offers the tunnel protocol (ALPN)
        self.generation = 0

    @property
    def ready(self) -> bool:
        return self.server is not None and self.client is not None

    def update_roots(self, data: dict[str, Any]) -> bool:
        roots = tuple(root["RootCert"] for root in data.get("Roots") or [] if root.get("RootCert"))
        domain = str(data.get("TrustDomain") or "").lower()
        listed = data.get("TrustDomains")  # (ours, in a cluster's CA switch: Consul's agents send one)
        domains = tuple(str(d).lower() for d in listed) if isinstance(listed, list) and listed else (domain,)
        if roots == self.roots_pem and domain == self.trust_domain and domains == self.trust_domains:
            return False
        self.roots_pem, self.trust_domain, self.trust_domains = roots, domain, domains
        return self._rebuild()

    def update_leaf(self, data: dict[str, Any]) -> bool:
        cert, key = str(data.get("CertPEM") or ""), str(data.get("PrivateKeyPEM") or "")
        if (cert, key) == (self.leaf_cert_pem, self.leaf_key_pem):
            return False
        self.leaf_cert_pem, self.leaf_key_pem = cert, key
        return self._rebuild()

    def expected_uri(self, service: str, datacenter: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/default/dc/{datacenter}/svc/{service}"

    def accepts(self, uri: str | None, service: str, datacenter: str) -> bool:
        """The server's certificate names ``service`` in a trust domain we accept now."""
        path = f"/ns/default/dc/{datacenter}/svc/{service}"
        return uri is not None and any(
            uri == f"spiffe://{domain}{path}" for domain in self.trust_domains or (self.trust_domain,)
        )

    def _rebuild(self) -> bool:
        if not self.roots_pem or not self.leaf_cert_pem:
            return False
        server = self._context(ssl.PROTOCOL_TLS_SERVER)
        client = self._context(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False  # identity is the SPIFFE URI, checked after the handshake
        tunnel = self._context(ssl.PROTOCOL_TLS_CLIENT)
        tunnel.check_hostname = False
        tunnel.set_alpn_protocols([TUNNEL_ALPN])  # only our upstream side offers it
        server.set_alpn_protocols([TUNNEL_ALPN])  # selected only for a client that offers it
        self.server, self.client, self.tunnel_client = server, client, tunnel
        self.generation += 1
        return True

    def _context(self, protocol: int) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_ciphers(TLS12_CIPHERS)
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        # Half-close ends a direction with a TCP FIN, not a close_notify (which would end
        # the TLS session both ways). OpenSSL 3 reports such an end as an error unless told.
        context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        context.load_verify_locations(cadata="".join(self.roots_pem))
        _load_chain(context, self.leaf_cert_pem, self.leaf_key_pem)
        return context
