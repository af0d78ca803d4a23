"""Where the cluster's state lives in etcd: every key under ``<key_prefix><datacenter>/``.

    meta/cluster                    the cluster's index base (written once, by the first agent)
    nodes/<node>                    a host: ID, name, address, datacenter, meta
    alive/<node>                    leased by that host's agent: gone when it stops renewing
    services/<node>/<service-id>    an instance on that host
    checks/<node>/<check-id>        a check on that host
    intentions/..., queries/...     shared by every host (``documents.py``)
    ca/...                          the cluster's CA (``authority.py``, ``signer.py``)

Every host writes only under its own name (so etcd's role-based access can confine a host
to its keys); node, service and check keys carry no lease, so an agent's restart or a
short etcd outage never drops them -- only ``alive/`` comes and goes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    META = "meta"
    NODE = "nodes"
    ALIVE = "alive"
    SERVICE = "services"
    CHECK = "checks"


@dataclass(frozen=True)
class Parsed:
    kind: Kind
    node: str = ""
    item: str = ""  # a service or check ID


@dataclass(frozen=True)
class Layout:
    prefix: str  # ends with "/"
    datacenter: str

    @property
    def root(self) -> str:
        return f"{self.prefix}{self.datacenter}/"

    def meta(self) -> str:
        return f"{self.root}meta/cluster"

    def node(self, node: str) -> str:
        return f"{self.root}nodes/{node}"

    def alive(self, node: str) -> str:
        return f"{self.root}alive/{node}"

    def services(self, node: str) -> str:
        return f"{self.root}services/{node}/"

    def service(self, node: str, service_id: str) -> str:
        return f"{self.services(node)}{service_id}"

    def checks(self, node: str) -> str:
        return f"{self.root}checks/{node}/"

    def check(self, node: str, check_id: str) -> str:
        return f"{self.checks(node)}{check_id}"

    def intention(self, intention_id: str) -> str:
        return f"{self.root}intentions/by-id/{intention_id}"

    def intention_pair(self, source: str, destination: str) -> str:
        return f"{self.root}intentions/by-pair/{source}/{destination}"

    def query(self, query_id: str) -> str:
        return f"{self.root}queries/by-id/{query_id}"

    def query_name(self, name: str) -> str:
        return f"{self.root}queries/by-name/{name}"

    def tombstone(self, node: str) -> str:
        """When a host was first seen dead (``reaper.py``)."""
        return f"{self.root}tombstones/{node}"

    def tombstones(self) -> str:
        return f"{self.root}tombstones/"

    def ca_roots(self) -> str:
        return f"{self.root}ca/roots"

    def ca_key(self, root_id: str) -> str:
        return f"{self.root}ca/key/{root_id}"

    def ca_signer(self) -> str:
        return f"{self.root}ca/signer"

    def ca_requests(self) -> str:
        return f"{self.root}ca/csr/"

    def ca_request(self, node: str, request_id: str) -> str:
        return f"{self.root}ca/csr/{node}/{request_id}"

    def ca_issued(self, node: str, request_id: str) -> str:
        return f"{self.root}ca/issued/{node}/{request_id}"

    def own(self, node: str) -> tuple[str, ...]:
        """The prefixes (and keys) a host owns: what anti-entropy reconciles and ``leave`` deletes."""
        return (self.node(node), self.services(node), self.checks(node))

    def parse(self, key: str) -> Parsed | None:
        """What a key under the root is (None: not one of ours)."""
        if not key.startswith(self.root):
            return None
        kind_name, _, rest = key[len(self.root) :].partition("/")
        try:
            kind = Kind(kind_name)
        except ValueError:
            return None
        if kind is Kind.META:
            return Parsed(kind, item=rest)
        if kind in (Kind.NODE, Kind.ALIVE):
            return Parsed(kind, rest) if rest and "/" not in rest else None
        node, _, item = rest.partition("/")
        return Parsed(kind, node, item) if node and item else None
