"""The DNS interface's answers (``supervisor/dns/``) from a real control plane's catalog,
as Consul 1.5 gives them: wire bytes in, wire bytes out, decoded with dnspython."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from supervisor.dns.names import Kind, Lookup, parse
from supervisor.dns.resolver import Resolver
from tests.helpers.inprocess_api import Agent

API = [
    {
        "id": f"api-{i}",
        "name": "api",
        "port": 7000 + i,
        "address": f"10.0.0.{i}",
        "tags": ["v2" if i % 2 else "v1"],
    }
    for i in range(1, 7)
]
SICK = {"id": "api-sick", "name": "api", "port": 7100, "address": "10.0.0.99", "check": {"ttl": "300s"}}
NODE = {"node_name": "node-1", "node_meta": {"rack": "r7"}}


def resolver(agent: Agent, seed: int = 5) -> Resolver:
    return Resolver(
        agent.plane.catalog, agent.plane.queries, lambda: agent.board.current.config, random.Random(seed)
    )


def ask(
    agent: Agent,
    name: str,
    rdtype: str = "A",
    *,
    transport: str = "udp",
    edns: int | None = None,
    seed: int = 5,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else None, payload=edns or 512)
    wire = resolver(agent, seed).answer(query.to_wire(), transport)  # type: ignore[arg-type]
    assert wire is not None
    return dns.message.from_wire(wire)


def answers(message: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in message.answer for rdata in rrset]


@pytest.fixture
def agent(agents: Callable[..., Agent]) -> Agent:
    return agents(services=[*API, SICK], **NODE)


def test_service_addresses_leave_critical_instances_out(agent: Agent) -> None:
    reply = ask(agent, "api.service.consul.", edns=4096)
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert sorted(answers(reply)) == [f"10.0.0.{i}" for i in range(1, 7)]  # not 10.0.0.99
    assert ask(agent, "API.Service.CONSUL.", edns=4096).answer  # names are case-insensitive


def test_warning_instances_stay_unless_only_passing(agents: Callable[..., Agent]) -> None:
    warned = {**SICK, "check": {"ttl": "300s", "status": "warning"}}
    assert "10.0.0.99" in answers(ask(agents(services=[warned]), "api.service.consul."))
    strict = agents(services=[warned], dns_config={"only_passing": True})
    assert ask(strict, "api.service.consul.").rcode() == dns.rcode.NXDOMAIN


def test_answers_are_shuffled(agent: Agent) -> None:
    firsts = {answers(ask(agent, "api.service.consul.", edns=4096, seed=seed))[0] for seed in range(20)}
    assert len(firsts) > 2


def test_tags_in_both_forms(agent: Agent) -> None:
    assert sorted(answers(ask(agent, "v1.api.service.consul."))) == ["10.0.0.2", "10.0.0.4", "10.0.0.6"]
    srv = ask(agent, "_api._v2.service.consul.", "SRV", edns=4096)
    assert sorted(int(a.split()[2]) for a in answers(srv)) == [7001, 7003, 7005]
    assert len(answers(ask(agent, "_api._tcp.service.consul.", "SRV", edns=4096))) == 6  # tcp: no tag


def test_srv_targets_the_instance_address_with_additional_records(agent: Agent) -> None:
    reply = ask(agent, "api.service.consul.", "SRV", edns=4096)
    by_port = {int(a.split()[2]): a.split() for a in answers(reply)}
    priority, weight, _, target = by_port[7001]
    assert (priority, weight, target) == ("1", "1", "0a000001.addr.dc1.consul.")
    extra = {rrset.name.to_text(): rrset[0].to_text() for rrset in reply.additional}
    assert extra["0a000001.addr.dc1.consul."] == "10.0.0.1"


def test_an_instance_on_the_node_address_is_targeted_by_node_name(agents: Callable[..., Agent]) -> None:
    reply = ask(agents(services=[{"name": "db", "port": 5432}], **NODE), "db.service.consul.", "SRV")
    assert answers(reply) == ["1 1 5432 node-1.node.dc1.consul."]
    extra = {rrset.name.to_text(): rrset[0].to_text() for rrset in reply.additional}
    assert extra["node-1.node.dc1.consul."] == "127.0.0.1"


def test_udp_without_edns_carries_three_answers_and_says_so_only_when_asked(
    agents: Callable[..., Agent], agent: Agent
) -> None:
    plain = ask(agent, "api.service.consul.")
    assert len(answers(plain)) == 3 and not plain.flags & dns.flags.TC  # Consul's default
    assert len(answers(ask(agent, "api.service.consul.", edns=4096))) == 6
    assert len(answers(ask(agent, "api.service.consul.", transport="tcp"))) == 6
    told = agents(services=API, dns_config={"enable_truncate": True, "udp_answer_limit": 2})
    truncated = ask(told, "api.service.consul.")
    assert len(answers(truncated)) == 2 and truncated.flags & dns.flags.TC


def test_a_large_answer_fits_the_clients_buffer(agents: Callable[..., Agent]) -> None:
    many = [
        {"id": f"m-{i}", "name": "many", "port": 1, "address": f"10.1.{i // 250}.{i % 250}"}
        for i in range(300)
    ]
    agent = agents(services=many)
    small = ask(agent, "many.service.consul.", edns=1232)
    assert 10 < len(answers(small)) < 300 and len(small.to_wire()) <= 1232
    assert len(answers(ask(agent, "many.service.consul.", transport="tcp"))) == 300
    srv = ask(agent, "many.service.consul.", "SRV", edns=1232)
    # Each SRV answer keeps its address record; no orphans.
    targets = {a.split()[3] for a in answers(srv)}
    assert targets == {rrset.name.to_text() for rrset in srv.additional}


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "soa"),
    [
        ("nope.service.consul.", "A", dns.rcode.NXDOMAIN, True),
        ("api.service.consul.", "AAAA", dns.rcode.NOERROR, True),  # NODATA: the name exists
        ("x.y.service.dc1.extra.consul.", "A", dns.rcode.NXDOMAIN, True),  # invalid name
        ("api.service.dc2.consul.", "A", dns.rcode.SERVFAIL, False),  # another datacenter
        ("www.example.com.", "A", dns.rcode.SERVFAIL, False),  # outside the domain, no recursors
        ("nobody.node.consul.", "A", dns.rcode.NXDOMAIN, True),
        ("nope.query.consul.", "A", dns.rcode.NXDOMAIN, True),
    ],
)
def test_names_that_find_nothing(agent: Agent, name: str, rdtype: str, rcode: int, soa: bool) -> None:
    reply = ask(agent, name, rdtype)
    assert (reply.rcode(), reply.answer) == (rcode, [])
    assert bool(reply.authority) is soa
    if soa:
        (record,) = reply.authority[0]
        assert record.to_text().startswith("ns.consul. hostmaster.consul. ")


def test_the_own_datacenter_may_be_named(agent: Agent) -> None:
    assert len(answers(ask(agent, "api.service.dc1.consul."))) == 3


def test_connect_answers_with_the_proxies(agents: Callable[..., Agent]) -> None:
    agent = agents()  # web with a managed proxy, as the harness plans it
    planned = agent.board.current.proxies["web-proxy"]
    reply = ask(agent, "web.connect.consul.", "SRV")
    assert [a.split()[2] for a in answers(reply)] == [str(planned.port)]
    assert ask(agent, "db.connect.consul.").rcode() == dns.rcode.NXDOMAIN  # db is no Connect service


def test_a_prepared_query_answers_with_its_ttl(agent: Agent) -> None:
    body = {"Name": "v1-api", "Service": {"Service": "api", "Tags": ["v1"]}, "DNS": {"TTL": "7s"}}
    assert agent.call("POST", "/v1/query", body).status == 200
    reply = ask(agent, "v1-api.query.consul.", edns=4096)
    assert sorted(answers(reply)) == ["10.0.0.2", "10.0.0.4", "10.0.0.6"]
    assert {rrset.ttl for rrset in reply.answer} == {7}


def test_ttls_from_dns_config(agents: Callable[..., Agent]) -> None:
    settings: dict[str, Any] = {
        "dns_config": {"node_ttl": "30s", "service_ttl": {"ap*": "5s", "api": "9s", "*": "1s"}}
    }
    agent = agents(
        services=[*API, {"name": "apex", "port": 1}, {"name": "db", "port": 2}], **NODE, **settings
    )
    assert {r.ttl for r in ask(agent, "api.service.consul.").answer} == {9}  # exact wins
    assert {r.ttl for r in ask(agent, "apex.service.consul.").answer} == {5}  # longest prefix
    assert {r.ttl for r in ask(agent, "db.service.consul.").answer} == {1}
    assert {r.ttl for r in ask(agent, "node-1.node.consul.").answer} == {30}


def test_node_lookups_carry_the_node_meta_as_txt(agent: Agent) -> None:
    reply = ask(agent, "node-1.node.consul.")
    assert answers(reply) == ["127.0.0.1"]
    assert [r[0].to_text() for r in reply.additional] == ['"rack=r7"']
    assert answers(ask(agent, "node-1.node.dc1.consul.", "TXT")) == ['"rack=r7"']
    assert ask(agent, "node-1.node.consul.", "MX").answer == []


def test_soa_and_ns_name_this_node_with_glue(agent: Agent) -> None:
    reply = ask(agent, "consul.", "SOA")
    assert answers(reply)[0].startswith("ns.consul. hostmaster.consul. ")
    assert [r[0].to_text() for r in reply.authority] == ["node-1.node.dc1.consul."]
    assert [r[0].to_text() for r in reply.additional] == ["127.0.0.1"]


def test_another_domain(agents: Callable[..., Agent]) -> None:
    agent = agents(services=API, domain="mesh.internal")
    assert len(answers(ask(agent, "api.service.mesh.internal.", edns=4096))) == 6
    assert ask(agent, "api.service.consul.").rcode() == dns.rcode.SERVFAIL


def test_addr_names(agent: Agent) -> None:
    assert answers(ask(agent, "0a000001.addr.dc1.consul.")) == ["10.0.0.1"]
    assert ask(agent, "zz.addr.consul.").rcode() == dns.rcode.NXDOMAIN


def test_malformed_and_unsupported_messages(agent: Agent) -> None:
    answer = resolver(agent).answer
    assert answer(b"\x00\x01", "udp") is None  # not even a header: dropped
    garbage = answer(b"\x12\x34" + b"\xff" * 30, "udp")
    assert garbage is not None and garbage[:2] == b"\x12\x34"
    assert dns.rcode.from_flags(int.from_bytes(garbage[2:4], "big"), 0) == dns.rcode.FORMERR
    status = dns.message.make_query("api.service.consul.", "A")
    status.set_opcode(dns.opcode.STATUS)
    reply = answer(status.to_wire(), "udp")
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.NOTIMP
    axfr = ask(agent, "consul.", "AXFR", transport="tcp")
    assert axfr.rcode() == dns.rcode.NOTIMP


@pytest.mark.parametrize(
    ("labels", "srv", "expected"),
    [
        (["web", "service"], False, Lookup(Kind.SERVICE, "web")),
        (["a.b", "web", "service"], False, Lookup(Kind.SERVICE, "web", "a.b")),
        (["_web", "_tcp"], True, Lookup(Kind.SERVICE, "web")),
        (["web", "connect", "dc2"], False, Lookup(Kind.CONNECT, "web", "", "dc2")),
        (["q", "query"], False, Lookup(Kind.QUERY, "q")),
        (["host", "example", "node"], False, Lookup(Kind.NODE, "host.example")),
        (["service"], False, Lookup(Kind.INVALID)),
        (["web", "service", "dc1", "more"], False, Lookup(Kind.INVALID)),
        ([], False, Lookup(Kind.INVALID)),
    ],
)
def test_name_parsing(labels: list[str], srv: bool, expected: Lookup) -> None:
    assert parse(labels, srv=srv) == expected


def test_repeated_questions_are_reused_yet_spread_and_follow_changes(agent: Agent) -> None:
    answer = resolver(agent).answer  # one resolver: its answer cache is in play
    firsts = set()
    for number in range(60):
        query = dns.message.make_query("api.service.consul.", "A", use_edns=0, payload=4096)
        query.id = number
        reply = dns.message.from_wire(answer(query.to_wire(), "udp") or b"")
        assert reply.id == number  # each client gets its own ID back
        firsts.add(answers(reply)[0])
    assert len(firsts) > 1
    new = {"ID": "api-7", "Name": "api", "Port": 7007, "Address": "10.0.0.7"}
    assert agent.call("PUT", "/v1/agent/service/register", new).status == 200
    query = dns.message.make_query("api.service.consul.", "A", use_edns=0, payload=4096)
    assert "10.0.0.7" in answers(dns.message.from_wire(answer(query.to_wire(), "udp") or b""))


def test_letter_case_is_echoed_also_from_reused_answers(agent: Agent) -> None:
    answer = resolver(agent).answer
    for spelling in ["api.service.consul.", "ApI.sErViCe.CoNsUl.", "API.SERVICE.CONSUL."] * 5:
        query = dns.message.make_query(spelling, "A", use_edns=0, payload=4096)
        reply = dns.message.from_wire(answer(query.to_wire(), "udp") or b"")
        assert reply.question[0].name.to_text() == spelling  # byte for byte, as 0x20 checks
        assert {rrset.name.to_text() for rrset in reply.answer} == {spelling}
        assert len(answers(reply)) == 6


def test_hostile_catalog_contents_cost_an_instance_never_the_answer(agents: Callable[..., Agent]) -> None:
    services = [
        {"id": "h-good", "name": "h", "port": 1, "address": "10.9.0.1"},
        {"id": "h-bad", "name": "h", "port": 2, "address": "a..b"},  # no DNS name can carry it
        {"id": "h-long", "name": "h", "port": 3, "address": "x" * 64},
    ]
    agent = agents(services=services, node_name="node-1", node_meta={"long": "v" * 400})
    assert answers(ask(agent, "h.service.consul.", "ANY", edns=4096)) == ["10.9.0.1"]
    txt = ask(agent, "node-1.node.consul.", "TXT")
    assert [len(s) for rrset in txt.answer for rdata in rrset for s in rdata.strings] == [255, 150]


def test_names_and_tags_match_whatever_their_case(agents: Callable[..., Agent]) -> None:
    agent = agents(services=[{"name": "UPPER", "port": 1, "address": "10.9.0.2", "tags": ["Primary"]}])
    assert answers(ask(agent, "upper.service.consul.")) == ["10.9.0.2"]
    assert answers(ask(agent, "primary.UPPER.service.consul.")) == ["10.9.0.2"]
    assert len(answers(ask(agent, "_upper._primary.service.consul.", "SRV"))) == 1


def test_responses_and_odd_addr_names_get_nothing(agent: Agent) -> None:
    answer = resolver(agent).answer
    response = dns.message.make_response(dns.message.make_query("api.service.consul.", "A"))
    assert answer(response.to_wire(), "udp") is None  # a response sent to us: dropped
    assert ask(agent, "7f 000001.addr.consul.").rcode() == dns.rcode.NXDOMAIN


def test_an_answer_larger_than_any_message_is_cut_to_fit(agents: Callable[..., Agent]) -> None:
    many = [{"id": f"v6-{i}", "name": "v6", "port": 1, "address": f"fd00::{i:x}"} for i in range(2500)]
    agent = agents(services=many)
    for transport in ("tcp", "udp"):
        reply = ask(agent, "v6.service.consul.", "AAAA", transport=transport, edns=65535)
        assert 1000 < len(answers(reply)) < 2500 and len(reply.to_wire()) <= 65535
