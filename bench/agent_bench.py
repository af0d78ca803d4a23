"""Supervision benchmarks of issue 2, each measured in one run on this machine.

* restart latency: SIGKILL of a proxy to its replacement running, for own children and
  for processes re-adopted after an agent restart (Consul polled adopted processes once
  a second: 0-1 s, 0.5 s on average);
* drop-in latency: a new config file renamed into the config dir to its proxy running;
* adoption: kill -9 of an agent with 200 running proxies, then the time until a new
  agent has adopted all of them (and restarted none);
* idle CPU of the agent with 200 proxies (there must be no polling loop).

The proxies are a shell script that appends its start time (ns) to a file and then
execs ``sleep``, so "running" is measured by the process itself, not by the agent.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import Agent, Ports

PROXY_SCRIPT = """#!/bin/sh
date +%s%N >> "$1"
exec sleep 1000000
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class BenchAgent(Agent):
    """An agent with ``count`` shell-script proxies on a temporary data_dir."""

    def __init__(self, root: Path, count: int, ports: Ports) -> None:
        low, high = ports.block(1000)
        super().__init__(
            root,
            {
                "data_dir": str(root / "data"),
                "log_level": "WARN",
                "ports": {"proxy_min_port": low, "proxy_max_port": high},
            },
            ports.take(),
        )
        self.starts = root / "starts"
        self.starts.mkdir()
        self.script = root / "proxy.sh"
        self.script.write_text(PROXY_SCRIPT)
        self.script.chmod(0o755)
        self.write_services(range(count))

    def service(self, index: int) -> dict[str, Any]:
        name = f"svc{index:03d}"
        return {
            "name": name,
            "port": 10000 + index,
            "connect": {"proxy": {"command": [str(self.script), str(self.starts / name)]}},
        }

    def write_services(self, indexes: range) -> None:
        self.write("10-services.json", {"services": [self.service(index) for index in indexes]})

    def wait_running(self, count: int, timeout: float = 60.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            data = self.proxies()
            running = [
                entry for entry in data.values() if entry["State"] in ("running", "starting") and entry["Pid"]
            ]
            return data if len(running) >= count else None

        return self.wait(ready, timeout, f"{count} running proxies")

    def start_times(self, name: str) -> list[int]:
        path = self.starts / name
        if not path.exists():
            return []
        return [int(line) for line in path.read_text().split()]

    def agent_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        subprocess.run(["pkill", "-KILL", "-f", str(self.script)], check=False)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if str(self.starts).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue


def restarted_since(agent: BenchAgent, name: str, starts: int) -> bool:
    return len(agent.start_times(name)) > starts


def restart_latencies(agent: BenchAgent, names: list[str]) -> list[float]:
    """Kill each proxy once (a first exit is restarted immediately); ms to its replacement."""
    samples = []
    for name in names:
        entry = agent.proxies()[f"{name}-proxy"]
        before = len(agent.start_times(name))
        killed_at = time.time_ns()
        os.kill(entry["Pid"], signal.SIGKILL)
        agent.wait(partial(restarted_since, agent, name, before), 10, f"{name} to restart", 0.0005)
        samples.append((agent.start_times(name)[-1] - killed_at) / 1e6)
    return samples


def bench_restart_and_adoption(root: Path, count: int, ports: Ports) -> dict[str, Any]:
    agent = BenchAgent(root, count, ports)
    try:
        agent.start()
        agent.wait_running(count)
        names = [f"svc{index:03d}" for index in range(count)]
        sample_names = names[: min(40, count)]
        own = restart_latencies(agent, sample_names)
        time.sleep(1.5)  # let the replacements settle into "running"
        before = {name: entry["Pid"] for name, entry in agent.wait_running(count).items()}
        starts_before = sum(len(agent.start_times(name)) for name in names)

        agent.kill9()
        started = agent.start()

        def all_adopted() -> dict[str, Any] | None:
            data = agent.proxies()
            adopted = [entry for entry in data.values() if entry["Adopted"] and entry["Pid"]]
            return data if len(adopted) == count else None

        data = agent.wait(all_adopted, 60, "all proxies adopted", interval=0.005)
        adoption_seconds = time.monotonic() - started
        same_pids = sum(1 for name, entry in data.items() if before.get(name) == entry["Pid"])
        restarted = sum(len(agent.start_times(name)) for name in names) - starts_before
        adopted_restart = restart_latencies(
            agent, names[len(sample_names) : len(sample_names) * 2] or sample_names
        )
        return {
            "proxies": count,
            "restart_own_child_ms": summarize(own),
            "restart_adopted_ms": summarize(adopted_restart),
            "adoption_seconds": round(adoption_seconds, 3),
            "adopted_same_pid": same_pids,
            "restarts_during_adoption": restarted,
        }
    finally:
        agent.cleanup()


def bench_drop_in(root: Path, samples: int, ports: Ports) -> dict[str, Any]:
    agent = BenchAgent(root, 1, ports)
    try:
        agent.start()
        agent.wait_running(1)
        latencies = []
        for index in range(1, samples + 1):
            name = f"svc{index:03d}"
            temp = agent.conf / f".drop-{index}.tmp"
            temp.write_text(json.dumps({"service": agent.service(index)}))
            written_at = time.time_ns()
            os.rename(temp, agent.conf / f"20-drop-{index}.json")
            agent.wait(partial(agent.start_times, name), 10, f"{name} to start", 0.0005)
            latencies.append((agent.start_times(name)[0] - written_at) / 1e6)
            time.sleep(0.3)  # separate samples so each is its own debounce window
        return {"drop_in_to_running_ms": summarize(latencies)}
    finally:
        agent.cleanup()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def bench_idle_cpu(root: Path, count: int, seconds: float, ports: Ports) -> dict[str, Any]:
    agent = BenchAgent(root, count, ports)
    try:
        agent.start()
        agent.wait_running(count)
        time.sleep(2.0)  # past every startup grace period: nothing is scheduled any more
        pid = agent.agent_pid()
        ticks_before, wall_before = cpu_ticks(pid), time.monotonic()
        time.sleep(seconds)
        agent.check()
        ticks_after, wall_after = cpu_ticks(pid), time.monotonic()
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        cpu_seconds = (ticks_after - ticks_before) / ticks_per_second
        rss_kib = int(
            next(
                line
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS")
            ).split()[1]
        )
        return {
            "idle_proxies": count,
            "idle_seconds": round(wall_after - wall_before, 1),
            "idle_cpu_percent_of_one_core": round(100 * cpu_seconds / (wall_after - wall_before), 3),
            "idle_cpu_ticks": ticks_after - ticks_before,
            # one clock tick over the window: the resolution of the figure above
            "idle_cpu_resolution_percent": round(100 / ticks_per_second / (wall_after - wall_before), 3),
            "agent_rss_mib": round(rss_kib / 1024, 1),
        }
    finally:
        agent.cleanup()


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "samples": len(values),
        "p50": round(statistics.median(values), 2),
        "p95": round(percentile(values, 0.95), 2),
        "max": round(max(values), 2),
    }


