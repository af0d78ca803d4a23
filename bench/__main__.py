"""Run the benchmarks: ``python -m bench [agent] [--quick]``; results go to bench/results/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import agent_bench, control_bench, proxy_bench

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("suite", nargs="?", default="agent", choices=["agent", "control", "proxy"])
    parser.add_argument("--quick", action="store_true", help="fewer proxies and a 10 s idle window")
    parser.add_argument("--proxies", type=int, default=200, help="proxies for adoption and idle CPU")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window")
    args = parser.parse_args()
    if args.suite == "agent":
        if args.quick:
            results = agent_bench.run(count=50, idle_seconds=10, drop_in_samples=10)
        else:
            results = agent_bench.run(count=args.proxies, idle_seconds=args.idle_seconds)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
