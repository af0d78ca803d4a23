"""Re-adoption of proxies that survived an agent restart.

Two sources of truth, used together:

* the supervision record (snapshot.json): a process is accepted only if its PID, start
  time and boot ID all still match, checked through a pidfd (``open_verified``), so a
  recycled PID, a thread of the agent or a process from before a reboot is never
  adopted or signalled;
* the marker scan: processes carrying this agent's marker that no record mentions were
  started just before the previous agent died. They are adopted (or, if another process
  already serves that proxy, killed): never orphaned, never duplicated. Marked processes
  that belong to no adopted proxy's session (leftovers of a dead proxy) are killed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from supervisor.process.handle import ProcessHandle
from supervisor.process.identity import age_of, identity_of, open_verified
from supervisor.process.marker import MarkedProcess, find_marked, kill_marked
from supervisor.state.datadir import ProxyRecord

log = logging.getLogger("supervisor.adoption")


@dataclass
class AdoptedProxy:
    proxy_id: str
    handle: ProcessHandle
    spec_hash: str
    age: float
    restarts: int
    found_by: str  # "record" or "marker"


@dataclass
class AdoptionResult:
    adopted: dict[str, AdoptedProxy] = field(default_factory=dict)
    records: dict[str, ProxyRecord] = field(default_factory=dict)  # every record, for counters
    killed: list[str] = field(default_factory=list)


def adopt_survivors(
    records: Mapping[str, ProxyRecord],
    owner: str,
    scan: Callable[[str], list[MarkedProcess]] = find_marked,
    kill: Callable[[MarkedProcess], bool] = kill_marked,
) -> AdoptionResult:
    result = AdoptionResult(records=dict(records))
    for proxy_id, record in records.items():
        identity = record.identity
        if identity is None:
            continue
        pidfd = open_verified(identity)
        if pidfd is None:
            log.info(
                "proxy %s: recorded process %d is gone (or its PID now belongs to another "
                "process); it will be started afresh",
                proxy_id,
                identity.pid,
            )
            continue
        result.adopted[proxy_id] = AdoptedProxy(
            proxy_id=proxy_id,
            handle=ProcessHandle(identity, pidfd, record.generation),
            spec_hash=record.spec_hash,
            age=age_of(identity.start_ticks),
            restarts=record.restarts,
            found_by="record",
        )

    marked = scan(owner)
    adopted_pids = {adopted.handle.pid for adopted in result.adopted.values()}
    leaders = sorted(
        (process for process in marked if process.is_session_leader and process.pid not in adopted_pids),
        key=lambda process: process.stat.start_ticks,
        reverse=True,  # the newest first: it is the one most likely to match the config
    )
    for process in leaders:
        proxy_id = process.marker.proxy_id
        if proxy_id in result.adopted:
            if kill(process):
                result.killed.append(f"duplicate proxy {proxy_id} (pid {process.pid})")
            continue
        adopted = _adopt_unrecorded(process, records.get(proxy_id))
        if adopted is not None:
            result.adopted[proxy_id] = adopted
            adopted_pids.add(process.pid)

    for process in marked:
        if process.pid in adopted_pids or process.stat.session in adopted_pids:
            continue
        if process.is_session_leader and process.marker.proxy_id in result.adopted:
            continue  # already handled above (killed as a duplicate, or it vanished)
        if kill(process):
            result.killed.append(
                f"leftover process of proxy {process.marker.proxy_id} "
                f"(pid {process.pid}, {process.stat.comm})"
            )
    return result


def _adopt_unrecorded(process: MarkedProcess, record: ProxyRecord | None) -> AdoptedProxy | None:
    identity = identity_of(process.pid)
    if identity is None or identity.start_ticks != process.stat.start_ticks:
        return None
    pidfd = open_verified(identity)
    if pidfd is None:
        return None
    generation = record.generation + 1 if record is not None else 1
    log.warning(
        "proxy %s: found process %d that was started but not recorded (the previous agent "
        "stopped right after starting it); adopting it",
        process.marker.proxy_id,
        process.pid,
    )
    return AdoptedProxy(
        proxy_id=process.marker.proxy_id,
        handle=ProcessHandle(identity, pidfd, generation),
        spec_hash=process.marker.spec_hash,
        age=age_of(identity.start_ticks),
        restarts=record.restarts if record is not None else 0,
        found_by="marker",
    )
