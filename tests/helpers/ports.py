"""Ports for tests: ephemeral ones the OS hands out (no fixed port in any test)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_range(size: int = 16) -> tuple[int, int]:
    """A run of ``size`` consecutive ports around an OS-chosen ephemeral port."""
    base = free_port()
    low = max(1024, min(base, 65535 - size))
    return low, low + size - 1
