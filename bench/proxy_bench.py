"""The built-in proxy against a stunnel pair, an HAProxy pair and a direct connection.

Every candidate carries the same path: client -> upstream listener -> mutual TLS ->
public listener -> app, with the same certificates (issued by the agent's CA), one
process per side, on loopback, measured in one run with the same tools:

* throughput: ``iperf3`` through the path (Gbit/s, receiver side);
* added latency: 64-byte ping-pong round trips on one connection, minus the direct RTT;
* new connections per second: parallel clients each connect, send a byte, read it back
  and close (a full handshake per connection, except where a pair resumes TLS sessions);
* memory: our proxies' RSS when idle and with 1,000 open connections.

Peers come from Debian packages: ``apt-get install stunnel4 haproxy iperf3``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Agent, Ports

PORTS = Ports()  # one allocator for the run: no port is handed out twice


def free_port() -> int:
    return PORTS.take()


PEERS = ("stunnel4", "haproxy", "iperf3")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the app and the measuring clients -----------------------------------------------------------


def echo_server(port: int) -> None:
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    raise_fd_limit()
    asyncio.run(main())


def round_trips(port: int, count: int) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * 64
    for _ in range(300):  # warm up
        sock.sendall(payload)
        received = 0
        while received < 64:
            received += len(sock.recv(64))
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(payload)
        received = 0
        while received < 64:
            received += len(sock.recv(64))
        samples.append((time.perf_counter() - started) * 1e6)
    sock.close()
    return samples


def _connect_worker(port: int, seconds: float, results: Any) -> None:
    done = failed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"x")
            if sock.recv(1) == b"x":
                done += 1
            else:
                failed += 1
            sock.close()
        except OSError:
            failed += 1
    results.put((done, failed))


def connections_per_second(port: int, seconds: float, workers: int) -> tuple[float, int]:
    results: Any = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=_connect_worker, args=(port, seconds, results)) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    counts = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return sum(c[0] for c in counts) / seconds, sum(c[1] for c in counts)


def _iperf_once(port: int, seconds: int) -> float:
    result = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    data = json.loads(result.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 through port {port}: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def iperf(port: int, seconds: int) -> float:
    """Throughput after a one-second warm-up run through the same path.

    Every pair's readiness probe reaches the iperf3 server as an empty test; iperf3 then
    closes and re-opens its listening socket, and a connection that arrives in between
    is reset. The warm-up (failure tolerated, result discarded) absorbs that moment for
    every candidate alike.
    """
    try:
        _iperf_once(port, 1)
    except RuntimeError:
        pass
    return _iperf_once(port, seconds)


def hold_connections(port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"h")
        held.append(sock)
    for sock in held:
        sock.recv(1)
    return held


# -- the candidates --------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    entry_port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxy_pids: list[int] = field(default_factory=list)
    agent_url: str = ""

    def stop(self) -> None:
        if self.agent_url:  # our proxies outlive a killed agent by design: ask it to leave
            try:
                request = urllib.request.Request(f"{self.agent_url}/v1/agent/leave", method="PUT")
                urllib.request.urlopen(request, timeout=10).close()
            except OSError:
                pass
            for pid in self.proxy_pids:
                try:
                    os.killpg(pid, signal.SIGKILL)  # the proxies run in their own sessions
                except (ProcessLookupError, PermissionError):
                    pass
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()


def start(
    argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd, env=env
        )


def _wait_for_proxies(agent: Agent) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        try:
            proxies = agent.proxies()
            health = agent.api("GET", "/v1/health/connect/db?passing", timeout=2)
        except OSError:
            return None
        return proxies if len(proxies) == 2 and all(p["Pid"] for p in proxies.values()) and health else None

    return agent.wait(ready, 30, "both proxies to serve", interval=0.1)


def ours(work: Path, app_port: int, *, tunnels: bool = True) -> tuple[Candidate, dict[str, str]]:
    """Two built-in proxies behind a real agent (which also issues every pair's certificates);
    ``tunnels``: whether web's proxy offers reusable tunnels (else one TLS per connection)."""
    entry = free_port()
    web_proxy: dict[str, Any] = {"upstreams": [{"destination_name": "db", "local_bind_port": entry}]}
    if not tunnels:
        web_proxy["config"] = {"tunnels": False}
    low, high = PORTS.block(100)
    config: dict[str, Any] = {
        "data_dir": str(work / "data"),
        "log_level": "WARN",
        "bind_addr": "127.0.0.1",
        "ports": {"proxy_min_port": low, "proxy_max_port": high},
        "services": [
            {
                "name": "web",
                "port": 8080,
                "connect": {"proxy": web_proxy},
            },
            {"name": "db", "port": app_port, "connect": {"proxy": {}}},
        ],
    }
    agent = Agent(work, config, free_port())
    agent.start()
    assert agent.process is not None
    base = f"http://127.0.0.1:{agent.port}"
    name = "proxy-supervisor" if tunnels else "proxy-supervisor, no tunnels"
    candidate = Candidate(name, entry, [agent.process], agent_url=base)
    try:
        proxies = _wait_for_proxies(agent)
    except BaseException:
        candidate.stop()
        raise
    candidate.proxy_pids = [int(p["Pid"]) for p in proxies.values()]
    files = {}
    roots = json.load(urllib.request.urlopen(f"{base}/v1/agent/connect/ca/roots"))
    files["root"] = str(work / "root.pem")
    Path(files["root"]).write_text("".join(r["RootCert"] for r in roots["Roots"]))
    for service in ("web", "db"):
        leaf = json.load(urllib.request.urlopen(f"{base}/v1/agent/connect/ca/leaf/{service}"))
        for suffix, content in (("crt", leaf["CertPEM"]), ("key", leaf["PrivateKeyPEM"])):
            files[f"{service}.{suffix}"] = str(work / f"{service}.{suffix}")
            Path(files[f"{service}.{suffix}"]).write_text(content)
        files[f"{service}.pem"] = str(work / f"{service}.pem")
        Path(files[f"{service}.pem"]).write_text(leaf["CertPEM"] + leaf["PrivateKeyPEM"])
    wait_port(entry)
    return candidate, files


def stunnel_pair(work: Path, app_port: int, files: dict[str, str]) -> Candidate:
    entry, public = free_port(), free_port()
    client = f"""foreground = yes
pid =
[up]
client = yes
accept = 127.0.0.1:{entry}
connect = 127.0.0.1:{public}
cert = {files["web.crt"]}
key = {files["web.key"]}
CAfile = {files["root"]}
verifyChain = yes
"""
    server = f"""foreground = yes
pid =
[pub]
accept = 127.0.0.1:{public}
connect = 127.0.0.1:{app_port}
cert = {files["db.crt"]}
key = {files["db.key"]}
CAfile = {files["root"]}
verifyChain = yes
requireCert = yes
"""
    (work / "stunnel-client.conf").write_text(client)
    (work / "stunnel-server.conf").write_text(server)
    processes = [
        start(["stunnel4", str(work / "stunnel-server.conf")], work / "stunnel.log"),
        start(["stunnel4", str(work / "stunnel-client.conf")], work / "stunnel.log"),
    ]
    wait_port(entry)
    wait_port(public)
    return Candidate("stunnel pair", entry, processes)


def haproxy_pair(work: Path, app_port: int, files: dict[str, str]) -> Candidate:
    entry, public = free_port(), free_port()
    common = (
        "global\n  maxconn 4000\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
    )
    tls = f"ca-file {files['root']} verify required"
    client = common + (
        f"frontend up\n  bind 127.0.0.1:{entry}\n  default_backend pub\n"
        f"backend pub\n  server s1 127.0.0.1:{public} ssl crt {files['web.pem']} {tls}\n"
    )
    server = common + (
        f"frontend pub\n  bind 127.0.0.1:{public} ssl crt {files['db.pem']} {tls}\n"
        f"  default_backend app\nbackend app\n  server a1 127.0.0.1:{app_port}\n"
    )
    (work / "haproxy-client.cfg").write_text(client)
    (work / "haproxy-server.cfg").write_text(server)
    processes = [
        start(["haproxy", "-f", str(work / "haproxy-server.cfg")], work / "haproxy.log"),
        start(["haproxy", "-f", str(work / "haproxy-client.cfg")], work / "haproxy.log"),
    ]
    wait_port(entry)
    wait_port(public)
    return Candidate("HAProxy pair", entry, processes)


# -- the run ---------------------------------------------------------------------------------------


def measure(candidate: Candidate, *, seconds: int, samples: int, workers: int) -> dict[str, Any]:
    print(f"  {candidate.name}: latency ...", flush=True)
    rtt = round_trips(candidate.entry_port, samples)
    print(f"  {candidate.name}: connections ...", flush=True)
    rate, failures = connections_per_second(candidate.entry_port, seconds, workers)
    return {"rtt": rtt, "connections_per_second": rate, "connection_failures": failures}


def run(seconds: int = 5, samples: int = 5000, workers: int = 4, hold: int = 1000) -> dict[str, Any]:
    missing = [tool for tool in PEERS if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"missing peers: {', '.join(missing)}; install them with: apt-get install stunnel4 haproxy iperf3"
        )
    raise_fd_limit()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="ps-bench-proxy-") as temp:
        work = Path(temp)
        echo_port, iperf_port = free_port(), free_port()
        echo = multiprocessing.Process(target=echo_server, args=(echo_port,), daemon=True)
        echo.start()
        iperf_server = start(["iperf3", "-s", "-p", str(iperf_port)], work / "iperf.log")
        wait_port(echo_port)
        wait_port(iperf_port)
        candidates: list[Candidate] = []
        try:
            # Two paths per candidate: the echo app (latency, connections, memory) and the
            # iperf3 server (throughput); each candidate is built twice, once per app.
            for name in ("ours-echo", "ours-iperf", "plain-echo", "plain-iperf"):
                (work / name).mkdir()
            ours_echo, files = ours(work / "ours-echo", echo_port)
            candidates.append(ours_echo)
            plain_echo, _ = ours(work / "plain-echo", echo_port, tunnels=False)
            candidates.append(plain_echo)
            direct = Candidate("direct", echo_port)
            stunnel = stunnel_pair(work, echo_port, files)
            haproxy = haproxy_pair(work, echo_port, files)
            candidates += [stunnel, haproxy]
            idle = [rss_mib(pid) for pid in ours_echo.proxy_pids]
            measured: dict[str, Any] = {}
            for candidate in (direct, stunnel, haproxy, plain_echo, ours_echo):
                measured[candidate.name] = measure(
                    candidate, seconds=seconds, samples=samples, workers=workers
                )
            print(f"  holding {hold} connections through our pair ...", flush=True)
            held = hold_connections(ours_echo.entry_port, hold)
            busy = [rss_mib(pid) for pid in ours_echo.proxy_pids]
            for sock in held:
                sock.close()
            print("  throughput ...", flush=True)
            ours_iperf, _ = ours(work / "ours-iperf", iperf_port)
            plain_iperf, _ = ours(work / "plain-iperf", iperf_port, tunnels=False)
            candidates += [ours_iperf, plain_iperf]
            stunnel_iperf = stunnel_pair(work, iperf_port, files)
            haproxy_iperf = haproxy_pair(work, iperf_port, files)
            candidates += [stunnel_iperf, haproxy_iperf]
            for name, port in (
                ("direct", iperf_port),
                ("stunnel pair", stunnel_iperf.entry_port),
                ("HAProxy pair", haproxy_iperf.entry_port),
                ("proxy-supervisor, no tunnels", plain_iperf.entry_port),
                ("proxy-supervisor", ours_iperf.entry_port),
            ):
                measured[name]["throughput_gbit"] = iperf(port, seconds)
        finally:
            for candidate in candidates:
                candidate.stop()
            iperf_server.kill()
            iperf_server.wait()
            echo.kill()
    direct_p50 = statistics.median(measured["direct"]["rtt"])
    direct_p99 = percentile(measured["direct"]["rtt"], 0.99)
    table = {}
    for name, data in measured.items():
        p50, p99 = statistics.median(data["rtt"]), percentile(data["rtt"], 0.99)
        table[name] = {
            "throughput_gbit": round(data["throughput_gbit"], 2),
            "rtt_p50_us": round(p50, 1),
            "rtt_p99_us": round(p99, 1),
            "added_p50_us": round(p50 - direct_p50, 1),
            "added_p99_us": round(p99 - direct_p99, 1),
            "connections_per_second": round(data["connections_per_second"]),
            "connection_failures": data["connection_failures"],
        }
    results["candidates"] = table
    results["our_rss_mib"] = {
        "idle": [round(v, 1) for v in idle],
        f"with_{hold}_connections": [round(v, 1) for v in busy],
    }
    return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(results: dict[str, Any]) -> str:
    rows = [
        "| path | throughput (Gbit/s) | added RTT p50 (µs) | added RTT p99 (µs) | new connections/s |",
        "|---|---|---|---|---|",
    ]
    for name, data in results["candidates"].items():
        rows.append(
            f"| {name} | {data['throughput_gbit']} | {data['added_p50_us']} | {data['added_p99_us']} | "
            f"{data['connections_per_second']} |"
        )
    rss = results["our_rss_mib"]
    rows.append("")
    rows.append(
        f"proxy-supervisor RSS per proxy: idle {' / '.join(map(str, rss['idle']))} MiB; with 1,000 open "
        f"connections {' / '.join(map(str, rss['with_1000_connections']))} MiB"
    )
    return "\n".join(rows)


