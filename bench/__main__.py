"""Run the benchmarks: ``python -m bench [agent|control|proxy|dns|soak|cluster] [--quick]``; results go to
bench/results/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import agent_bench, cluster_bench, control_bench, dns_bench, proxy_bench, soak_bench

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "suite", nargs="?", default="agent", choices=["agent", "control", "proxy", "soak", "dns", "cluster"]
    )
    parser.add_argument("--quick", action="store_true", help="smaller and shorter runs")
    parser.add_argument(
        "--proxies", type=int, default=None, help="proxies (agent: 200 for adoption and idle CPU; soak: 100)"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window")
    args = parser.parse_args()
    if args.suite == "agent":
        if args.quick:
            results = agent_bench.run(count=50, idle_seconds=10, drop_in_samples=10)
        else:
            results = agent_bench.run(count=args.proxies or 200, idle_seconds=args.idle_seconds)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "agent.json").write_text(json.dumps(results, indent=2) + "\n")
        print(agent_bench.report(results))
    if args.suite == "control":
        results = control_bench.run(waiters=200 if args.quick else 1000)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "control.json").write_text(json.dumps(results, indent=2) + "\n")
        print(control_bench.report(results))
    if args.suite == "proxy":
        results = proxy_bench.run(seconds=3 if args.quick else 5, samples=2000 if args.quick else 5000)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "proxy.json").write_text(json.dumps(results, indent=2) + "\n")
        print(proxy_bench.report(results))
        try:
            proxy_bench.plot(results, RESULTS / "proxy.png")
            print(f"plot: {RESULTS / 'proxy.png'}")
        except ImportError:
            print("no plot: install the bench extra (pip install -e '.[bench]') for matplotlib")
    if args.suite == "cluster":
        if args.quick:
            results = cluster_bench.run(changes=40, window=5, scales=(5, 20), samples=10)
        else:
            results = cluster_bench.run()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cluster.json").write_text(json.dumps(results, indent=2) + "\n")
        print(cluster_bench.report(results))
        try:
            cluster_bench.plot(results, RESULTS / "cluster.png")
            print(f"plot: {RESULTS / 'cluster.png'}")
        except ImportError:
            print("no plot: install the bench extra (pip install -e '.[bench]') for matplotlib")
    if args.suite == "dns":
        results = dns_bench.run(seconds=3 if args.quick else 10)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "dns.json").write_text(json.dumps(results, indent=2) + "\n")
        print(dns_bench.report(results))
    if args.suite == "soak":
        if args.quick:
            results = soak_bench.run(count=10, minutes=1)
        else:
            results = soak_bench.run(count=args.proxies or 100, minutes=args.minutes)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
        print(soak_bench.report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
