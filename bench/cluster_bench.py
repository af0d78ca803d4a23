"""Cluster mode on a real 3-member etcd (Debian's etcd-server, data on tmpfs):

* change-to-visible: a service registered (or deregistered) on agent A, and the time until
  a blocking query held on agent B returns with it (p50/p99);
* etcd traffic per agent: writes (etcd revisions) and bytes etcd sends, idle and while A
  changes a service 10 times a second;
* scale by simulation: N simulated agents (N = 10, 50, 200; each the real cluster member
  code -- lease, anti-entropy, watch -- with 10 services and a proxy) against the same etcd,
  and one real agent among them: propagation latency to it, etcd load, and its memory.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import Agent, BenchError, Ports
from supervisor.catalog.index import Index
from supervisor.cluster.etcd import EtcdClient
from supervisor.cluster.layout import Layout
from supervisor.cluster.member import ClusterMember, Identity
from supervisor.cluster.records import encode
from supervisor.cluster.storage import ClusterStorage
from supervisor.config.model import ClusterConfig
from tests.helpers.etcd import EtcdCluster, etcd_binary

PORTS = Ports()
LEASE_TTL = 10
CHURN_PERIOD = 30.0  # seconds between two check changes of one simulated host, on average


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


class Api:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 30
    ) -> tuple[dict[str, str], Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.agent.port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return dict(response.headers), json.loads(raw) if raw else None


def etcd_sent_bytes(etcd: EtcdCluster) -> float:
    total = 0.0
    for member in etcd.members:
        with urllib.request.urlopen(f"{member.client_url}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("etcd_network_client_grpc_sent_bytes_total"):
                    total += float(line.split()[-1])
    return total


def revision(client: EtcdClient) -> int:
    return int(client.status()["header"]["revision"])


def start_agent(
    work: Path, name: str, endpoints: list[str], prefix: str, services: list[dict[str, Any]]
) -> Agent:
    low, high = PORTS.block(20)
    config = {
        "data_dir": str(work / name / "data"),
        "node_name": name,
        "log_level": "WARN",
        "bind_addr": "127.0.0.1",
        "ports": {"proxy_min_port": low, "proxy_max_port": high},
        "cluster": {"etcd_endpoints": endpoints, "key_prefix": prefix, "lease_ttl": f"{LEASE_TTL}s"},
        "services": services,
    }
    agent = Agent(work / name, config, PORTS.take())
    agent.start()
    api = Api(agent)
    agent.wait(lambda: _state(api) == "connected", 30, f"{name} to join")
    return agent


def _state(api: Api) -> str | None:
    try:
        return str(api.call("GET", "/v1/agent/self", timeout=2)[1]["Cluster"]["State"])
    except (OSError, KeyError, TypeError):
        api.agent.check()
        return None


def blocking_wake(waiter: Api, path: str, change: Any, timeout: float = 10.0) -> float:
    """Seconds from ``change()`` to the return of a blocking query on ``path`` held on ``waiter``."""
    headers, _ = waiter.call("GET", path)
    index = headers["X-Consul-Index"]
    woke: dict[str, float] = {}

    def hold() -> None:
        waiter.call("GET", f"{path}{'&' if '?' in path else '?'}index={index}&wait=30s", timeout=40)
        woke["at"] = time.perf_counter()

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.02)  # (the query is held on the agent by now)
    started = time.perf_counter()
    change()
    thread.join(timeout)
    if "at" not in woke:
        raise BenchError(f"a blocking query on {path} did not wake within {timeout}s")
    return woke["at"] - started


# -- part 1 and 2: two real agents --------------------------------------------------------------


def two_agents(etcd: EtcdCluster, work: Path, changes: int, window: float) -> dict[str, Any]:
    prefix = "/bench/pair/"
    a = start_agent(work, "host-a", etcd.endpoints, prefix, [{"name": "web", "port": 80}])
    b = start_agent(work, "host-b", etcd.endpoints, prefix, [{"name": "db", "port": 5432}])
    api_a, api_b = Api(a), Api(b)
    client = EtcdClient(etcd.endpoints)
    try:
        a.wait(lambda: api_b.call("GET", "/v1/health/service/web")[1], 20, "web on host-b")
        latencies = []
        for number in range(changes):
            if number % 2 == 0:
                change = lambda: api_a.call("PUT", "/v1/agent/service/register", {"Name": "flip", "Port": 1})  # noqa: E731
            else:
                change = lambda: api_a.call("PUT", "/v1/agent/service/deregister/flip")  # noqa: E731
            latencies.append(blocking_wake(api_b, "/v1/health/service/flip", change) * 1000)
        traffic: dict[str, Any] = {}
        for phase in ("idle", "churn"):
            stop = threading.Event()

            def churn(stop: threading.Event = stop) -> None:
                number = 0
                while not stop.wait(0.1):
                    name = f"churn-{number // 2 % 5}"
                    if number % 2 == 0:
                        api_a.call("PUT", "/v1/agent/service/register", {"Name": name, "Port": 2})
                    else:
                        api_a.call("PUT", f"/v1/agent/service/deregister/{name}")
                    number += 1

            worker = threading.Thread(target=churn) if phase == "churn" else None
            first_rev, first_bytes = revision(client), etcd_sent_bytes(etcd)
            if worker is not None:
                worker.start()
            time.sleep(window)
            stop.set()
            if worker is not None:
                worker.join()
            writes = revision(client) - first_rev
            sent = etcd_sent_bytes(etcd) - first_bytes
            traffic[phase] = {
                "etcd_writes_per_second_per_agent": round(writes / window / 2, 2),
                "etcd_sent_kib_per_second_per_agent": round(sent / window / 2 / 1024, 2),
            }
        return {
            "change_to_visible_ms": {
                "samples": len(latencies),
                "p50": round(statistics.median(latencies), 2),
                "p99": round(percentile(latencies, 0.99), 2),
                "max": round(max(latencies), 2),
            },
            "traffic": traffic,
            "agent_rss_mib": [round(rss_mib(agent.process.pid), 1) for agent in (a, b) if agent.process],
        }
    finally:
        client.close()
        for agent in (a, b):
            agent.leave()


# -- part 3: simulated agents -----------------------------------------------------------------


class SimulatedAgent:
    """The real cluster member code for a host with ``services`` services and a proxy each
    (records as an agent writes them), without the agent around it."""

    def __init__(self, endpoints: list[str], prefix: str, name: str, services: int) -> None:
        self.layout = Layout(prefix, "dc1")
        self.name = name
        config = ClusterConfig(endpoints=tuple(endpoints), key_prefix=prefix, lease_ttl=LEASE_TTL)
        self.storage = ClusterStorage(self.layout, name, Index(), lambda _i: {}, lambda _r: None)
        self.member = ClusterMember(
            config, self.layout, Identity(name, f"sim-{name}"), self.storage, lambda f: f(), lambda: None
        )
        self.services = services
        self.records = self._records(services)

    def _records(self, count: int, extra: int = 0) -> dict[str, bytes]:
        layout, name = self.layout, self.name
        records = {
            layout.node(name): encode(
                {"ID": f"sim-{name}", "Node": name, "Address": "127.0.0.1", "Datacenter": "dc1", "Meta": {}}
            )
        }
        for number in range(count + extra):
            for kind, service_id, port in (
                ("", f"svc-{number}", 8000 + number),
                ("connect-proxy", f"svc-{number}-proxy", 21000 + number),
            ):
                document = {
                    "Kind": kind,
                    "ID": service_id,
                    "Service": service_id,
                    "Tags": [],
                    "Meta": {},
                    "Port": port,
                    "Address": "",
                    "Weights": {"Passing": 1, "Warning": 1},
                    "EnableTagOverride": False,
                }
                records[layout.service(name, service_id)] = encode(
                    {"Service": document, "ConnectTarget": f"svc-{number}", "ConnectTags": []}
                )
                check = {
                    "CheckID": f"service:{service_id}",
                    "Name": "check",
                    "Status": "passing",
                    "Notes": "",
                    "Output": "ok",
                    "ServiceID": service_id,
                    "ServiceName": service_id,
                    "ServiceTags": [],
                }
                records[layout.check(name, f"service:{service_id}")] = encode(check)
        return records

    def start(self) -> None:
        self.member.want(self.records)
        self.member.start()

    def add_service(self, number: int) -> None:
        self.member.want(self._records(self.services, extra=number))

    def flip_check(self, number: int) -> None:
        """A check flaps: its status changes (written at once; a change of output alone
        would wait for check_update_interval and cost etcd nothing here)."""
        records = dict(self.member._desired)  # (a bench pokes the member directly)
        key = self.layout.check(self.name, "service:svc-0")
        check = json.loads(records[key])
        status = "warning" if check["Status"] == "passing" else "passing"
        check = {**check, "Status": status, "Output": f"output {number}"}
        records[key] = encode(check)
        self.member.want(records)

    def stop(self) -> None:
        self.member.stop()


def simulate(etcd: EtcdCluster, work: Path, count: int, samples: int, window: float) -> dict[str, Any]:
    prefix = f"/bench/sim{count}/"
    sims = [SimulatedAgent(etcd.endpoints, prefix, f"sim-{n:04d}", 10) for n in range(count)]
    client = EtcdClient(etcd.endpoints)
    real = None
    try:
        for sim in sims:
            sim.start()
        real = start_agent(work, f"real-{count}", etcd.endpoints, prefix, [{"name": "web", "port": 80}])
        api = Api(real)
        real.wait(
            lambda: len(api.call("GET", "/v1/catalog/nodes")[1]) == count + 1, 120, f"{count} simulated hosts"
        )
        latencies = []
        for number in range(samples):
            sim = sims[number % count]
            # The record a simulated host writes for a new instance, put straight into etcd: the
            # figure is etcd's commit, its fan-out to every watching agent, and the real agent's
            # mirror -- not the simulated hosts' own threads, which share this process's GIL.
            name = f"probe-{number}"
            record = {"Service": {"Kind": "", "ID": name, "Service": name, "Port": 1}, "ConnectTarget": None}
            key = sim.layout.service(sim.name, name)
            latencies.append(
                blocking_wake(
                    api,
                    f"/v1/health/service/{name}",
                    lambda key=key, record=record: client.put(key, encode(record)),
                )
                * 1000
            )
        first_rev, first_bytes = revision(client), etcd_sent_bytes(etcd)
        time.sleep(window)
        idle_writes = (revision(client) - first_rev) / window
        idle_sent = (etcd_sent_bytes(etcd) - first_bytes) / window
        # Churn: every simulated host changes one check every CHURN_PERIOD seconds on average.
        first_rev, first_bytes = revision(client), etcd_sent_bytes(etcd)
        started, changes = time.monotonic(), 0
        while time.monotonic() - started < window:
            sims[changes % count].flip_check(changes)
            changes += 1
            time.sleep(max(0.0, started + changes * CHURN_PERIOD / count - time.monotonic()))
        elapsed = time.monotonic() - started
        churn_writes = (revision(client) - first_rev) / elapsed
        churn_sent = (etcd_sent_bytes(etcd) - first_bytes) / elapsed
        assert real.process is not None
        return {
            "agents": count,
            "propagation_ms": {
                "p50": round(statistics.median(latencies), 2),
                "p99": round(percentile(latencies, 0.99), 2),
            },
            "etcd_idle_writes_per_second": round(idle_writes, 2),
            "etcd_idle_sent_kib_per_second": round(idle_sent / 1024, 2),
            "etcd_churn_writes_per_second": round(churn_writes, 2),
            "etcd_churn_sent_kib_per_second": round(churn_sent / 1024, 2),
            "real_agent_rss_mib": round(rss_mib(real.process.pid), 1),
            "keys": len(client.range_all(prefix)[0]),
        }
    finally:
        if real is not None:
            real.leave()
        for sim in sims:
            sim.stop()
        client.close()


def liveness(etcd: EtcdCluster, work: Path, ttl: int = 2, samples: int = 3) -> dict[str, Any]:
    """kill -9 of a host's agent: seconds until another host shows it critical."""
    delays = []
    for number in range(samples):
        prefix = f"/bench/liveness{number}/"
        a = start_agent(work, f"dying-{number}", etcd.endpoints, prefix, [])
        b = start_agent(work, f"watching-{number}", etcd.endpoints, prefix, [])
        api_b = Api(b)

        def serf(name: str = f"dying-{number}", api_b: Api = api_b) -> str | None:
            _, checks = api_b.call("GET", f"/v1/health/node/{name}")
            return next((c["Status"] for c in checks if c["CheckID"] == "serfHealth"), None)

        b.wait(lambda: serf() == "passing", 20, "the dying host alive")
        a.kill9()
        killed = time.monotonic()
        b.wait(lambda: serf() == "critical", ttl + 30, "the dead host critical", interval=0.02)
        delays.append(time.monotonic() - killed)
        b.leave()
    return {"lease_ttl_s": LEASE_TTL, "dead_to_critical_s": [round(d, 2) for d in delays]}


