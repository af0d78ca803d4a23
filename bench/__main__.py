"""Run the benchmarks: ``python -m bench [agent|control|proxy|dns|soak|cluster] [--quick]``; results go to
bench/results/."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import agent_bench, cluster_bench, control_bench, dns_bench, proxy_bench, soak_bench

RESULTS = Path(__file__).resolve().parent / "results"


def save(
    name: str,
    results: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """``results/<name>.json``, the report on stdout, and ``results/<name>.png`` if it has one."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    if plot is None:
        return
    try:
        plot(results, RESULTS / f"{name}.png")
        print(f"plot: {RESULTS / f'{name}.png'}")
    except ImportError:
        print("no plot: install the bench extra (pip install -e '.[bench]') for matplotlib")


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
        save("agent", results, agent_bench.report)
    if args.suite == "control":
        results = control_bench.run(waiters=200 if args.quick else 1000)
        save("control", results, control_bench.report)
    if args.suite == "proxy":
        results = proxy_bench.run(seconds=3 if args.quick else 5, samples=2000 if args.quick else 5000)
        save("proxy", results, proxy_bench.report, proxy_bench.plot)
    if args.suite == "cluster":
        if args.quick:
            results = cluster_bench.run(changes=40, window=5, scales=(5, 20), samples=10)
        else:
            results = cluster_bench.run()
        save("cluster", results, cluster_bench.report, cluster_bench.plot)
    if args.suite == "dns":
        results = dns_bench.run(seconds=3 if args.quick else 10)
        save("dns", results, dns_bench.report)
    if args.suite == "soak":
        if args.quick:
            results = soak_bench.run(count=10, minutes=1)
        else:
            results = soak_bench.run(count=args.proxies or 100, minutes=args.minutes)
        save("soak", results, soak_bench.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
