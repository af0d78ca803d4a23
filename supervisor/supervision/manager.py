"""The supervision loop: the one thread that owns every proxy process.

``Supervisor`` wires the per-proxy state machines (``machine.py``) to their effects:
it feeds them events and deadlines, carries out the actions they return, and keeps
data_dir and the published view in step. Everything else lives in its own piece:

* ``loop.SupervisionLoop`` -- asyncio's selector loop on an injected clock; process
  exits arrive as readable pidfds, events from other threads through ``post``, and
  every deadline (each machine's, the config debounce, the watchdog, a storage retry)
  is a real timer (``Alarm``), so no decision waits for an unrelated event;
* ``loader.ConfigLoader`` -- reads the configuration on a worker thread;
* ``persistence`` -- tokens and ports (``Allocations``), the record and pid files;
* ``sweeper.LeftoverSweeper`` -- kills what exited proxies leave behind;
* ``adoption`` -- re-adopts the survivors of an earlier agent run.

Signal handlers, the config watcher and the HTTP API only ``post`` events; each event
type has one handler (``_handlers``). An idle agent sleeps in ``epoll``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from supervisor.config.model import AgentConfig, ServiceDef
from supervisor.errors import ConfigError, SupervisorError
from supervisor.process.handle import ExitStatus, ProcessHandle
from supervisor.process.marker import MarkedProcess, find_marked, kill_marked
from supervisor.process.privileges import (
    agent_user,
    can_signal_other_users,
    can_switch_users,
    has_capabilities,
)
from supervisor.process.spawn import LaunchSpec, PosixSpawner, Spawner, seal_inherited_fds
from supervisor.state.datadir import DataDir, ProxyRecord
from supervisor.state.guard import DataDirGuard, Repair
from supervisor.supervision.adoption import AdoptionResult, adopt_survivors
from supervisor.supervision.desired import Plan, plan_proxies
from supervisor.supervision.events import (
    Clock,
    ConfigLoaded,
    DataDirChanged,
    Debounce,
    Event,
    FilesChanged,
    LoopHooks,
    ReloadRequested,
    RestartRequested,
    ServicesChanged,
    ShutdownRequested,
    SweepScanned,
    SystemClock,
)
from supervisor.supervision.launch import launch_for
from supervisor.supervision.loader import ConfigLoader
from supervisor.supervision.loop import Alarm, SupervisionLoop
from supervisor.supervision.machine import (
    Action,
    ProxyMachine,
    RestartPolicy,
    State,
)
from supervisor.supervision.persistence import Allocations, RecordBook
from supervisor.supervision.policy import (
    Privileges,
    StartPolicy,
    say_refused_as_root,
    say_what_shared_proxies_can_read,
)
from supervisor.supervision.processes import ProcessRunner
from supervisor.supervision.slot import Slot, record_of, status_of
from supervisor.supervision.sweeper import LeftoverSweeper
from supervisor.supervision.view import AgentView, Totals, ViewBoard
from supervisor.supervision.workers import Background, Workers

log = logging.getLogger("supervisor.manager")

# After a failed write to data_dir (disk full, directory gone), how long until the next try.
STORAGE_RETRY = 5.0
# Leftovers of exited proxies are looked for once exits have been quiet this long (at most
# SWEEP_CAP after the first): the /proc scan would compete with restarts.
SWEEP_QUIET = 0.3
SWEEP_CAP = 2.0

Adopt = Callable[
    [Mapping[str, ProxyRecord], str, Callable[[str], list[MarkedProcess]], Callable[[MarkedProcess], bool]],
    AdoptionResult,
]


@dataclass
class SupervisorOptions:
    data_dir: DataDir | None
    node_id: str
    api_address: str
    load_config: Callable[[], AgentConfig]
    is_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    spawner: Spawner = field(default_factory=PosixSpawner)
    clock: Clock = field(default_factory=SystemClock)
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    rng: random.Random = field(default_factory=random.Random)
    ambient_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    port_is_free: Callable[[str, int], bool] | None = None
    scan_marked: Callable[[str, Collection[int]], list[MarkedProcess]] = find_marked
    kill_marked: Callable[[MarkedProcess], bool] = kill_marked
    adopt: Adopt = adopt_survivors
    debounce: Debounce = field(default_factory=Debounce)
    registered_services: Callable[[], Sequence[ServiceDef]] = lambda: ()
    hooks: LoopHooks = field(default_factory=LoopHooks)
    guard: DataDirGuard | None = None
    storage_retry: float = STORAGE_RETRY
    run_in_background: Background | None = None  # None: the supervisor's own two workers
    # What the agent may do about proxies' users (see supervisor.process.privileges).
    privileges: Privileges | None = None  # None: this process's own


class Supervisor:
    """Owns every proxy process. ``start`` then ``run`` on one thread; ``post`` from any."""

    def __init__(self, options: SupervisorOptions, board: ViewBoard) -> None:
        from supervisor.supervision.ports import port_is_free

        self.options = options
        self.board = board
        self.clock = options.clock
        self.loop = SupervisionLoop(options.clock)
        self._port_is_free = options.port_is_free or port_is_free
        self._slots: dict[str, Slot] = {}
        self._config: AgentConfig | None = None
        self._plan = Plan()
        self._allocations = Allocations(options.data_dir)
        self._records = RecordBook(options.data_dir)
        self._restarts_seed: dict[str, ProxyRecord] = {}
        self._workers = Workers() if options.run_in_background is None else None
        background = options.run_in_background or self._workers
        assert background is not None
        self._sweeper = LeftoverSweeper(
            options.node_id,
            options.scan_marked,
            self.post,
            background,
            options.kill_marked,
        )
        self._loader = ConfigLoader(options.load_config, self.post, background)
        self._privileges = options.privileges or Privileges(
            is_root=options.is_root,
            can_switch_users=can_switch_users(),
            can_signal_other_users=can_signal_other_users(),
            has_capabilities=has_capabilities(),
            user=agent_user(),
        )
        self._policy = StartPolicy(self._privileges, allow_managed_root=False)
        self._runner = ProcessRunner(
            self.loop,
            self.clock,
            options.spawner,
            self._records,
            self._launch,
            lambda: self._records.sync(self._current_records()),
            self._exited,
            options.policy.stop_timeout,
        )
        self._reload_error: str | None = None
        self._totals = Totals()
        self._view_version = 0
        self._shutdown: ShutdownRequested | None = None
        self._shutdown_replies: list[Any] = []
        self._stopped = False
        self._flush_scheduled = False
        self._said_who_proxies_run_as = False
        self._config_debounce = options.debounce
        self._config_alarm = Alarm(self.loop, self._config_settled)
        self._data_dir_debounce = Debounce()
        self._data_dir_alarm = Alarm(self.loop, self._check_data_dir)
        self._storage_alarm = Alarm(self.loop, self._retry_storage)
        self._heartbeat_alarm = Alarm(self.loop, self._heartbeat)
        self._sweep_debounce = Debounce(quiet=SWEEP_QUIET, cap=SWEEP_CAP)
        self._sweep_alarm = Alarm(self.loop, self._sweep)
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            ReloadRequested: self._on_reload_requested,
            FilesChanged: self._on_files_changed,
            ConfigLoaded: self._on_config_loaded,
            ServicesChanged: self._on_services_changed,
            RestartRequested: self._on_restart_requested,
            ShutdownRequested: self._on_shutdown_requested,
            DataDirChanged: self._on_data_dir_changed,
            SweepScanned: self._on_sweep_scanned,
        }

    # -- thread-safe entry point -------------------------------------------------------------

    def post(self, event: Event) -> None:
        """Hand an event to the loop (safe from any thread and from signal handlers)."""
        self.loop.post(self._dispatch, event)

    # -- start-up and running -------------------------------------------------------------

    def start(self, config: AgentConfig) -> None:
        """Adopt survivors of an earlier run, then converge on ``config``."""
        seal_inherited_fds()  # whatever the agent opened so far stays out of its proxies
        if self.options.data_dir is not None:
            self._allocations.load()
            self._adopt(self.options.data_dir)
        self._apply(config)
        self._flush()
        if self.options.hooks.heartbeat_interval:
            self._heartbeat()

    def run(self) -> None:
        """Run until a shutdown has been carried out."""
        if not self._stopped:
            self.loop.run_forever()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def close(self) -> None:
        """Release fds; proxies keep running (they are re-adopted by the next agent)."""
        for slot in self._slots.values():
            self._runner.release(slot)
        if self._workers is not None:
            self._workers.stop()
        self.loop.close()

    def _adopt(self, store: DataDir) -> None:
        loaded = store.load_records()
        if loaded.problem:
            log.error("%s; running proxies are found by their marker instead", loaded.problem)
        options = self.options
        result = options.adopt(
            loaded.records, options.node_id, lambda owner: options.scan_marked(owner, ()), options.kill_marked
        )
        for description in result.killed:
            log.warning("killed %s", description)
        self._restarts_seed = result.records
        self._count(adopted=len(result.adopted))
        now = self.clock.monotonic()
        for proxy_id, adopted in result.adopted.items():
            slot = self._slot(proxy_id)
            slot.handle = adopted.handle
            slot.running_spec_hash = adopted.spec_hash
            slot.adopted = True
            slot.started_wall = self.clock.wall() - adopted.age
            slot.machine.adopted(adopted.handle.generation, now, adopted.age, adopted.restarts)
            self._runner.watch(slot)
            self._records.process_started(proxy_id, adopted.handle.pid)
            log.info(
                "adopted proxy %s (pid %d, up %.0fs, found by %s)",
                proxy_id,
                adopted.handle.pid,
                adopted.age,
                adopted.found_by,
            )

    # -- events -------------------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        if self._shutdown is not None and not isinstance(event, ShutdownRequested | SweepScanned):
            self._refuse_during_shutdown(event)
        else:
            self._handlers[type(event)](event)

    def _refuse_during_shutdown(self, event: Event) -> None:
        error = SupervisorError("the agent is shutting down")
        if isinstance(event, ReloadRequested) and event.reply is not None:
            event.reply.set_exception(error)
        elif isinstance(event, RestartRequested):
            event.reply.set_exception(error)
        elif isinstance(event, ConfigLoaded):
            for reply in event.replies:
                reply.set_exception(error)

    def _on_files_changed(self, _event: FilesChanged) -> None:
        self._config_alarm.set(self._config_debounce.poke(self.clock.monotonic()))

    def _config_settled(self) -> None:
        self._config_debounce.fire(self.clock.monotonic())
        if self._shutdown is None:
            self._request_reload("config files changed")

    def _on_reload_requested(self, event: ReloadRequested) -> None:
        self._request_reload(event.reason, event.reply)

    def _request_reload(self, reason: str, reply: Any = None) -> None:
        if not self._loader.reading:
            self.options.hooks.reloading()
            log.info("reading the configuration (%s)", reason)
        self._loader.request(reason, reply)

    def _on_config_loaded(self, event: ConfigLoaded) -> None:
        try:
            if event.config is None:
                assert event.error is not None
                self._reload_error = str(event.error)
                self._count(failed_reloads=self._totals.failed_reloads + 1)
                log.error(
                    "configuration reload (%s) failed; keeping the running configuration:\n%s",
                    event.reason,
                    event.error,
                )
                self._mark_dirty()  # the view carries the reload error
            else:
                self._reload_error = None
                self._count(reloads=self._totals.reloads + 1)
                log.info("configuration reloaded (%s)", event.reason)
                self._apply(event.config)
        finally:
            self.options.hooks.reloaded()
            self._loader.finished()
        self._flush()  # a caller told "done" must find the outcome in the view already
        for reply in event.replies:
            if self._reload_error:
                reply.set_exception(ConfigError.single("", "", self._reload_error))
            else:
                reply.set_result(None)

    def _on_services_changed(self, _event: ServicesChanged) -> None:
        if self._config is not None:
            self._apply(self._config)

    def _on_restart_requested(self, event: RestartRequested) -> None:
        slot = self._slots.get(event.proxy_id)
        if slot is None or not slot.machine.wanted:
            known = ", ".join(sorted(p for p, s in self._slots.items() if s.machine.wanted)) or "none"
            event.reply.set_exception(
                SupervisorError(f"no managed proxy {event.proxy_id!r} (known proxies: {known})")
            )
            return
        generation = slot.machine.generation
        log.info("proxy %s: restart requested by an operator", event.proxy_id)
        self._drive(slot, slot.machine.replace(self.clock.monotonic()))
        event.reply.set_result(generation)

    def _on_shutdown_requested(self, event: ShutdownRequested) -> None:
        if self._shutdown is not None:
            if event.reply is not None:  # a second request waits for the first to finish
                self._shutdown_replies.append(event.reply)
            return
        self.options.hooks.stopping()
        log.info("shutting down (%s)%s", event.reason, ", stopping all proxies" if event.stop_proxies else "")
        self._shutdown = event
        self._shutdown_replies = [event.reply] if event.reply is not None else []
        self._loader.cancel(SupervisorError("the agent is shutting down"))
        for alarm in (self._config_alarm, self._data_dir_alarm, self._storage_alarm):
            alarm.cancel()
        if event.stop_proxies:
            now = self.clock.monotonic()
            for slot in list(self._slots.values()):
                self._drive(slot, slot.machine.unwant(now))
        self._mark_dirty()

    def _on_data_dir_changed(self, _event: DataDirChanged) -> None:
        # Checked once the removals stop: repairing in the middle of an `rm -rf`
        # would only be undone (and make that rm fail).
        self._data_dir_alarm.set(self._data_dir_debounce.poke(self.clock.monotonic()))

    def _on_sweep_scanned(self, event: SweepScanned) -> None:
        sessions = {slot.handle.pid for slot in self._slots.values() if slot.handle is not None}
        self._sweeper.scanned(event, sessions)
        if self._sweeper.pending:
            self._sweep_alarm.set(self._sweep_debounce.poke(self.clock.monotonic()))

    # -- deadlines ----------------------------------------------------------------------------

    def _check_data_dir(self) -> None:
        """Put data_dir back if it was deleted under us (see supervisor.state.guard)."""
        self._data_dir_debounce.fire(self.clock.monotonic())
        guard = self.options.guard
        if guard is None or self._shutdown is not None:
            return
        running = {proxy_id: slot.handle.pid for proxy_id, slot in self._slots.items() if slot.handle}
        outcome = guard.repair(self._allocations.current, running)
        if outcome is Repair.INTACT:
            return
        if outcome is Repair.TAKEN_OVER:
            self._on_shutdown_requested(ShutdownRequested(stop_proxies=False, reason="data_dir taken over"))
        elif outcome is Repair.RETRY:
            # The retry re-applies the config, which saves the allocations again.
            self._allocations.mark_unsaved()
            self._storage_alarm.set(self.clock.monotonic() + self.options.storage_retry)
        else:
            self._records.invalidate()
            self.options.hooks.data_dir_restored()
        self._mark_dirty()

    def _retry_storage(self) -> None:
        self._check_data_dir()
        if self._config is not None and self._shutdown is None:
            self._apply(self._config)
        self._mark_dirty()

    def _sweep(self) -> None:
        self._sweep_debounce.fire(self.clock.monotonic())
        live = [slot.handle.pid for slot in self._slots.values() if slot.handle is not None]
        self._sweeper.start_if_needed(live)

    def _heartbeat(self) -> None:
        interval = self.options.hooks.heartbeat_interval
        if interval is None or self._stopped:
            return
        self.options.hooks.heartbeat()
        # Scheduled from now, not from the missed deadline: after a stall (SIGSTOP) one
        # ping is enough, a burst of catch-up pings would say nothing more.
        self._heartbeat_alarm.set(self.clock.monotonic() + interval)

    # -- converging on a configuration ----------------------------------------------------------

    def _apply(self, config: AgentConfig) -> None:
        self._config = config
        self._plan = plan_proxies(
            config,
            self.options.api_address,
            self._allocations.current,
            self._port_is_free,
            registered=self.options.registered_services(),
        )
        unsaved = self._save_allocations()
        self._policy = StartPolicy(self._privileges, config.allow_managed_root)
        refused = {
            proxy_id: self._policy.refusal(planned) for proxy_id, planned in self._plan.proxies.items()
        }
        say_refused_as_root(refused.values())
        if not self._said_who_proxies_run_as:
            where = self.options.data_dir.root if self.options.data_dir is not None else "data_dir"
            self._said_who_proxies_run_as = say_what_shared_proxies_can_read(
                self._plan.proxies.values(), self._privileges.user, where
            )
        for proxy_id, planned in self._plan.proxies.items():
            self._slot(proxy_id).planned = planned
        # Publish the plan before starting anything: a new proxy asks the API for its
        # config within milliseconds, and must never be told that its ID is unknown.
        self._publish()
        now = self.clock.monotonic()
        for proxy_id, planned in self._plan.proxies.items():
            slot = self._slots[proxy_id]
            reason = planned.problem or refused.get(proxy_id) or unsaved.get(proxy_id)
            self._drive(slot, slot.machine.want(now, reason))
            changed = slot.running_spec_hash not in (None, planned.spec_hash)
            if changed and (slot.machine.alive or slot.machine.state is State.BACKOFF):
                log.info("proxy %s: its command, token or environment changed; restarting it", proxy_id)
                self._drive(slot, slot.machine.replace(now))
        for proxy_id, slot in list(self._slots.items()):
            if proxy_id in self._plan.proxies:
                continue
            if slot.machine.alive and slot.machine.state is not State.STOPPING:
                log.info("proxy %s is no longer configured; stopping it", proxy_id)
            # Every slot without a plan is unwanted -- an adopted process of a service
            # removed while the agent was down included, which nothing else would stop.
            self._drive(slot, slot.machine.unwant(now))
        self._mark_dirty()

    def _save_allocations(self) -> dict[str, str]:
        """Save the planned tokens and ports; returns the proxies that must wait (and why)
        because theirs are new and could not be saved."""
        error = self._allocations.save(self._plan.allocations)
        if error is None:
            return {}
        # Disk full, say: proxies whose token or port is new wait (blocked, with the
        # reason) until it can be saved; everything already running carries on.
        retry = self.options.storage_retry
        log.error("cannot save proxy tokens and ports: %s; trying again in %.0fs", error, retry)
        self._storage_alarm.set(self.clock.monotonic() + retry)
        problem = f"its token and port cannot be saved: {error}; retrying every {retry:g}s"
        current = self._allocations.current
        return {
            proxy_id: problem
            for proxy_id, allocation in self._plan.allocations.items()
            if current.get(proxy_id) != allocation
        }

    def _slot(self, proxy_id: str) -> Slot:
        slot = self._slots.get(proxy_id)
        if slot is None:
            machine = ProxyMachine(self.options.policy, self.options.rng.random)
            seed = self._restarts_seed.get(proxy_id)
            if seed is not None:  # counters never go backwards across agent restarts
                machine.restarts = seed.restarts
                machine.generation = seed.generation
                machine.failures = seed.failures
            slot = Slot(proxy_id, machine)
            slot.alarm = Alarm(self.loop, lambda: self._tick(proxy_id))
            self._slots[proxy_id] = slot
        return slot

    # -- carrying out actions ---------------------------------------------------------------------

    def _tick(self, proxy_id: str) -> None:
        slot = self._slots.get(proxy_id)
        if slot is not None:
            self._drive(slot, slot.machine.tick(self.clock.monotonic()))
            self._mark_dirty()

    def _drive(self, slot: Slot, actions: list[Action]) -> None:
        """Carry out a machine's actions, then put its next deadline on the loop."""
        self._runner.carry_out(slot, actions)
        assert slot.alarm is not None
        slot.alarm.set(slot.machine.next_deadline())
        self._mark_dirty()

    def _launch(self, slot: Slot) -> LaunchSpec:
        planned = slot.planned
        assert planned is not None, "a proxy is only started with a plan"
        self._count(starts=self._totals.starts + 1)
        return launch_for(
            planned,
            self.options.node_id,
            self.options.ambient_env,
            self.options.data_dir,
            self._config.log_level if self._config is not None else "INFO",
            drop_capabilities=self._policy.drops_capabilities(planned),
        )

    def _exited(self, slot: Slot, handle: ProcessHandle, status: ExitStatus) -> None:
        self._sweeper.exited(slot.proxy_id)
        # Swept once the exits stop: reading /proc competes with the restarts for the CPU.
        self._sweep_alarm.set(self._sweep_debounce.poke(self.clock.monotonic()))
        expected = slot.machine.state is State.STOPPING
        totals = self._totals
        self._count(exits=totals.exits + 1, unexpected_exits=totals.unexpected_exits + (not expected))
        level = logging.INFO if expected else logging.WARNING
        log.log(level, "proxy %s: pid %d %s", slot.proxy_id, handle.pid, status.describe())
        self._drive(slot, slot.machine.exited(handle.generation, self.clock.monotonic(), status.describe()))

    def _count(self, **changes: int) -> None:
        self._totals = replace(self._totals, **changes)

    # -- persistence and publishing -----------------------------------------------------------

    def _mark_dirty(self) -> None:
        """Write the record and publish the view once, after everything this pass does."""
        if not self._flush_scheduled and not self.loop.is_closed():
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for proxy_id, slot in list(self._slots.items()):
            if slot.machine.finished:
                assert slot.alarm is not None
                slot.alarm.cancel()
                del self._slots[proxy_id]
        self._records.sync(self._current_records())
        self._publish()
        self._maybe_finish_shutdown()

    def _current_records(self) -> dict[str, ProxyRecord]:
        return {proxy_id: record_of(slot) for proxy_id, slot in self._slots.items()}

    def _maybe_finish_shutdown(self) -> None:
        shutdown = self._shutdown
        if shutdown is None or self._stopped:
            return
        if shutdown.stop_proxies and any(slot.machine.alive for slot in self._slots.values()):
            return
        if shutdown.stop_proxies:
            self._sweeper.kill_all_marked()
        self._stopped = True
        self._heartbeat_alarm.cancel()
        for reply in self._shutdown_replies:
            reply.set_result(None)
        self.loop.stop()

    def _publish(self) -> None:
        config = self._config
        if config is None:
            return
        self._view_version += 1
        statuses = {
            proxy_id: status_of(slot, self.options.data_dir) for proxy_id, slot in sorted(self._slots.items())
        }
        self.board.publish(
            AgentView(
                config=config,
                node_id=self.options.node_id,
                api_address=self.options.api_address,
                proxies=dict(self._plan.proxies),
                statuses=statuses,
                reload_error=self._reload_error,
                version=self._view_version,
                totals=self._totals,
            )
        )
