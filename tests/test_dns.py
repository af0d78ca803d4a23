"""The DNS interface of a real agent, asked by real resolvers: ``dig`` (Debian's
bind9-dnsutils; .ci/run installs it) and dnspython's stub resolver, over UDP and TCP.
Answers follow registrations at once, a reload moves the listener, and a port that is
taken leaves the agent running without DNS."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.resolver
import pytest

from tests.conftest import free_port
from tests.helpers.agent import AgentProcess, wait_for_line
from tests.helpers.processes import wait_until

SERVICES = [
    {"id": "web-1", "name": "web", "port": 8081, "address": "127.0.0.11", "tags": ["blue"]},
    {"id": "web-2", "name": "web", "port": 8082, "address": "127.0.0.12"},
    {"id": "web-3", "name": "web", "port": 8083, "address": "127.0.0.13", "check": {"ttl": "300s"}},
]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    settings = {"bind_addr": "127.0.0.1", "node_name": "host-a"}
    process = AgentProcess(tmp_path, dns=True, extra=settings)
    process.write("web.json", {"services": SERVICES})
    try:
        process.start()
        yield process
    finally:
        process.kill_everything()


def stub(agent: AgentProcess, *, tcp: bool = False) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = agent.dns_port
    resolver.lifetime = 5
    if not tcp:
        resolver.use_edns(0, 0, 1232)
    return resolver


def dig(agent: AgentProcess, *args: str) -> str:
    binary = shutil.which("dig")
    if binary is None:
        if os.environ.get("PROXY_SUPERVISOR_REQUIRE_DIG") == "1":
            pytest.fail("dig is not installed (Debian: bind9-dnsutils)")
        pytest.skip("dig is not installed (Debian: bind9-dnsutils)")
    command = [binary, "@127.0.0.1", "-p", str(agent.dns_port), "+time=3", "+tries=1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout


def test_dig_finds_healthy_instances_over_udp_and_tcp(agent: AgentProcess) -> None:
    udp = dig(agent, "web.service.consul", "A")
    assert "status: NOERROR" in udp and "flags: qr aa rd" in udp
    addresses = sorted(line.split()[-1] for line in dig(agent, "+short", "web.service.consul").split())
    assert addresses == ["127.0.0.11", "127.0.0.12"]  # web-3's TTL check is critical
    tcp = dig(agent, "+tcp", "+short", "web.service.consul", "SRV").splitlines()
    assert sorted(tcp) == [
        "1 1 8081 7f00000b.addr.dc1.consul.",
        "1 1 8082 7f00000c.addr.dc1.consul.",
    ]
    assert "status: NXDOMAIN" in dig(agent, "nope.service.consul")
    assert "hostmaster.consul." in dig(agent, "nope.service.consul")
    assert dig(agent, "+short", "_web._blue.service.consul", "SRV").split()[2] == "8081"
    assert dig(agent, "+short", "host-a.node.consul").strip() == "127.0.0.1"


def test_the_stub_resolver_follows_registrations(agent: AgentProcess) -> None:
    resolver = stub(agent)
    found = sorted(r.address for r in resolver.resolve("web.service.consul", "A"))
    assert found == ["127.0.0.11", "127.0.0.12"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("api.service.consul", "A")
    registration = {"Name": "api", "Port": 9000, "Address": "127.0.0.20"}
    assert agent.http("PUT", "/v1/agent/service/register", registration)[0] == 200
    assert [r.address for r in resolver.resolve("api.service.consul", "A")] == ["127.0.0.20"]
    srv = stub(agent, tcp=True).resolve("api.service.consul", "SRV", tcp=True)
    assert [(r.port, r.target.to_text()) for r in srv] == [(9000, "7f000014.addr.dc1.consul.")]
    assert agent.http("PUT", "/v1/agent/service/deregister/api")[0] == 200
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("api.service.consul", "A")


def test_a_reload_moves_the_listener(agent: AgentProcess) -> None:
    moved = free_port()
    agent.write("dns.json", {"ports": {"dns": moved}})
    agent.signal(signal.SIGHUP)
    old = agent.dns_port
    agent.dns_port = moved
    wait_until(lambda: _answers(agent), timeout=10, message="DNS on the new port")
    agent.dns_port = old
    assert not _answers(agent), "the old port still answers"


def test_a_taken_port_leaves_the_agent_running_without_dns(tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    agent = AgentProcess(tmp_path, dns=True)
    agent.dns_port = holder.getsockname()[1]
    agent.write("dns.json", {"ports": {"dns": agent.dns_port}})
    try:
        agent.start()
        line = wait_for_line(agent.log_path, "DNS interface not started")
        assert f"127.0.0.1:{agent.dns_port}" in line and "ports.dns" in line
        assert agent.get("/v1/agent/self")["Config"]["NodeName"]  # the API serves
    finally:
        agent.kill_everything()
        holder.close()


def _answers(agent: AgentProcess) -> bool:
    resolver = stub(agent)
    resolver.lifetime = 0.5
    try:
        resolver.resolve("web.service.consul", "A")
    except (dns.exception.Timeout, dns.resolver.NoNameservers, OSError):
        return False
    return True
