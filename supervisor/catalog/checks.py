"""Health checks: TCP, HTTP and TTL, run as asyncio tasks on the API's event loop.

A managed proxy gets Consul's "Connect Proxy Listening" TCP check on its public
listener. Beyond Consul:

* the catalog marks that check critical the moment the proxy process exits, and after
  a (re)start probes quickly until the listener accepts -- 50 ms, then backing off
  (100, 200, 400 ms ... up to the interval), so a new proxy joins discovery as soon as
  it listens, and 300 proxies that never listen cost a few probes each, not a core;
* a stopped (SIGSTOP) proxy process is critical at the next probe, though its socket
  still accepts; the built-in proxy's listener must also answer a TLS hello, so a
  wedged one leaves discovery too (a plain TCP connect succeeds into the backlog).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from supervisor.catalog.probes import probe_http, probe_script, probe_tcp, probe_tls_listener
from supervisor.catalog.status import CheckKind, CheckStatus
from supervisor.process.identity import read_stat

PASSING, WARNING, CRITICAL = CheckStatus.PASSING, CheckStatus.WARNING, CheckStatus.CRITICAL
FAST_PROBE_INTERVAL = 0.05
FAST_PROBE_WINDOW = 30.0
TLS_ANSWER_TIMEOUT = 5.0  # a serving proxy answers a TLS hello in microseconds; 5 s spares a starved one


@dataclass(frozen=True)
class CheckSpec:
    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    kind: CheckKind
    target: str = ""
    interval: float = 10.0
    timeout: float = 10.0
    ttl: float = 0.0
    initial_status: CheckStatus = CRITICAL
    notes: str = ""
    method: str = "GET"
    header: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tls_skip_verify: bool = False
    proxy_id: str = ""  # set for a managed proxy's listening check
    tls_listener: bool = False  # the listener is the built-in proxy's: it must answer TLS
    args: tuple[str, ...] = ()  # script checks
    alias_node: str = ""
    alias_service: str = ""
    deregister_after: float = 0.0  # deregister the service once critical this long (0: never)


@dataclass
class CheckState:
    spec: CheckSpec
    status: CheckStatus
    output: str
    create_index: int
    modify_index: int
    ttl_deadline: float | None = None  # monotonic; TTL checks only
    fast_until: float = 0.0  # monotonic; probe quickly (backing off) until passing or this time
    fast_probes: int = 0  # probes since fast probing began
    pid: int | None = None  # a managed proxy's current process
    critical_since: float | None = None  # monotonic; while critical
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def probe_fast(self, now: float) -> None:
        """A proxy (re)started: probe from 50 ms again, until its listener answers."""
        self.fast_until = now + FAST_PROBE_WINDOW
        self.fast_probes = 0
        self.wake.set()


Report = Callable[[CheckState, CheckStatus, str], None]


def next_delay(state: CheckState, status: CheckStatus, now: float) -> float:
    """How long until the next probe: the interval, or -- while a new proxy is awaited --
    50 ms doubling with every probe that found it not yet listening."""
    interval = state.spec.interval
    if status is PASSING or now >= state.fast_until:
        return interval
    delay = FAST_PROBE_INTERVAL * 2.0 ** min(state.fast_probes, 20)
    state.fast_probes += 1
    return min(delay, interval)


def stopped_process(pid: int | None) -> str | None:
    """Why a proxy's process cannot be serving although it exists, if it cannot."""
    if pid is None:
        return None
    stat = read_stat(pid)
    if stat is not None and stat.state in ("T", "t"):
        return (
            f"proxy process {pid} is stopped (SIGSTOP or a debugger): it accepts connections but serves none"
        )
    return None


SCRIPT_TIMEOUT = 30.0  # Consul's default for script checks


async def probe(state: CheckState) -> tuple[CheckStatus, str]:
    spec = state.spec
    timeout = min(spec.timeout, spec.interval)
    if spec.kind is CheckKind.SCRIPT:
        return await probe_script(spec.args, spec.timeout if spec.timeout > 0 else SCRIPT_TIMEOUT)
    if spec.kind is CheckKind.HTTP:
        return await probe_http(
            spec.target,
            method=spec.method,
            headers=spec.header,
            timeout=spec.timeout,
            tls_skip_verify=spec.tls_skip_verify,
        )
    stopped = stopped_process(state.pid)
    if stopped is not None:
        return CRITICAL, stopped
    if spec.tls_listener:
        return await probe_tls_listener(spec.target, min(timeout, TLS_ANSWER_TIMEOUT))
    return await probe_tcp(spec.target, timeout)


async def run_check(state: CheckState, report: Report) -> None:
    """Probe ``state``'s target forever (cancelled by the catalog when the check goes).
    Only TCP, HTTP, script and TTL checks run; alias and maintenance checks are set by the
    catalog."""
    if state.spec.kind is CheckKind.TTL:
        await _run_ttl(state, report)
        return
    if not state.spec.kind.probed:
        return
    while True:
        status, output = await probe(state)
        report(state, status, output)
        delay = next_delay(state, status, time.monotonic())
        state.wake.clear()
        try:
            await asyncio.wait_for(state.wake.wait(), delay)
        except TimeoutError:
            pass


async def _run_ttl(state: CheckState, report: Report) -> None:
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
