"""Addresses: ``host:port`` text, IPv4/IPv6 families, listening sockets. One of each.

IPv6 hosts are written in brackets (``[::1]:8500``) wherever a port follows them, as Go
and Consul write them; a host given with brackets is accepted anywhere.
"""

from __future__ import annotations

import errno
import socket

DEFAULT_PORT = 8500
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"  # Consul's: where clients look for an agent


class BindFailed(OSError):
    """A listening socket could not be bound (``hint`` says what to do about it)."""

    def __init__(self, address: str, strerror: str, code: int | None) -> None:
        super().__init__(code or 0, strerror)
        self.address = address
        self.in_use = code == errno.EADDRINUSE


def bare_host(host: str) -> str:
    """``[::1]`` -> ``::1``; anything else unchanged."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in bare_host(host) else socket.AF_INET


def join_host_port(host: str, port: int) -> str:
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); raises ValueError if malformed.
    Without a port, ``default_port`` is used when given."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"malformed address {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:  # a bare IPv6 address: no port
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"address {text!r} has no port")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or int(port_text) > 65535:
        raise ValueError(f"address {text!r}: {port_text!r} is not a port")
    return host, int(port_text)


def listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket (SO_REUSEADDR); raises BindFailed."""
    host = bare_host(host)
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindFailed(join_host_port(host, port), exc.strerror or str(exc), exc.errno) from exc
    sock.setblocking(False)
    return sock
