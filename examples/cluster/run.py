#!/usr/bin/env python3
"""Two "hosts" and a 3-member etcd on this machine, in one command:

    python examples/cluster/run.py            # runs until Ctrl-C
    python examples/cluster/run.py --check    # shows cross-host discovery, then stops

It starts etcd (Debian's etcd-server binary: ``etcd`` on the PATH, or unpacked in
``.cache/etcd`` as ``.ci/run`` does), then the agents of host-a.hcl and host-b.hcl, each on
its own HTTP port and proxy port range, and a small app for ``db`` on host B. ``web`` on
host A reaches ``db`` on host B through both built-in proxies over mutual TLS, found
through the cluster's shared catalog. Everything it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BASE = 23700  # the ports host-a.hcl and host-b.hcl carry
DEFAULT_KEK = "/etc/proxy-supervisor/ca.kek"  # host-a.hcl's key file, replaced by one made here
REPO = HERE.parents[1]


def etcd_binary() -> str:
    for candidate in (
        os.environ.get("PROXY_SUPERVISOR_ETCD", ""),
        str(REPO / ".cache/etcd/root/usr/bin/etcd"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("etcd")
    if found is None:
        raise SystemExit(
            "no etcd: apt-get install etcd-server (or: apt-get download etcd-server && "
            "dpkg-deb -x etcd-server_*.deb .cache/etcd/root)"
        )
    return found


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


LOGS: list[Path] = []  # what to show when something does not come up


def wait(what: str, predicate: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.2)
    for log in LOGS:
        try:
            tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        except OSError:
            continue
        sys.stderr.write(f"--- {log.name}\n" + "\n".join(tail) + "\n")
    raise SystemExit(f"timed out waiting for {what}")


class App:
    """db's app on host B: answers every request with its name."""

    def __init__(self, port: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"hello from db on host-b\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="show cross-host discovery, then stop")
    parser.add_argument(
        "--base-port", type=int, default=23700, help="first of the 200 ports used (default 23700)"
    )
    args = parser.parse_args()
    base = args.base_port
    ports = {
        "etcd_client": [base + 91, base + 92, base + 93],
        "etcd_peer": [base + 81, base + 82, base + 83],
        "http": {"host-a": base + 1, "host-b": base + 2},
        "proxy": {"host-a": (base + 100, base + 149), "host-b": (base + 150, base + 199)},
        "web": base + 10,
        "db": base + 11,
        "upstream": base + 12,
    }
    processes: list[subprocess.Popen[bytes]] = []
    work = Path(tempfile.mkdtemp(prefix="ps-cluster-example-"))

    def stop(*_: object) -> None:
        for port in ports["http"].values():  # leave: stop the agent's proxies, deregister the host
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/agent/leave", method="PUT")
                urllib.request.urlopen(request, timeout=60).close()
            except OSError:
                pass
        for process in reversed(processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        etcd = etcd_binary()
        cluster = ",".join(f"m{n}=http://127.0.0.1:{p}" for n, p in enumerate(ports["etcd_peer"], 1))
        print(
            f"starting a 3-member etcd on 127.0.0.1:{ports['etcd_client'][0]}-{ports['etcd_client'][2]} ..."
        )
        for number, (client, peer) in enumerate(
            zip(ports["etcd_client"], ports["etcd_peer"], strict=True), 1
        ):
            LOGS.append(work / f"etcd{number}.log")
            log = open(work / f"etcd{number}.log", "ab")  # (handed to the child)
            processes.append(
                subprocess.Popen(
                    [
                        etcd,
                        "--name",
                        f"m{number}",
                        "--data-dir",
                        str(work / f"etcd{number}"),
                        "--listen-client-urls",
                        f"http://127.0.0.1:{client}",
                        "--advertise-client-urls",
                        f"http://127.0.0.1:{client}",
                        "--listen-peer-urls",
                        f"http://127.0.0.1:{peer}",
                        "--initial-advertise-peer-urls",
                        f"http://127.0.0.1:{peer}",
                        "--initial-cluster",
                        cluster,
                        "--initial-cluster-token",
                        f"example-{os.getpid()}",
                        "--initial-cluster-state",
                        "new",
                        "--pre-vote=true",
                        "--auto-compaction-mode",
                        "revision",
                        "--auto-compaction-retention",
                        "10000",
                        "--log-level",
                        "warn",
                        "--logger",
                        "zap",
                    ],  # fmt: skip
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        for client in ports["etcd_client"]:
            wait(
                "etcd",
                lambda client=client: (
                    json.loads(get(f"http://127.0.0.1:{client}/health"))["health"] == "true"
                ),
            )
        kek = work / "ca.kek"
        kek.write_text(os.urandom(32).hex())
        kek.chmod(0o600)
        App(ports["db"])
        shift = base - DEFAULT_BASE  # the config files carry the default ports: move them all
        for host in ("host-a", "host-b"):
            text = (HERE / f"{host}.hcl").read_text().replace(DEFAULT_KEK, str(kek))
            text = re.sub(r"\b237\d\d\b|\b238\d\d\b", lambda m: str(int(m.group()) + shift), text)
            config = work / host / "conf.d"
            config.mkdir(parents=True)
            (config / "agent.hcl").write_text(text)
            print(f"starting the agent of {host} (HTTP API on 127.0.0.1:{ports['http'][host]}) ...")
            LOGS.append(work / f"{host}.log")
            log = open(work / f"{host}.log", "ab")  # (handed to the child)
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "supervisor",
                        "agent",
                        "-config-dir",
                        str(config),
                        "-data-dir",
                        str(work / host / "data"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=REPO,
                )
            )
            log.close()
        a, b = (f"http://127.0.0.1:{ports['http'][host]}" for host in ("host-a", "host-b"))
        wait(
            "db (on host-b) in host-a's catalog", lambda: json.loads(get(f"{a}/v1/health/connect/db?passing"))
        )
        entries = json.loads(get(f"{a}/v1/health/service/db"))
        print(f"\nhost-a sees db on: {[entry['Node']['Node'] for entry in entries]}")
        members = json.loads(get(f"{b}/v1/agent/members"))
        print(
            f"host-b's members: {[(m['Name'], 'alive' if m['Status'] == 1 else 'failed') for m in members]}"
        )
        upstream = f"http://127.0.0.1:{ports['upstream']}/"
        wait("web's upstream to reach db", lambda: b"host-b" in get(upstream))
        answer = get(upstream).decode().strip()
        print(f"web on host-a -> its upstream {upstream} -> mTLS -> db on host-b: {answer}")
        print("\ntry: curl -s " + f"{b}/v1/catalog/services; curl -s {upstream}")
        if args.check:
            return 0
        print("running; Ctrl-C stops everything")
        while all(process.poll() is None for process in processes):
            time.sleep(1)
        print("a process exited; see the logs in", work)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