def run(count: int = 200, idle_seconds: float = 60.0, drop_in_samples: int = 20) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    ports = Ports()
    with tempfile.TemporaryDirectory(prefix="ps-bench-") as temp:
        base = Path(temp)
        print(f"restart latency and adoption with {count} proxies ...", flush=True)
        results.update(bench_restart_and_adoption(base / "restart", count, ports))
        print(f"drop-in to running ({drop_in_samples} samples) ...", flush=True)
        results.update(bench_drop_in(base / "dropin", drop_in_samples, ports))
        print(f"idle CPU with {count} proxies over {idle_seconds:.0f}s ...", flush=True)
        results.update(bench_idle_cpu(base / "idle", count, idle_seconds, ports))
    return results


def report(results: dict[str, Any]) -> str:
    own, adopted = results["restart_own_child_ms"], results["restart_adopted_ms"]
    drop = results["drop_in_to_running_ms"]
    rows = [
        ("exit to restarted, own child", f"p50 {own['p50']} ms, p95 {own['p95']} ms", "p50 <= 50 ms"),
        (
            "exit to restarted, re-adopted",
            f"p50 {adopted['p50']} ms, p95 {adopted['p95']} ms "
            f"({500 / max(adopted['p50'], 0.001):.0f}x faster than Consul's 1 s poll on average)",
            "p50 <= 50 ms",
        ),
        ("drop-in written to proxy running", f"p50 {drop['p50']} ms, p95 {drop['p95']} ms", "p95 <= 1 s"),
        (
            f"kill -9 + restart, {results['proxies']} proxies",
            f"all adopted in {results['adoption_seconds']} s; {results['adopted_same_pid']} same PIDs; "
            f"{results['restarts_during_adoption']} restarts",
            "<= 3 s, 0 restarts",
        ),
        (
            f"idle agent CPU, {results['idle_proxies']} proxies",
            f"{results['idle_cpu_percent_of_one_core']} % of one core over {results['idle_seconds']} s "
            f"({results['idle_cpu_ticks']} CPU ticks; resolution {results['idle_cpu_resolution_percent']} %; "
            f"RSS {results['agent_rss_mib']} MiB)",
            "<= 1 %",
        ),
    ]
    lines = ["| benchmark | measured | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines)
