"""The DNS listeners: UDP and TCP on ``addresses.dns``/``client_addr`` and ``ports.dns``,
on the control plane's event loop (answers read the catalog without locks).

A port that cannot be bound is logged as an error naming the address and the agent goes
on without DNS: the proxies it supervises matter more than its DNS interface (Consul
refused to start, which took every proxy with it). A reload that moves the address
rebinds. TCP connections are capped and closed when idle, so held connections cannot
take the agent's descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from supervisor.config.model import AgentConfig
from supervisor.dns.resolver import Resolver, Transport
from supervisor.net import join_host_port

log = logging.getLogger("supervisor.dns")

MAX_TCP_CONNECTIONS = 128
TCP_IDLE_TIMEOUT = 10.0


def answer_safely(resolver: Resolver, wire: bytes, transport: Transport) -> bytes | None:
    """The resolver's answer; a query it fails on (a bug) is dropped with one line in the
    log, never a traceback that a client could produce at will."""
    try:
        return resolver.answer(wire, transport)
    except Exception as exc:  # noqa: BLE001 - one query, never the listener
        log.error("dns: cannot answer a query (%s: %s); dropped it", type(exc).__name__, exc)
        return None


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = answer_safely(self.resolver, data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: udp: %s", exc)


class DnsServer:
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._wanted: tuple[str, int] | None = None  # what the configuration asks for
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def apply(self, config: AgentConfig) -> None:
        """Listen where ``config`` says (or nowhere: ``ports.dns = -1``)."""
        wanted = (config.dns_host, config.dns_port) if config.dns_port >= 0 else None
        if wanted == self._wanted:
            return  # (a failed bind is retried only when the setting changes)
        self._wanted = wanted
        self.close()
        if wanted is None:
            return
        host, port = wanted
        where = join_host_port(host, port)
        loop = asyncio.get_running_loop()
        try:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self.resolver), local_addr=(host, port), reuse_port=False
            )
            self._udp = udp
            bound_port = udp.get_extra_info("sockname")[1]
            self._tcp = await asyncio.start_server(self._serve_tcp, host, bound_port, reuse_address=True)
        except OSError as exc:
            self.close()
            log.error(
                "DNS interface not started: cannot listen on %s (%s); free the port, or set "
                "ports.dns to another port (-1: no DNS interface) and reload",
                where,
                exc.strerror or exc,
            )
            return
        log.info(
            "DNS interface listening on %s (UDP and TCP), domain %s",
            join_host_port(host, bound_port),
            config.domain,
        )

    @property
    def bound_port(self) -> int | None:
        if self._udp is None:
            return None
        return int(self._udp.get_extra_info("sockname")[1])

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        try:
            while True:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT), "big")
                message = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_TIMEOUT)
                reply = answer_safely(self.resolver, message, "tcp")
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await asyncio.wait_for(writer.drain(), TCP_IDLE_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for task in list(self._connections):
            task.cancel()