def plot(results: dict[str, Any], path: Path) -> None:
    """A PNG with one bar chart per figure (needs matplotlib: pip install -e '.[bench]')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["candidates"])
    figures = [
        ("throughput_gbit", "bulk throughput (Gbit/s, higher is better)"),
        ("added_p50_us", "added round trip p50 (µs, lower is better)"),
        ("added_p99_us", "added round trip p99 (µs, lower is better)"),
        ("connections_per_second", "new connections per second (higher is better)"),
    ]
    fig, axes = plt.subplots(1, len(figures), figsize=(18, 4.2))
    colours = ["#8c8c8c", "#4878a8", "#d08a38", "#9ac79f", "#3a9a5b"]
    for axis, (key, title) in zip(axes, figures, strict=True):
        values = [results["candidates"][name][key] for name in names]
        bars = axis.bar(range(len(names)), values, color=colours[: len(names)])
        axis.set_title(title, fontsize=10)
        axis.set_xticks(
            range(len(names)),
            [
                n.replace(" pair", "\npair").replace("proxy-supervisor", "ours").replace(", ", ",\n")
                for n in names
            ],
            fontsize=8,
        )
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(
                f"{value:g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    fig.suptitle(
        "client -> upstream listener -> mTLS -> public listener -> app, loopback, one run", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
