"""DNS interface benchmark: dnsperf (DNS-OARC, Debian's ``dnsperf``) against the agent and,
as the peer in the same run, dnsmasq (C) answering the same names from static records.

Two measurements per server and query file:

* throughput: dnsperf with 4 clients and up to 64 queries outstanding for ``seconds``;
* latency: a fixed, moderate rate (``rate`` queries/s, well below either's throughput)
  with dnsperf's per-query report, for p50 and p99.

Three query files. Two are a mix of service A, SRV with additional records, a tag
lookup, a prepared query and an unknown name: the five names as written (what a busy
client asks: the agent reuses rendered answers, see ``supervisor/dns/cache.py``), and
2,000 variants in random letter case, as resolvers with 0x20 randomization send them.
The third asks 50,000 different names of a catch-all prepared query template, so nearly
no answer can be reused: every one is built from the catalog (the cold path). dnsmasq
answers those from one wildcard record.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.agent_bench import percentile
from bench.common import Agent, BenchError, Ports

INSTANCES = 5
WORKLOADS = ("repeated", "0x20", "unique")
QUERIES = [
    ("web.service.consul", "A"),
    ("web.service.consul", "SRV"),
    ("blue.web.service.consul", "A"),
    ("web-query.query.consul", "A"),
    ("nope.service.consul", "A"),
]


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(f"/usr/sbin/{tool}")
    if path is None:
        raise BenchError(f"{tool} is not installed: apt-get install {package}")
    return path


def _dnsperf(port: int, queries: Path, *args: str) -> str:
    command = [_need("dnsperf", "dnsperf"), "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def measure(port: int, queries: Path, seconds: float, rate: int) -> dict[str, Any]:
    out = _dnsperf(port, queries, "-l", str(seconds), "-c", "4", "-q", "64")
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    verbose = _dnsperf(port, queries, "-l", str(min(seconds, 5)), "-Q", str(rate), "-v")
    latencies = [float(m) * 1e3 for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", verbose, re.M)]
    codes = sorted(set(re.findall(r"^> (\S+) ", verbose, re.M)))
    if not latencies:
        raise BenchError(f"dnsperf reported no answers:\n{verbose[-2000:]}")
    return {
        "qps": round(qps),
        "lost": int(lost.group(1)) if lost else 0,
        "p50_ms": round(percentile(latencies, 0.5), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "samples": len(latencies),
        "rcodes": codes,
    }


def _agent(root: Path, ports: Ports) -> tuple[Agent, int]:
    dns_port = ports.take()
    services = [
        {
            "id": f"web-{i}",
            "name": "web",
            "port": 8000 + i,
            "address": f"127.0.1.{i}",
            "tags": ["blue" if i % 2 else "green"],
        }
        for i in range(1, INSTANCES + 1)
    ]
    agent = Agent(
        root / "agent",
        {
            "data_dir": str(root / "agent" / "data"),
            "bind_addr": "127.0.0.1",
            "ports": {"dns": dns_port},
            "services": services,
        },
        ports.take(),
    )
    agent.start()
    agent.wait(lambda: "agent started" in agent.log_tail(200), 30, "the agent to start")
    body = json.dumps({"Name": "web-query", "Service": {"Service": "web"}}).encode()
    template = {"Name": "", "Template": {"Type": "name_prefix_match"}, "Service": {"Service": "web"}}
    for query in (body, json.dumps(template).encode()):
        request = urllib.request.Request(f"http://127.0.0.1:{agent.port}/v1/query", data=query, method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass
    return agent, dns_port


def _dnsmasq(root: Path, ports: Ports) -> tuple[subprocess.Popen[bytes], int]:
    port = ports.take()
    records = []
    for i in range(1, INSTANCES + 1):
        records += [
            f"--host-record=web.service.consul,127.0.1.{i}",
            f"--host-record=web-query.query.consul,127.0.1.{i}",
        ]
        records.append(f"--srv-host=web.service.consul,web-{i}.node.dc1.consul,{8000 + i},1,1")
        records.append(f"--host-record=web-{i}.node.dc1.consul,127.0.1.{i}")
        if i % 2:
            records.append(f"--host-record=blue.web.service.consul,127.0.1.{i}")
    command = [
        _need("dnsmasq", "dnsmasq-base"),
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        f"--port={port}",
        "--local=/consul/",  # answered here only, never forwarded
        "--address=/unique.query.consul/127.0.1.1",  # any name below: one wildcard record
        f"--pid-file={root / 'dnsmasq.pid'}",
        *records,
    ]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.3)
    if process.poll() is not None:
        raise BenchError("dnsmasq did not start")
    return process, port


def _random_case(name: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in name)


def run(seconds: float = 10.0, rate: int = 1000) -> dict[str, Any]:
    ports = Ports()
    rng = random.Random(20)
    results: dict[str, Any] = {"seconds": seconds, "rate_for_latency": rate}
    with tempfile.TemporaryDirectory(prefix="ps-bench-dns-") as tmp:
        root = Path(tmp)
        files = {"repeated": root / "repeated.txt", "0x20": root / "mixed-case.txt"}
        files["repeated"].write_text("".join(f"{name} {kind}\n" for name, kind in QUERIES))
        mixed = [QUERIES[i % len(QUERIES)] for i in range(2000)]
        files["0x20"].write_text("".join(f"{_random_case(n, rng)} {t}\n" for n, t in mixed))
        files["unique"] = root / "unique.txt"
        files["unique"].write_text("".join(f"q{i}.unique.query.consul A\n" for i in range(50000)))
        agent, agent_port = _agent(root, ports)
        try:
            for workload, path in files.items():
                print(f"  proxy-supervisor, {workload} ...", flush=True)
                results[f"proxy-supervisor {workload}"] = measure(agent_port, path, seconds, rate)
        finally:
            agent.kill_group()
        peer, peer_port = _dnsmasq(root, ports)
        try:
            for workload, path in files.items():
                print(f"  dnsmasq, {workload} ...", flush=True)
                results[f"dnsmasq {workload}"] = measure(peer_port, path, seconds, rate)
        finally:
            peer.kill()
            peer.wait()
    results["queries"] = [f"{n} {t}" for n, t in QUERIES]
    for workload in files:
        ours, theirs = results[f"proxy-supervisor {workload}"], results[f"dnsmasq {workload}"]
        results[f"qps_ratio {workload}"] = round(ours["qps"] / theirs["qps"], 3)
    return results


def report(results: dict[str, Any]) -> str:
    rate = results["rate_for_latency"]
    rows = [
        f"| server, query names | queries/s (4 clients, 64 outstanding) | p50 at {rate}/s (ms) "
        f"| p99 at {rate}/s (ms) |",
        "|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        for name in ("proxy-supervisor", "dnsmasq"):
            r = results[f"{name} {workload}"]
            rows.append(f"| {name}, {workload} names | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} |")
    ratios = ", ".join(f"{w} {results[f'qps_ratio {w}']}" for w in WORKLOADS)
    rows.append(f"\nqueries/s ratio to dnsmasq: {ratios}")
    return "\n".join(rows)