def run(
    changes: int = 200, window: float = 20.0, scales: tuple[int, ...] = (10, 50, 200), samples: int = 40
) -> dict[str, Any]:
    binary = etcd_binary()
    if binary is None:
        raise SystemExit(
            "no etcd: apt-get download etcd-server && dpkg-deb -x etcd-server_*.deb .cache/etcd/root"
        )
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    etcd = EtcdCluster(binary).start()
    try:
        with tempfile.TemporaryDirectory(prefix="ps-bench-cluster-") as temp:
            work = Path(temp)
            print("  two agents: change-to-visible and traffic ...", flush=True)
            results["pair"] = two_agents(etcd, work, changes, window)
            print("  a host killed: time until others see it critical ...", flush=True)
            results["liveness"] = liveness(etcd, work)
            results["simulation"] = []
            for count in scales:
                print(f"  {count} simulated agents ...", flush=True)
                results["simulation"].append(simulate(etcd, work, count, samples, window / 2))
    finally:
        etcd.stop()
    results["prediction"] = predict(results["simulation"])
    return results


def predict(simulation: list[dict[str, Any]]) -> dict[str, Any]:
    """What the measured growth means at 1,000 and 10,000 hosts. Idle, etcd only renews
    leases (one keepalive per host every TTL/3: grows with hosts, no writes). Under churn,
    writes grow with hosts (each changes at its own rate) and what etcd sends with hosts
    squared (every change reaches every agent's watch). Each agent's mirror grows with hosts."""
    if len(simulation) < 2:
        return {}
    first, last = simulation[0], simulation[-1]
    span = last["agents"] - first["agents"]
    rss_per_host = (last["real_agent_rss_mib"] - first["real_agent_rss_mib"]) / span
    hosts_last = last["agents"]
    out = {}
    for hosts in (1000, 10000):
        out[str(hosts)] = {
            "agent_rss_mib": round(first["real_agent_rss_mib"] + rss_per_host * (hosts - first["agents"]), 1),
            "etcd_idle_sent_mib_per_second": round(
                last["etcd_idle_sent_kib_per_second"] * hosts / hosts_last / 1024, 2
            ),
            "etcd_churn_writes_per_second": round(
                last["etcd_churn_writes_per_second"] * hosts / hosts_last, 1
            ),
            "etcd_churn_sent_mib_per_second": round(
                last["etcd_churn_sent_kib_per_second"] * (hosts / hosts_last) ** 2 / 1024, 1
            ),
        }
    return out


