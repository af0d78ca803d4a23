"""Control-plane benchmarks of issue 3, measured in one run against a real agent.

* authorize: ``POST /v1/agent/connect/authorize`` over keep-alive connections on loopback,
  one client for the latency distribution, several in parallel for throughput;
* leaf issuance: time to sign a fresh leaf, in-process and through the API;
* blocking queries: 1,000 clients hold ``/v1/health/service/web?index=N`` on one agent;
  the agent's RSS while they wait, and the time from a change until all have answered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.agent_bench import percentile
from bench.common import (
    REPO,
    Agent,
    BenchError,
    Ports,
)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client (one socket), so the agent is what is measured."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        status, _, answer = self.exchange(method, path, body)
        return status, answer

    def exchange(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        header, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buffer = rest[length:]
        return int(lines[0].split(" ")[1]), headers, rest[:length]

    def close(self) -> None:
        self.sock.close()


def start_agent(root: Path) -> Agent:
    agent = Agent(
        root,
        {
            "data_dir": str(root / "data"),
            "log_level": "WARN",
            # 1,000 watchers from one address, where a real host has them spread over its
            # proxies' tokens: lift the per-client limit (200) for this measurement.
            "limits": {"http_max_conns_per_client": 2000},
            "services": [
                {"name": "web", "port": 8080, "check": {"id": "web-ttl", "ttl": "1h"}},
                {"name": "db", "port": 5432},
            ],
        },
        Ports().take(),
    )
    agent.start()

    def answers() -> bool:
        try:
            client = KeepAliveClient(agent.port)
            status, _ = client.request("GET", "/v1/agent/connect/ca/roots")
            client.close()
        except OSError:
            return False
        return status == 200

    agent.wait(answers, 30, "the agent to answer", interval=0.05)
    return agent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_authorize(port: int, calls: int, parallel: int) -> dict[str, Any]:
    client = KeepAliveClient(port)
    _, roots = client.request("GET", "/v1/agent/connect/ca/roots")
    domain = json.loads(roots)["TrustDomain"]
    client.request(
        "POST",
        "/v1/connect/intentions",
        json.dumps({"SourceName": "web", "DestinationName": "db", "Action": "allow"}).encode(),
    )
    body = json.dumps(
        {"Target": "db", "ClientCertURI": f"spiffe://{domain}/ns/default/dc/dc1/svc/web"}
    ).encode()
    for _ in range(200):  # warm up
        client.request("POST", "/v1/agent/connect/authorize", body)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        status, answer = client.request("POST", "/v1/agent/connect/authorize", body)
        latencies.append((time.perf_counter() - started) * 1000)
        assert status == 200 and b'"Authorized":true' in answer
    client.close()

    # throughput with several clients in parallel processes (the agent is the bottleneck)
    per_client = calls // parallel
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from bench.control_bench import KeepAliveClient\n"
        f"c = KeepAliveClient({port}); body = {body!r}\n"
        f"for _ in range({per_client}): c.request('POST', '/v1/agent/connect/authorize', body)\n"
    )
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(parallel)]
    for worker in workers:
        worker.wait()
    elapsed = time.perf_counter() - started
    return {
        "authorize_latency_ms": {
            "calls": calls,
            "p50": round(statistics.median(latencies), 3),
            "p99": round(percentile(latencies, 0.99), 3),
            "max": round(max(latencies), 3),
        },
        "authorize_per_second_single_client": round(calls / (sum(latencies) / 1000)),
        "authorize_per_second_parallel": round(per_client * parallel / elapsed),
        "authorize_parallel_clients": parallel,
    }


def bench_leaf(port: int, count: int) -> dict[str, Any]:
    from supervisor.config.model import CAConfig
    from supervisor.connect.ca import CertificateAuthority

    counter = itertools.count(1)
    ca = CertificateAuthority(None, "dc1", lambda: next(counter))
    ca.start(CAConfig())
    started = time.perf_counter()
    for index in range(count):
        ca.sign_leaf(f"svc{index}")
    in_process = (time.perf_counter() - started) / count * 1000
    client = KeepAliveClient(port)
    api = []
    for index in range(count):
        started = time.perf_counter()
        status, _ = client.request("GET", f"/v1/agent/connect/ca/leaf/new{index}")
        api.append((time.perf_counter() - started) * 1000)
        assert status == 200
    client.close()
    return {
        "leaf_issue_in_process_ms": round(in_process, 3),
        "leaf_issue_via_api_ms": {
            "p50": round(statistics.median(api), 3),
            "p99": round(percentile(api, 0.99), 3),
        },
    }


async def _hold(
    port: int, index: str, ready: asyncio.Event, counter: list[int], done: dict[int, float]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = f"/v1/health/service/web?index={index}&wait=5m"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    counter[0] += 1
    if counter[0] >= counter[1]:  # every request is sent
        ready.set()
    await reader.read()  # the whole answer; the agent closes the connection after it
    done[id(writer)] = time.perf_counter()
    writer.close()


async def _blocking(port: int, waiters: int, agent_pid: int) -> dict[str, Any]:
    client = KeepAliveClient(port)
    _, headers, _ = client.exchange("GET", "/v1/health/service/web")
    index = headers["x-consul-index"]
    client.close()
    ready = asyncio.Event()
    counter = [0, waiters]
    done: dict[int, float] = {}
    tasks = [asyncio.ensure_future(_hold(port, index, ready, counter, done)) for _ in range(waiters)]
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(2.0)  # every request parsed and parked in the agent
    held_rss = rss_mib(agent_pid)
    answered_early = len(done)
    if answered_early:
        raise BenchError(f"{answered_early} of {waiters} blocking queries were answered before the change")
    changer = KeepAliveClient(port)
    changed_at = time.perf_counter()
    changer.request("PUT", "/v1/agent/check/pass/web-ttl")
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    changer.close()
    latencies = sorted((at - changed_at) * 1000 for at in done.values())
    return {
        "blocking_waiters": waiters,
        "blocking_answered_before_change": answered_early,
        "blocking_agent_rss_mib": round(held_rss, 1),
        "blocking_all_answered_ms": round(latencies[-1], 1),
        "blocking_median_answered_ms": round(statistics.median(latencies), 1),
    }


def run(authorize_calls: int = 5000, leaf_count: int = 100, waiters: int = 1000) -> dict[str, Any]:
    raise_fd_limit()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ps-bench-cp-") as temp:
        agent = start_agent(Path(temp))
        assert agent.process is not None
        process, port = agent.process, agent.port
        try:
            results["agent_idle_rss_mib"] = round(rss_mib(process.pid), 1)
            print(f"authorize ({authorize_calls} calls) ...", flush=True)
            results.update(bench_authorize(port, authorize_calls, parallel=4))
            print(f"leaf issuance ({leaf_count}) ...", flush=True)
            results.update(bench_leaf(port, leaf_count))
            print(f"{waiters} blocking queries ...", flush=True)
            results.update(asyncio.run(_blocking(port, waiters, process.pid)))
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return results


def report(results: dict[str, Any]) -> str:
    latency = results["authorize_latency_ms"]
    leaf = results["leaf_issue_via_api_ms"]
    per_second = results["authorize_per_second_single_client"]
    rss, idle = results["blocking_agent_rss_mib"], results["agent_idle_rss_mib"]
    rows = [
        (
            "authorize, one keep-alive client",
            f"p50 {latency['p50']} ms, p99 {latency['p99']} ms; {per_second}/s",
            "p99 <= 2 ms",
        ),
        (
            f"authorize, {results['authorize_parallel_clients']} clients in parallel",
            f"{results['authorize_per_second_parallel']} calls/s",
            "(figure)",
        ),
        (
            "leaf issuance",
            f"{results['leaf_issue_in_process_ms']} ms to sign; "
            f"via the API p50 {leaf['p50']} ms, p99 {leaf['p99']} ms",
            "(figure)",
        ),
        (
            f"{results['blocking_waiters']} blocking queries held",
            f"agent RSS {rss} MiB (idle {idle} MiB); all "
            f"answered {results['blocking_all_answered_ms']} ms after the change (median "
            f"{results['blocking_median_answered_ms']} ms)",
            "< 150 MB; <= 200 ms",
        ),
    ]
    lines = ["| benchmark | measured | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines)
