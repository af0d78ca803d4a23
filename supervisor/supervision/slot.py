"""One supervised proxy ID: its state machine, its plan and its live process, and how
that is written down (the record) and shown (the status)."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.process.handle import ProcessHandle
from supervisor.state.datadir import DataDir, ProxyRecord
from supervisor.supervision.desired import PlannedProxy
from supervisor.supervision.loop import Alarm
from supervisor.supervision.machine import ProxyMachine, State
from supervisor.supervision.view import ProxyStatus


@dataclass
class Slot:
    """Supervision of one proxy ID: the decisions (machine) and the live process (handle)."""

    proxy_id: str
    machine: ProxyMachine
    planned: PlannedProxy | None = None
    handle: ProcessHandle | None = None
    running_spec_hash: str | None = None
    adopted: bool = False
    started_wall: float | None = None
    alarm: Alarm | None = None  # the machine's next deadline, on the loop


def record_of(slot: Slot) -> ProxyRecord:
    """What the next agent needs to adopt (or not) this proxy's process."""
    handle = slot.handle
    return ProxyRecord(
        proxy_id=slot.proxy_id,
        pid=handle.pid if handle else 0,
        start_ticks=handle.identity.start_ticks if handle else 0,
        boot_id=handle.identity.boot_id if handle else "",
        spec_hash=slot.running_spec_hash or "",
        generation=slot.machine.generation,
        restarts=slot.machine.restarts,
        command=slot.planned.spec.command if slot.planned else (),
        started_at=slot.started_wall or 0.0,
        failures=slot.machine.failures,
    )


def status_of(slot: Slot, data_dir: DataDir | None) -> ProxyStatus:
    """How the proxy is doing, for the API and the CLI."""
    machine = slot.machine
    planned = slot.planned
    stdout_log = stderr_log = None
    if data_dir is not None:
        stdout_log, stderr_log = data_dir.log_paths(slot.proxy_id)
    return ProxyStatus(
        proxy_id=slot.proxy_id,
        service_id=planned.service.id if planned else "",
        state=machine.state,
        pid=slot.handle.pid if slot.handle else None,
        generation=machine.generation,
        restarts=machine.restarts,
        adopted=slot.adopted,
        last_exit=machine.last_exit,
        started_monotonic=machine.started_at if slot.handle else None,
        started_wall=slot.started_wall if slot.handle else None,
        next_attempt_monotonic=machine.retry_at if machine.state is State.BACKOFF else None,
        blocked_reason=machine.blocked_reason if machine.state is State.BLOCKED else None,
        port=planned.port if planned else 0,
        command=planned.spec.command if planned else (),
        stdout_log=stdout_log,
        stderr_log=stderr_log,
    )
