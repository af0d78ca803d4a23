"""The proxy's sockets: listeners and the options every proxied connection gets."""

from __future__ import annotations

import socket

from supervisor.net import BindFailed, family_of, listen_socket


class BindError(Exception):
    """A listener could not bind: fatal for the proxy (the supervisor shows the exit)."""


def listen(address: tuple[str, int], what: str) -> socket.socket:
    host, port = address
    try:
        return listen_socket(host, port, backlog=4096)
    except BindFailed as exc:
        hint = " (another process holds it)" if exc.in_use else ""
        raise BindError(f"cannot listen on {exc.address} for the {what}: {exc.strerror}{hint}") from exc


def tune(sock: socket.socket) -> None:
    """Non-blocking, and no Nagle delay: the proxy forwards what it gets at once."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def stream_socket(host: str) -> socket.socket:
    """A non-blocking, tuned TCP socket for dialling ``host``."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    tune(sock)
    return sock
