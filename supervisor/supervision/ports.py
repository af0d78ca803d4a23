"""Is a TCP port free on this host? (Consul only avoided ports of other proxies: B22.)"""

from __future__ import annotations

import socket

from supervisor.net import bare_host, family_of


def port_is_free(host: str, port: int) -> bool:
    """Try to bind ``host:port`` the way a proxy would (SO_REUSEADDR, so TIME_WAIT leftovers
    of an earlier listener do not count as taken; a listening socket does)."""
    with socket.socket(family_of(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bare_host(host) or "0.0.0.0", port))
        except OSError:
            return False
    return True


EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_overlap(low: int, high: int, range_file: str = EPHEMERAL_RANGE) -> str | None:
    """A warning if the proxy port range overlaps the kernel's ephemeral (source) ports:
    an outgoing connection may then hold a proxy's port, and a health check to a port
    where nothing listens can connect to itself."""
    try:
        with open(range_file) as handle:
            first, last = (int(part) for part in handle.read().split()[:2])
    except (OSError, ValueError):
        return None
    if high < first or low > last:
        return None
    return (
        f"ports.proxy_min_port..proxy_max_port ({low}-{high}) overlaps the kernel's ephemeral port range "
        f"({first}-{last}, {range_file}): outgoing connections may take proxies' ports; move the proxy "
        "range below it, or set net.ipv4.ip_local_reserved_ports"
    )
