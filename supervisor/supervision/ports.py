"""Is a TCP port free on this host? (Consul only avoided ports of other proxies: B22.)"""

from __future__ import annotations

import socket


def port_is_free(host: str, port: int) -> bool:
    """Try to bind ``host:port`` the way a proxy would (SO_REUSEADDR, so TIME_WAIT leftovers
    of an earlier listener do not count as taken; a listening socket does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]") or "0.0.0.0", port))
        except OSError:
            return False
    return True
