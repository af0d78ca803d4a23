"""Soak: N built-in proxies under steady traffic while the config churns, for T minutes.

``python -m bench soak [--proxies 100] [--minutes 10]``. Services ``s000`` … share one echo
app; each has a default (built-in) managed proxy with one upstream to the next service,
so every connection crosses two proxies with mutual TLS. While traffic runs, a churn
thread keeps changing the configuration the way operators do: tags and meta (no restart
expected), extra upstreams added and removed (applied live), whole services added and
removed (proxies started and stopped), and explicit reloads.

It reports, between the end of the warm-up and the end of the run: RSS and open fds of
the agent and of the steady proxies (sum, and the worst single proxy), traffic errors,
and restarts of the steady proxies. The targets: flat memory and fds, no errors, no
restarts. It stops by itself and kills everything it started.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from bench.common import Agent, Ports
from bench.proxy_bench import echo_server, raise_fd_limit

PAYLOAD = 1024


@dataclass
class Traffic:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
            else:
                self.errors[error] += 1


class SoakAgent(Agent):
    def __init__(self, root: Path, count: int, app_port: int, ports: Ports) -> None:
        low, high = ports.block(1000)
        super().__init__(
            root,
            {
                "data_dir": str(root / "data"),
                "log_level": "WARN",
                "bind_addr": "127.0.0.1",
                "ports": {"proxy_min_port": low, "proxy_max_port": high},
            },
            ports.take(),
        )
        self.count = count
        self.app_port = app_port
        self.ports = ports
        self.upstream_ports = [ports.take() for _ in range(count)]
        self.extra_ports: dict[int, int] = {}
        for index in range(count):
            self.write_service(index)

    def name(self, index: int) -> str:
        return f"s{index:03d}"

    def write_service(self, index: int, *, tags: list[str] | None = None, extra: bool = False) -> None:
        upstreams = [
            {
                "destination_name": self.name((index + 1) % self.count),
                "local_bind_port": self.upstream_ports[index],
            }
        ]
        if extra:  # a second upstream, added and removed live (on a port of its own, kept)
            port = self.extra_ports.setdefault(index, self.ports.take())
            upstreams.append(
                {"destination_name": self.name((index + 2) % self.count), "local_bind_port": port}
            )
        service = {
            "name": self.name(index),
            "port": self.app_port,
            "tags": tags or [],
            "connect": {"proxy": {"upstreams": upstreams}},
        }
        self.write(f"{self.name(index)}.json", {"service": service})

    def write_churn_service(self, name: str) -> None:
        self.write(
            f"{name}.json", {"service": {"name": name, "port": self.app_port, "connect": {"proxy": {}}}}
        )


def exchange(port: int) -> str | None:
    """One connection through two proxies: send a KiB, expect it back. None when it worked."""
    payload = os.urandom(PAYLOAD)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
            received = b""
            while len(received) < PAYLOAD:
                chunk = sock.recv(65536)
                if not chunk:
                    return "closed early"
                received += chunk
        return None if received == payload else "wrong bytes"
    except OSError as exc:
        return type(exc).__name__


def carries(port: int) -> bool:
    return exchange(port) is None


def measure(pid: int) -> tuple[float, int]:
    """(RSS MiB, open fds) of one process."""
    process = psutil.Process(pid)
    return process.memory_info().rss / (1024 * 1024), process.num_fds()


def snapshot(agent: SoakAgent, steady: list[str]) -> dict[str, Any]:
    assert agent.process is not None
    agent_rss, agent_fds = measure(agent.process.pid)
    proxies = agent.proxies()
    per_proxy = {}
    for proxy_id in steady:
        pid = proxies[proxy_id]["Pid"]
        per_proxy[proxy_id] = measure(pid)
    return {
        "agent_rss_mib": round(agent_rss, 1),
        "agent_fds": agent_fds,
        "proxies_rss_mib_total": round(sum(rss for rss, _ in per_proxy.values()), 1),
        "proxies_fds_total": sum(fds for _, fds in per_proxy.values()),
        "per_proxy": per_proxy,
        "restarts": {proxy_id: proxies[proxy_id]["Restarts"] for proxy_id in steady},
        "pids": {proxy_id: proxies[proxy_id]["Pid"] for proxy_id in steady},
    }


def run(
    count: int = 100, minutes: float = 10.0, rate: float = 40.0, churn_every: float = 2.0
) -> dict[str, Any]:
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    ports = Ports()
    app_port = ports.take()
    app = threading.Thread(target=echo_server, args=(app_port,), daemon=True)
    app.start()
    agent = SoakAgent(root, count, app_port, ports)
    steady = [f"{agent.name(index)}-proxy" for index in range(count)]
    traffic = Traffic()
    stop = threading.Event()
    churn_log: Counter[str] = Counter()
    rng = random.Random(7)
    try:
        print(f"  starting {count} built-in proxies ...", flush=True)
        agent.start()
        agent.wait(
            lambda: sum(1 for p in agent.proxies().values() if p["State"] == "running") >= count,
            300,
            f"all {count} proxies to run",
            interval=0.5,
        )
        for port in agent.upstream_ports:  # every path carries traffic before we measure
            agent.wait(partial(carries, port), 60, f"traffic through upstream port {port}", 0.1)

        def drive() -> None:
            interval = 4 / rate  # four drivers share the rate
            while not stop.is_set():
                began = time.monotonic()
                traffic.record(exchange(rng.choice(agent.upstream_ports)))
                stop.wait(max(0.0, interval - (time.monotonic() - began)))

        extras: set[int] = set()
        churners: set[str] = set()

        def churn() -> None:
            while not stop.wait(churn_every):
                action = rng.choice(["tags", "upstream", "service", "reload"])
                index = rng.randrange(count)
                if action == "tags":
                    agent.write_service(index, tags=[f"v{rng.randrange(100)}"], extra=index in extras)
                elif action == "upstream":
                    extras.symmetric_difference_update({index})
                    agent.write_service(index, extra=index in extras)
                elif action == "service":
                    name = f"churn{rng.randrange(5)}"
                    if name in churners:
                        (agent.conf / f"{name}.json").unlink()
                        churners.discard(name)
                    else:
                        agent.write_churn_service(name)
                        churners.add(name)
                else:
                    agent.api("PUT", "/v1/agent/reload")
                churn_log[action] += 1

        drivers = [threading.Thread(target=drive, daemon=True) for _ in range(4)]
        for thread in drivers:
            thread.start()
        print("  warm-up (30 s) ...", flush=True)
        time.sleep(30)
        before = snapshot(agent, steady)
        ok_before = traffic.ok
        churner = threading.Thread(target=churn, daemon=True)
        churner.start()
        print(f"  soaking for {minutes:g} min ...", flush=True)
        end = time.monotonic() + minutes * 60
        samples = []
        while time.monotonic() < end:
            time.sleep(min(60.0, max(0.0, end - time.monotonic())))
            agent.check()
            sample = snapshot(agent, steady)
            samples.append({k: sample[k] for k in ("agent_rss_mib", "agent_fds", "proxies_rss_mib_total")})
            print(f"    {samples[-1]}  ok={traffic.ok} errors={sum(traffic.errors.values())}", flush=True)
        stop.set()
        for thread in [*drivers, churner]:
            thread.join(30)
        # Back to the starting configuration, so that "after" compares like with like: the
        # churned services' proxies and extra upstreams hold fds and memory of their own.
        for index in sorted(extras):
            agent.write_service(index)
        for name in churners:
            (agent.conf / f"{name}.json").unlink()
        time.sleep(15)
        after = snapshot(agent, steady)
        growth = [
            after["per_proxy"][p][0] - before["per_proxy"][p][0] for p in steady if p in after["per_proxy"]
        ]
        fd_growth = [after["per_proxy"][p][1] - before["per_proxy"][p][1] for p in steady]
        return {
            "proxies": count,
            "minutes": minutes,
            "connections_ok": traffic.ok - ok_before,
            "errors": dict(traffic.errors),
            "config_changes": dict(churn_log),
            "agent": {
                "rss_mib": [before["agent_rss_mib"], after["agent_rss_mib"]],
                "fds": [before["agent_fds"], after["agent_fds"]],
            },
            "proxies_total": {
                "rss_mib": [before["proxies_rss_mib_total"], after["proxies_rss_mib_total"]],
                "fds": [before["proxies_fds_total"], after["proxies_fds_total"]],
            },
            "worst_proxy_rss_growth_mib": round(max(growth), 2),
            "worst_proxy_fd_growth": max(fd_growth),
            "steady_proxy_restarts": sum(after["restarts"].values()) - sum(before["restarts"].values()),
            "steady_proxies_same_pid": sum(1 for p in steady if after["pids"][p] == before["pids"][p]),
            "samples": samples,
        }
    finally:
        stop.set()
        agent.leave()
        shutil.rmtree(root, ignore_errors=True)


def report(results: dict[str, Any]) -> str:
    agent, total = results["agent"], results["proxies_total"]
    lines = [
        f"soak: {results['proxies']} built-in proxies, {results['minutes']:g} min of traffic and churn",
        f"  connections through two proxies: {results['connections_ok']} ok, "
        f"errors: {results['errors'] or 'none'}",
        f"  config changes: {results['config_changes']}",
        f"  agent RSS {agent['rss_mib'][0]} -> {agent['rss_mib'][1]} MiB, "
        f"fds {agent['fds'][0]} -> {agent['fds'][1]}",
        f"  proxies RSS total {total['rss_mib'][0]} -> {total['rss_mib'][1]} MiB, fds {total['fds'][0]} -> "
        f"{total['fds'][1]}; worst single proxy +{results['worst_proxy_rss_growth_mib']} MiB, "
        f"+{results['worst_proxy_fd_growth']} fds",
        f"  steady proxies: {results['steady_proxies_same_pid']}/{results['proxies']} kept their PID, "
        f"{results['steady_proxy_restarts']} restarts",
    ]
    return "\n".join(lines)