def report(results: dict[str, Any]) -> str:
    pair = results["pair"]
    lines = [
        "change-to-visible across hosts (blocking query on B, change on A): "
        f"p50 {pair['change_to_visible_ms']['p50']} ms, p99 {pair['change_to_visible_ms']['p99']} ms "
        f"({pair['change_to_visible_ms']['samples']} changes)",
    ]
    if "liveness" in results:
        live = results["liveness"]
        lines.append(
            f"kill -9 of a host (lease TTL {live['lease_ttl_s']} s) to critical elsewhere: "
            f"{live['dead_to_critical_s']} s"
        )
    for phase, data in pair["traffic"].items():
        lines.append(
            f"etcd per agent, {phase}: {data['etcd_writes_per_second_per_agent']} writes/s, "
            f"{data['etcd_sent_kib_per_second_per_agent']} KiB/s sent by etcd"
        )
    header: tuple[str, ...] = ("agents", "propagation p50 (ms)", "p99 (ms)", "etcd idle writes/s")
    header += (
        "etcd idle sent (KiB/s)",
        "churn writes/s",
        "churn sent (KiB/s)",
        "real agent RSS (MiB)",
        "keys",
    )
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines.extend(
        f"| {row['agents']} | {row['propagation_ms']['p50']} | {row['propagation_ms']['p99']} | "
        f"{row['etcd_idle_writes_per_second']} | {row['etcd_idle_sent_kib_per_second']} | "
        f"{row['etcd_churn_writes_per_second']} | {row['etcd_churn_sent_kib_per_second']} | "
        f"{row['real_agent_rss_mib']} | {row['keys']} |"
        for row in results["simulation"]
    )
    for hosts, data in results.get("prediction", {}).items():
        lines.append(f"predicted at {hosts} hosts: {data}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["simulation"]
    agents = [row["agents"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(agents, [row["propagation_ms"]["p50"] for row in rows], "o-", label="p50")
    axes[0].plot(agents, [row["propagation_ms"]["p99"] for row in rows], "o-", label="p99")
    axes[0].set(title="change on one host, seen on another", xlabel="agents", ylabel="ms")
    axes[0].legend()
    axes[1].plot(
        agents, [row["etcd_idle_sent_kib_per_second"] for row in rows], "o-", label="idle: KiB/s sent"
    )
    axes[1].plot(
        agents, [row["etcd_churn_sent_kib_per_second"] for row in rows], "o-", label="churn: KiB/s sent"
    )
    axes[1].plot(agents, [row["etcd_churn_writes_per_second"] for row in rows], "o-", label="churn: writes/s")
    axes[1].set(title=f"etcd load (churn: a change per host per {CHURN_PERIOD:.0f}s)", xlabel="agents")
    axes[1].legend()
    axes[2].plot(agents, [row["real_agent_rss_mib"] for row in rows], "o-")
    axes[2].set(title="one agent's memory", xlabel="agents", ylabel="MiB")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
