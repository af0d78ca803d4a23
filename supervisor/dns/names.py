"""What a query name asks for, as Consul 1.5's ``dispatch`` reads it (``agent/dns.go``).

Labels are read from the right: the last one names the kind (``service``, ``connect``,
``node``, ``query``, ``addr``); one unknown label there is a datacenter, a second one makes
the name invalid. An SRV question whose last label starts with ``_`` is an RFC 2782
service name (``_web._tcp.consul``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    SERVICE = "service"
    CONNECT = "connect"
    NODE = "node"
    QUERY = "query"
    ADDR = "addr"
    INVALID = "invalid"  # answered NXDOMAIN with the SOA


@dataclass(frozen=True)
class Lookup:
    kind: Kind
    name: str = ""
    tag: str = ""
    datacenter: str = ""  # "": the agent's own


INVALID = Lookup(Kind.INVALID)
_KINDS = {kind.value: kind for kind in Kind if kind is not Kind.INVALID}


def parse(labels: list[str], *, srv: bool) -> Lookup:
    """``labels``: the query name below the agent's domain, lower-cased, left to right."""
    if srv and labels and labels[-1].startswith("_"):
        labels = [*labels, "service"]
    datacenter = ""
    while labels:
        kind = _KINDS.get(labels[-1])
        if kind is None:
            if datacenter:
                return INVALID  # a second label that is no kind
            datacenter = labels[-1]
            labels = labels[:-1]
            continue
        return _lookup(kind, labels[:-1], datacenter)
    return INVALID


def _lookup(kind: Kind, labels: list[str], datacenter: str) -> Lookup:
    if not labels:
        return INVALID
    if kind is Kind.SERVICE:
        if len(labels) == 2 and labels[0].startswith("_") and labels[1].startswith("_"):
            tag = labels[1][1:]
            return Lookup(kind, labels[0][1:], "" if tag == "tcp" else tag, datacenter)
        return Lookup(kind, labels[-1], ".".join(labels[:-1]), datacenter)
    if kind is Kind.CONNECT:
        return Lookup(kind, labels[0], "", datacenter) if len(labels) == 1 else INVALID
    if kind is Kind.ADDR:
        return Lookup(kind, labels[0], "", datacenter) if len(labels) == 1 else INVALID
    return Lookup(kind, ".".join(labels), "", datacenter)
