"""A controllable stand-in for a proxy, started by the supervisor in tests.

Usage: python fakeproxy.py MODE STATEFILE [ARGS]
Every start appends one JSON line to STATEFILE (pid, selected env, argv); a graceful
stop appends {"stopped": pid, "time": t}. Modes:
  run            print to stdout/stderr, then wait for SIGINT/SIGTERM
  ignore-sigint  like run, but ignore SIGINT (only SIGKILL stops it)
  exit CODE      exit immediately with CODE
  worker         like run, plus a child process in the same session
  double-fork    start a daemonised grandchild (new session) and exit 0
  flood N        write N lines to stdout as fast as possible, then wait
  tick           like run, plus a "tick N" line on stdout every 50 ms
  fail-if PATH   exit 3 at once if PATH exists, else like run (a broken upgrade)
  inspect PATH.. record whether each PATH can be read, its credentials and capabilities
                 (from /proc/self/status) and open fds, then like run
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

KEYS = (
    "CONNECT_PROXY_ID",
    "CONNECT_PROXY_TOKEN",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_SSL",
    "PROXY_SUPERVISOR_MARKER",
    "FAKEPROXY_AMBIENT",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
)


def record(statefile: str, entry: dict[str, object]) -> None:
    with open(statefile, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory listing's own fd, gone by now
    return fds


def main() -> None:
    mode, statefile = sys.argv[1], sys.argv[2]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Handlers first: once the start is recorded, a SIGINT is always handled cleanly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN if mode == "ignore-sigint" else on_signal)
    record(
        statefile,
        {
            "pid": os.getpid(),
            "mode": mode,
            "argv": sys.argv[1:],
            "env": {key: os.environ.get(key) for key in KEYS},
            "time": time.time(),
        },
    )
    if mode == "exit":
        sys.exit(int(sys.argv[3]))
    if mode == "fail-if" and os.path.exists(sys.argv[3]):
        print(f"refusing to start: {sys.argv[3]} exists", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "double-fork":
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                record(statefile, {"daemon": os.getpid()})
                time.sleep(3600)
            os._exit(0)
        sys.exit(0)
    if mode == "inspect":
        readable = {}
        for path in sys.argv[3:]:
            try:
                with open(path, "rb") as secret:
                    secret.read(1)
                readable[path] = True
            except OSError:
                readable[path] = False
        with open("/proc/self/status") as lines:
            wanted = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs")
            status = {
                name: value.strip()
                for name, _, value in (line.partition(":") for line in lines)
                if name in wanted
            }
        record(
            statefile,
            {"readable": readable, "status": status, "fds": _open_fds()},
        )
    if mode == "worker":
        if os.fork() == 0:
            record(statefile, {"worker": os.getpid()})
            time.sleep(3600)
            os._exit(0)
    print(f"hello stdout from {os.getpid()}", flush=True)
    print(f"hello stderr from {os.getpid()}", file=sys.stderr, flush=True)
    if mode == "flood":
        for index in range(int(sys.argv[3])):
            sys.stdout.write(f"line {index}\n")
        sys.stdout.flush()
    ticks = 0
    while not stopping:
        if mode == "tick":
            ticks += 1
            print(f"tick {ticks}", flush=True)
            time.sleep(0.05)
        else:
            signal.pause()
    record(statefile, {"stopped": os.getpid(), "time": time.time()})


if __name__ == "__main__":
    main()
