"""The fake proxy's state file: one JSON line per start, stop or child (see fakeproxy.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FAKEPROXY = str(Path(__file__).parent / "fakeproxy.py")


def fake_proxy(mode: str, statefile: Path | str, *extra: str, python: str = sys.executable) -> list[str]:
    """The command line of a fake proxy in ``mode`` that records into ``statefile``."""
    return [python, FAKEPROXY, mode, str(statefile), *extra]


def read_state(statefile: Path) -> list[dict[str, Any]]:
    if not statefile.exists():
        return []
    return [json.loads(line) for line in statefile.read_text().splitlines() if line.strip()]


def starts(statefile: Path) -> list[dict[str, Any]]:
    return [entry for entry in read_state(statefile) if "mode" in entry]


def stopped(statefile: Path) -> list[int]:
    """PIDs that recorded a clean stop (they handled SIGINT/SIGTERM and exited)."""
    return [int(entry["stopped"]) for entry in read_state(statefile) if "stopped" in entry]


def first_value(statefile: Path, key: str) -> int:
    """The first recorded value of ``key`` (a PID) in the state file, 0 if none yet."""
    return next((int(entry[key]) for entry in read_state(statefile) if key in entry), 0)
