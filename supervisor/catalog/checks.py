"""Health checks: TCP, HTTP and TTL, run as asyncio tasks on the API's event loop.

A managed proxy gets Consul's "Connect Proxy Listening" TCP check on its public
listener. Beyond Consul, the catalog marks that check critical the moment the proxy
process exits and, after a (re)start, probes every 50 ms until the listener accepts, so
a dead proxy leaves discovery within milliseconds and a new one joins as soon as it
listens -- not at the next 10 s probe.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
FAST_PROBE_INTERVAL = 0.05
FAST_PROBE_WINDOW = 30.0


@dataclass(frozen=True)
class CheckSpec:
    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    kind: str  # "tcp" | "http" | "ttl"
    target: str = ""
    interval: float = 10.0
    timeout: float = 10.0
    ttl: float = 0.0
    initial_status: str = CRITICAL
    notes: str = ""
    method: str = "GET"
    header: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tls_skip_verify: bool = False
    proxy_id: str = ""  # set for a managed proxy's listening check


@dataclass
class CheckState:
    spec: CheckSpec
    status: str
    output: str
    create_index: int
    modify_index: int
    ttl_deadline: float | None = None  # monotonic; TTL checks only
    fast_until: float = 0.0  # monotonic; probe every 50 ms until passing or this time
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self, node: str) -> dict[str, Any]:
        spec = self.spec
        return {
            "Node": node,
            "CheckID": spec.check_id,
            "Name": spec.name,
            "Status": self.status,
            "Notes": spec.notes,
            "Output": self.output,
            "ServiceID": spec.service_id,
            "ServiceName": spec.service_name,
            "ServiceTags": list(spec.service_tags),
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def split_host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


async def probe_tcp(target: str, timeout: float) -> tuple[str, str]:
    try:
        host, port = split_host_port(target)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return CRITICAL, f"dial tcp {target}: i/o timeout"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return CRITICAL, f"dial tcp {target}: connect: {reason.lower()}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return PASSING, f"TCP connect {target}: Success"


async def probe_http(spec: CheckSpec) -> tuple[str, str]:
    """GET (or ``method``) the URL: 2xx passing, 429 warning, anything else critical."""
    url = urlsplit(spec.target)
    secure = url.scheme == "https"
    port = url.port or (443 if secure else 80)
    context = None
    if secure:
        context = ssl.create_default_context()
        if spec.tls_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(url.hostname, port, ssl=context), spec.timeout
        )
    except TimeoutError:
        return CRITICAL, f"{spec.method} {spec.target}: timeout after {spec.timeout:g}s"
    except (OSError, ValueError) as exc:
        return CRITICAL, f"{spec.method} {spec.target}: {exc}"
    try:
        headers = {
            "Host": url.netloc,
            "User-Agent": "Consul Health Check",
            "Accept": "text/plain, text/*, */*",
        }
        lines = [f"{spec.method} {path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += [f"{name}: {value}" for name, values in spec.header for value in values]
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), spec.timeout)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), spec.timeout)
        body = await asyncio.wait_for(reader.read(4096), spec.timeout) if b"\r\n" in head else b""
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        return CRITICAL, f"{spec.method} {spec.target}: {exc or type(exc).__name__}"
    finally:
        writer.close()
    parts = status_line.decode("latin-1").split(" ", 2)
    try:
        code = int(parts[1])
    except (IndexError, ValueError):
        return CRITICAL, f"{spec.method} {spec.target}: malformed response {status_line[:80]!r}"
    reason = " ".join(parts[1:]).strip()
    output = f"HTTP {spec.method} {spec.target}: {reason} Output: {body.decode(errors='replace')}"
    if 200 <= code < 300:
        return PASSING, output
    if code == 429:
        return WARNING, output
    return CRITICAL, output


async def run_check(state: CheckState, report: Callable[[CheckState, str, str], None]) -> None:
    """Probe ``state``'s target forever (cancelled by the catalog when the check goes)."""
    spec = state.spec
    if spec.kind == "ttl":
        await _run_ttl(state, report)
        return
    while True:
        if spec.kind == "http":
            status, output = await probe_http(spec)
        else:
            status, output = await probe_tcp(spec.target, min(spec.timeout, spec.interval))
        report(state, status, output)
        fast = status != PASSING and time.monotonic() < state.fast_until
        delay = FAST_PROBE_INTERVAL if fast else spec.interval
        state.wake.clear()
        try:
            await asyncio.wait_for(state.wake.wait(), delay)
        except TimeoutError:
            pass


async def _run_ttl(state: CheckState, report: Callable[[CheckState, str, str], None]) -> None:
    while True:
        state.wake.clear()
        deadline = state.ttl_deadline
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(state.wake.wait(), timeout)
            continue  # an update moved the deadline
        except TimeoutError:
            pass
        if state.ttl_deadline is not None and time.monotonic() >= state.ttl_deadline:
            state.ttl_deadline = None
            report(state, CRITICAL, "TTL expired")
