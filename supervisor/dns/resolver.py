"""Answers to DNS queries from the catalog, as Consul 1.5's ``agent/dns.go`` gives them.

``Resolver.answer`` takes a query's wire bytes and returns the response's (dnspython does
the wire format); no sockets, so every rule is tested directly: critical instances left
out (and warning ones with ``only_passing``), answers shuffled, SRV with the node (or
``<hex>.addr``) targets and their addresses as additional records, NXDOMAIN with the SOA
for names that find nothing, NODATA with the SOA for a type an instance lacks, SERVFAIL
for names outside the domain and other datacenters, and the trimming of ``truncate``.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rrset

from supervisor.catalog.catalog import Catalog
from supervisor.catalog.errors import InvalidDefinition, NotFound
from supervisor.catalog.execution import execute
from supervisor.catalog.model import Entry
from supervisor.catalog.queries import Queries
from supervisor.catalog.status import CheckStatus
from supervisor.config.durations import parse_duration
from supervisor.config.model import AgentConfig
from supervisor.dns.cache import AnswerCache
from supervisor.dns.names import Kind, Lookup, parse
from supervisor.dns.truncate import Records, fit, limits

log = logging.getLogger("supervisor.dns")

Transport = Literal["udp", "tcp"]
A, AAAA, SRV, TXT, ANY = (
    dns.rdatatype.A,
    dns.rdatatype.AAAA,
    dns.rdatatype.SRV,
    dns.rdatatype.TXT,
    dns.rdatatype.ANY,
)
IN = dns.rdataclass.IN
# Rdata made directly (dnspython's record classes are untyped): parsing record text costs
# more than the rest of an answer.
Make = Callable[..., dns.rdata.Rdata]
AddressV4: Make = dns.rdtypes.IN.A.A
AddressV6: Make = dns.rdtypes.IN.AAAA.AAAA
Service: Make = dns.rdtypes.IN.SRV.SRV
CNAME: Make = dns.rdtypes.ANY.CNAME.CNAME
Text: Make = dns.rdtypes.ANY.TXT.TXT


class Unanswerable(Exception):
    """The query is answered with this rcode and nothing else (SERVFAIL, NOTIMP …)."""

    def __init__(self, rcode: dns.rcode.Rcode) -> None:
        super().__init__(dns.rcode.to_text(rcode))
        self.rcode = rcode


@dataclass
class Resolver:
    catalog: Catalog
    queries: Queries
    config: Callable[[], AgentConfig]
    rng: random.Random = field(default_factory=random.Random)
    wall_clock: Callable[[], float] = time.time  # the SOA serial is a Unix time, as Consul's

    cache: AnswerCache = field(default_factory=AnswerCache)

    def answer(self, wire: bytes, transport: Transport) -> bytes | None:
        """The response to one query message; None for bytes that are no DNS message at all."""
        config = self.config()
        end = _question_name_end(wire)
        if end is None:
            return self._answer(wire, transport, config)
        # Keyed without the ID and with the name in lower case: resolvers that randomize
        # the letter case (0x20) still share answers. A reused answer gets the client's ID
        # and name back in place (same length; the answers point at the question's name).
        key = (wire[2:12] + wire[12:end].lower() + wire[end:], transport)
        version = (self.catalog.index.value, int(self.wall_clock()))
        cached = self.cache.get(key, version, config, self.rng)
        if cached is not None:
            return wire[:2] + cached[2:12] + wire[12:end] + cached[end:]
        reply = self._answer(wire, transport, config)
        if reply is not None and reply[12:end].lower() == wire[12:end].lower():
            self.cache.put(key, version, reply)
        return reply

    def _answer(self, wire: bytes, transport: Transport, config: AgentConfig) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - any malformed message is a FORMERR, never a crash
            return _format_error(wire)
        if query.flags & dns.flags.QR:
            return None  # a response sent to us: dropped, as Consul's server does
        response = dns.message.make_response(query)
        response.use_edns(0 if query.edns >= 0 else False, payload=max(query.payload, 512))
        response.flags |= dns.flags.AA
        try:
            if query.opcode() != dns.opcode.QUERY:
                raise Unanswerable(dns.rcode.NOTIMP)
            if len(query.question) != 1:
                raise Unanswerable(dns.rcode.FORMERR)
            records = self._resolve(query, config)
        except Unanswerable as refusal:
            response.set_rcode(refusal.rcode)
            return response.to_wire(max_size=65535)
        response.set_rcode(records.rcode)
        response.authority = list(records.authority)
        dns_config = config.dns
        keep, max_size = limits(records, query, transport, dns_config)

        def render(count: int) -> bytes | None:
            response.answer, response.additional = records.first(count)
            try:
                return response.to_wire(max_size=65535)
            except dns.exception.TooBig:
                return None  # more than any DNS message can carry

        kept, reply = fit(render, keep, max_size)
        truncated = kept < len(records.answer)
        if reply is None:  # not even one answer fits: an empty answer that says so
            kept, truncated = 0, True
        if truncated and (dns_config.enable_truncate or reply is None):
            response.flags |= dns.flags.TC
            reply = render(kept)
        assert reply is not None
        return reply

    # -- dispatch -----------------------------------------------------------------------

    def _resolve(self, query: dns.message.Message, config: AgentConfig) -> Records:
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        if question.rdclass not in (IN, dns.rdataclass.ANY):
            raise Unanswerable(dns.rcode.NOTIMP)
        domain = dns.name.from_text(config.domain)
        if not qname.is_subdomain(domain):
            raise Unanswerable(dns.rcode.SERVFAIL)  # Consul without recursors
        if qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            raise Unanswerable(dns.rcode.NOTIMP)
        serial = int(self.wall_clock()) & 0xFFFFFFFF
        context = _Context(config, domain, qname, qtype, serial, self.catalog.node.address)
        if qtype == dns.rdatatype.SOA:
            return Records(answer=[context.soa()], authority=context.nameservers(), additional=context.glue())
        if qtype == dns.rdatatype.NS:
            return Records(answer=context.nameservers(), additional=context.glue())
        labels = [label.decode("ascii", "replace").lower() for label in qname.relativize(domain).labels]
        lookup = parse(labels, srv=qtype == SRV)
        if lookup.datacenter and lookup.datacenter != config.datacenter.lower():
            raise Unanswerable(dns.rcode.SERVFAIL)  # "No path to datacenter"
        if lookup.kind is Kind.SERVICE or lookup.kind is Kind.CONNECT:
            return self._service(context, lookup)
        if lookup.kind is Kind.NODE:
            return self._node(context, lookup)
        if lookup.kind is Kind.QUERY:
            return self._query(context, lookup)
        if lookup.kind is Kind.ADDR:
            return context.addr(lookup.name)
        log.debug("dns: invalid query name %s", qname)
        return context.nxdomain()

    def _service(self, context: _Context, lookup: Lookup) -> Records:
        dns_config = context.config.dns
        entries = self.catalog.select(
            lookup.name,
            connect=lookup.kind is Kind.CONNECT,
            tags=(lookup.tag,) if lookup.tag else (),
            passing=dns_config.only_passing,
            exclude_critical=True,
            any_case=True,
        )
        if not entries:
            return context.nxdomain()
        self.rng.shuffle(entries)
        return context.service_records(entries, dns_config.service_ttl_for(lookup.name))

    def _query(self, context: _Context, lookup: Lookup) -> Records:
        try:
            result = execute(self.queries, self.catalog, lookup.name)
        except (NotFound, InvalidDefinition):
            return context.nxdomain()
        if not result.entries:
            return context.nxdomain()
        ttl = context.config.dns.service_ttl_for(result.service)
        if result.dns_ttl:
            try:
                ttl = parse_duration(result.dns_ttl)
            except ValueError:
                log.warning(
                    "prepared query %s: DNS TTL %r is not a duration", result.query.id, result.dns_ttl
                )
        entries = list(result.entries)
        self.rng.shuffle(entries)
        return context.service_records(entries, ttl)

    def _node(self, context: _Context, lookup: Lookup) -> Records:
        node = self.catalog.node
        if lookup.name != node.name.lower():
            return context.nxdomain()
        if context.qtype not in (A, AAAA, ANY, TXT):
            return Records()  # NOERROR, nothing, no SOA: Consul's answer
        ttl = context.config.dns.node_ttl
        records = Records()
        if context.qtype != TXT:
            records.answer += context.address_records(context.qname, node.address, ttl)
        meta = context.meta_txt(context.qname, node.meta, ttl)
        if context.qtype in (ANY, TXT):
            records.answer += meta
        elif context.config.dns.enable_additional_node_meta_txt:
            records.additional += meta
        return records


@dataclass
class _Context:
    """One query's fixed facts and the record builders that need them."""

    config: AgentConfig
    domain: dns.name.Name
    qname: dns.name.Name
    qtype: dns.rdatatype.RdataType
    serial: int
    node_address: str  # this node's, as the catalog has it

    def soa(self) -> dns.rrset.RRset:
        soa = self.config.dns.soa
        text = (
            f"ns.{self.domain} hostmaster.{self.domain} {self.serial} "
            f"{soa.refresh} {soa.retry} {soa.expire} {soa.min_ttl}"
        )
        return dns.rrset.from_text(self.domain, soa.min_ttl, IN, dns.rdatatype.SOA, text)

    def nxdomain(self) -> Records:
        return Records(authority=[self.soa()], rcode=dns.rcode.NXDOMAIN)

    def _node_target(self) -> dns.name.Name:
        return _name(f"{self.config.node_name}.node.{self.config.datacenter}.", self.domain)

    def nameservers(self) -> list[dns.rrset.RRset]:
        ttl = int(self.config.dns.node_ttl)
        return [dns.rrset.from_text(self.domain, ttl, IN, dns.rdatatype.NS, self._node_target().to_text())]

    def glue(self) -> list[dns.rrset.RRset]:
        target, address = self._node_target(), self.node_address
        return self.address_records(target, address, self.config.dns.node_ttl, glue=True)

    def address_records(
        self, owner: dns.name.Name, address: str, ttl: float, *, glue: bool = False
    ) -> list[dns.rrset.RRset]:
        """A or AAAA (as the question and the address allow; glue whatever the question),
        a CNAME for a host name."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            if self.qtype not in (A, AAAA, ANY) or not address:
                return []
            try:
                target = dns.name.from_text(_fqdn(address))
            except (dns.exception.DNSException, ValueError):
                return []  # an address DNS cannot carry ("a..b"): that instance has no record
            return [dns.rrset.from_rdata(owner, int(ttl), CNAME(IN, dns.rdatatype.CNAME, target))]
        kind = A if ip.version == 4 else AAAA
        if not glue and self.qtype not in (kind, ANY, SRV):
            return []
        rdata = AddressV4(IN, A, str(ip)) if kind == A else AddressV6(IN, AAAA, str(ip))
        return [dns.rrset.from_rdata(owner, int(ttl), rdata)]

    def meta_txt(self, owner: dns.name.Name, meta: Mapping[str, str], ttl: float) -> list[dns.rrset.RRset]:
        texts = [value if key.startswith("rfc1035-") else f"{key}={value}" for key, value in meta.items()]
        # A TXT string holds 255 bytes; longer values (Consul allows 512) span several.
        return [
            dns.rrset.from_rdata(owner, int(ttl), Text(IN, TXT, _chunks(text.encode()))) for text in texts
        ]

    def addr(self, text: str) -> Records:
        if not _HEX.fullmatch(text):
            return self.nxdomain()
        raw = bytes.fromhex(text)
        if len(raw) not in (4, 16):
            return Records()
        address = str(ipaddress.ip_address(raw))
        return Records(answer=self.address_records(self.qname, address, self.config.dns.node_ttl))

    def service_records(self, entries: list[Entry], ttl: float) -> Records:
        records = Records(srv=self.qtype == SRV)
        limit = self.config.dns.a_record_limit
        seen: set[tuple[str, str, int]] = set()
        producing = 0
        for entry in entries:
            node_address = entry.node.address
            address = entry.instance.address or node_address
            key = (entry.node.name, address, entry.instance.port if self.qtype == SRV else 0)
            if key in seen:
                continue
            seen.add(key)
            if self.qtype == SRV:
                records.add_srv(*self._srv(entry, address, node_address, ttl))
                continue
            if limit and producing >= limit:
                break
            found = self.address_records(self.qname, address, ttl)
            if found:
                producing += 1
                records.answer += found
        if not records.answer:
            records.authority.append(self.soa())  # NODATA: the name exists, not this type
        return records

    def _srv(
        self, entry: Entry, address: str, node_address: str, ttl: float
    ) -> tuple[dns.rrset.RRset, list[dns.rrset.RRset]]:
        passing, warning = entry.instance.weights
        weight = warning if entry.status is CheckStatus.WARNING else passing
        dc = self.config.datacenter
        if address != node_address and _is_ip(address):
            target = _name(f"{ipaddress.ip_address(address).packed.hex()}.addr.{dc}.", self.domain)
        else:
            target = _name(f"{entry.node.name}.node.{dc}.", self.domain)
        srv = dns.rrset.from_rdata(
            self.qname, int(ttl), Service(IN, SRV, 1, weight, entry.instance.port, target)
        )
        return srv, self.address_records(target, address, ttl)


def _name(relative: str, domain: dns.name.Name) -> dns.name.Name:
    try:
        return dns.name.from_text(relative.rstrip("."), origin=domain)
    except (dns.exception.DNSException, ValueError):
        raise Unanswerable(dns.rcode.SERVFAIL) from None  # a node name DNS cannot carry


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _fqdn(host: str) -> str:
    return host if host.endswith(".") else host + "."


_HEX = re.compile(r"(?:[0-9a-f]{2})+")


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


def _question_name_end(wire: bytes) -> int | None:
    """Where the first question's name ends in a query (None: no plain name there)."""
    if len(wire) < 12 or wire[4:6] != b"\x00\x01":
        return None
    position = 12
    while position < len(wire):
        length = wire[position]
        if length == 0:
            return position + 1
        if length > 63:
            return None  # a compression pointer (or worse) in a query
        position += 1 + length
    return None


def _format_error(wire: bytes) -> bytes | None:
    """FORMERR for a message whose header can be read; None (dropped) for less."""
    if len(wire) < 12:
        return None
    flags = dns.flags.QR | (int.from_bytes(wire[2:4], "big") & dns.flags.RD)
    header = wire[0:2] + (flags | dns.rcode.FORMERR).to_bytes(2, "big") + bytes(8)
    return header
