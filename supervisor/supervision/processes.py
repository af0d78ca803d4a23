"""Carrying out a machine's actions on real processes, and noticing their exits.

``ProcessRunner`` is the I/O half of supervision: it starts a slot's process (``Spawn``),
signals it (``Signal``, ``KillGroup``), watches its pidfd on the loop, and when it exits
reaps it and reports the exit to the supervisor, which feeds it to the machine. It
decides nothing: what to do, and when, comes from ``machine.py``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from supervisor.errors import SpawnError
from supervisor.process.handle import ExitStatus, ProcessHandle
from supervisor.process.spawn import LaunchSpec, Spawner
from supervisor.supervision.events import Clock
from supervisor.supervision.machine import Action, KillGroup, Signal, Spawn
from supervisor.supervision.persistence import RecordBook
from supervisor.supervision.slot import Slot

log = logging.getLogger("supervisor.processes")


class ProcessRunner:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        clock: Clock,
        spawner: Spawner,
        records: RecordBook,
        launch: Callable[[Slot], LaunchSpec],
        record_now: Callable[[], bool],
        on_exit: Callable[[Slot, ProcessHandle, ExitStatus], None],
        stop_timeout: float,
    ) -> None:
        self.loop = loop
        self.clock = clock
        self.spawner = spawner
        self.records = records
        self.launch = launch  # the command line and environment for a slot, now
        self.record_now = record_now  # write the supervision record at once; False on failure
        self.on_exit = on_exit
        self.stop_timeout = stop_timeout

    def carry_out(self, slot: Slot, actions: list[Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Spawn):
                pending.extend(self._spawn(slot, action.generation))
            elif isinstance(action, Signal):
                if slot.handle is not None and slot.handle.generation == action.generation:
                    log.info(
                        "proxy %s: sending %s to pid %d",
                        slot.proxy_id,
                        signal.Signals(action.signum).name,
                        slot.handle.pid,
                    )
                    slot.handle.send_signal(action.signum)
            elif isinstance(action, KillGroup):
                if slot.handle is not None and slot.handle.generation == action.generation:
                    log.warning(
                        "proxy %s: pid %d did not exit within %.0fs of SIGINT; killing its process group",
                        slot.proxy_id,
                        slot.handle.pid,
                        self.stop_timeout,
                    )
                    slot.handle.kill_group(signal.SIGKILL)

    def _spawn(self, slot: Slot, generation: int) -> list[Action]:
        planned = slot.planned
        assert planned is not None, "a proxy is only started with a plan"
        launch = self.launch(slot)
        try:
            handle = self.spawner.spawn(launch, generation)
        except SpawnError as exc:
            log.error("proxy %s: %s", slot.proxy_id, exc)
            return slot.machine.spawn_failed(generation, self.clock.monotonic(), str(exc))
        slot.handle = handle
        slot.adopted = False
        slot.running_spec_hash = planned.spec_hash
        slot.started_wall = self.clock.wall()
        self.watch(slot)
        self.records.process_started(slot.proxy_id, handle.pid)
        if handle.held:
            # It waits in the exec wrapper: let it run once the record names it, so no
            # later agent can miss it (it cannot find it by its marker: another user's).
            if self.record_now():
                handle.release()
            else:
                handle.kill_group(signal.SIGKILL)  # its exit follows: backoff, then a retry
        log.info(
            "proxy %s: started pid %d (generation %d): %s",
            slot.proxy_id,
            handle.pid,
            generation,
            " ".join(launch.argv),
        )
        return []

    def watch(self, slot: Slot) -> None:
        """Report the exit of ``slot``'s process (its pidfd turns readable)."""
        assert slot.handle is not None
        self.loop.add_reader(slot.handle.fileno(), self._exit_ready, slot)

    def unwatch(self, slot: Slot) -> None:
        if slot.handle is not None and slot.handle.fileno() >= 0:
            self.loop.remove_reader(slot.handle.fileno())

    def release(self, slot: Slot) -> None:
        """The agent is going: stop watching; the process runs on for the next agent."""
        if slot.handle is not None:
            self.unwatch(slot)
            slot.handle.close()

    def _exit_ready(self, slot: Slot) -> None:
        handle = slot.handle
        if handle is None or not handle.has_exited():
            return
        self.unwatch(slot)
        status = handle.reap()
        handle.close()
        slot.handle = None
        self.on_exit(slot, handle, status)
        if slot.handle is None:  # not started again at once
            self.records.process_gone(slot.proxy_id)
