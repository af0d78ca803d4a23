"""SPIFFE identities of Connect: ``spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

_SERVICE_PATH = re.compile(r"^/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)$")


class InvalidSpiffeID(ValueError):
    """The URI is not a Connect identity."""


@dataclass(frozen=True)
class ServiceID:
    trust_domain: str
    namespace: str
    datacenter: str
    service: str

    @property
    def uri(self) -> str:
        return (
            f"spiffe://{self.trust_domain}/ns/{quote(self.namespace, safe='')}"
            f"/dc/{quote(self.datacenter, safe='')}/svc/{quote(self.service, safe='')}"
        )

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class SigningID:
    """The identity of a CA (a URI with a trust domain and no path); never a client."""

    trust_domain: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}"


def service_id(trust_domain: str, datacenter: str, service: str, namespace: str = "default") -> ServiceID:
    return ServiceID(trust_domain.lower(), namespace, datacenter, service)


def parse(uri: str) -> ServiceID | SigningID:
    """Parse a Connect URI (Consul's rules: scheme spiffe; a service path or no path at all)."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise InvalidSpiffeID(f"not a URI: {uri!r}") from exc
    if parts.scheme.lower() != "spiffe" or not parts.netloc:
        raise InvalidSpiffeID(f"SPIFFE ID is not in the expected format: {uri!r}")
    host = parts.netloc.lower()
    if parts.path in ("", "/") and not parts.query and "." in host:
        return SigningID(host)
    match = _SERVICE_PATH.match(parts.path)
    if match is None or parts.query or parts.fragment:
        raise InvalidSpiffeID(f"SPIFFE ID is not in the expected format: {uri!r}")
    namespace, datacenter, service = (unquote(group) for group in match.groups())
    return ServiceID(host, namespace, datacenter, service)


def parse_service(uri: str) -> ServiceID:
    parsed = parse(uri)
    if not isinstance(parsed, ServiceID):
        raise InvalidSpiffeID(f"not a service identity (a CA signing ID): {uri!r}")
    return parsed
