"""Ports for tests: chosen at run time, free when chosen, never a fixed one.

They are taken below the kernel's ephemeral range (``ip_local_port_range``), where no
outgoing connection ever gets its local port: a port the OS handed out by ``bind(0)`` and
released again could be taken by any ``connect`` before the test's process binds it (a
proxy that cannot bind its listener exits, and the test waits for nothing). A port handed
out is not handed out again until 4,096 newer ones were (a test's ports stay its own).
"""

from __future__ import annotations

import random
import socket
from collections import deque
from pathlib import Path

LOWEST = 10000
RECENT = 4096
_given: set[int] = set()
_order: deque[int] = deque()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):  # (DNS tests listen on both)
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1", size: int = 1) -> int:
    """A port free a moment ago (the first of ``size`` consecutive ones), below the
    ephemeral range, none of them among the last ports handed out."""
    top = _ephemeral_start() - size
    for _ in range(1000):
        start = random.randrange(LOWEST, top)
        ports = range(start, start + size)
        if _given.isdisjoint(ports) and all(_free(host, port) for port in ports):
            _given.update(ports)
            _order.extend(ports)
            while len(_order) > RECENT:
                _given.discard(_order.popleft())
            return start
    raise RuntimeError(f"no {size} free consecutive ports below {top + size}")


def free_port_range(size: int = 16) -> tuple[int, int]:
    """``size`` consecutive free ports (a proxy port range)."""
    low = free_port(size=size)
    return low, low + size - 1
