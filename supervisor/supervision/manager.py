"""The supervision loop: the one thread that owns every proxy process.

It blocks in ``epoll`` on a wake pipe and on one pidfd per process (own children and
adopted ones alike), so a proxy's exit is seen within milliseconds and an idle agent
uses no CPU: there is no polling timer (the one periodic wake-up is the systemd watchdog
ping, and only when systemd asks for it). Everything else -- signal handlers, the config
watcher, the HTTP API -- talks to it only by ``post``-ing events. Decisions come from
``ProxyMachine``; this module only carries out their actions and keeps the record.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import selectors
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from supervisor.config.model import AgentConfig, ServiceDef
from supervisor.errors import ConfigError, DataDirError, SpawnError, SupervisorError
from supervisor.process.marker import MarkedProcess, find_marked, kill_marked
from supervisor.process.spawn import PosixSpawner, Spawner
from supervisor.state.datadir import Allocation, DataDir, ProxyRecord
from supervisor.state.guard import DataDirGuard, Repair
from supervisor.supervision.adoption import adopt_survivors
from supervisor.supervision.desired import Plan, plan_proxies
from supervisor.supervision.events import (
    Clock,
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
from supervisor.supervision.machine import (
    Action,
    KillGroup,
    ProxyMachine,
    RestartPolicy,
    Signal,
    Spawn,
    State,
)
from supervisor.supervision.slot import Slot, record_of, status_of
from supervisor.supervision.view import AgentView, ProxyStatus, ViewBoard

log = logging.getLogger("supervisor.manager")

# After a failed write to data_dir (disk full, directory gone), how long until the next try.
STORAGE_RETRY = 5.0

ROOT_BLOCKED = (
    "running as root: managed proxies are not started as root; run the agent as an "
    "unprivileged user, or set connect.proxy.allow_managed_root = true"
)


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
    scan_marked: Callable[[str], list[MarkedProcess]] = find_marked
    debounce: Debounce = field(default_factory=Debounce)
    registered_services: Callable[[], Sequence[ServiceDef]] = lambda: ()
    hooks: LoopHooks = field(default_factory=LoopHooks)
    guard: DataDirGuard | None = None
    storage_retry: float = STORAGE_RETRY


class Supervisor:
    """Owns every proxy process. ``start`` then ``run`` on one thread; ``post`` from any."""

    def __init__(self, options: SupervisorOptions, board: ViewBoard) -> None:
        from supervisor.supervision.ports import port_is_free

        self.options = options
        self.board = board
        self.clock = options.clock
        self._port_is_free = options.port_is_free or port_is_free
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._slots: dict[str, Slot] = {}
        self._config: AgentConfig | None = None
        self._plan = Plan()
        self._allocations: dict[str, Allocation] = {}
        self._allocations_on_disk = True  # false after a rebuild of data_dir failed to write them
        self._restarts_seed: dict[str, ProxyRecord] = {}
        self._written_records: dict[str, ProxyRecord] | None = None
        self._sweep_needed: set[str] = set()
        self._sweep_thread: threading.Thread | None = None
        self._closed = False
        self._reload_error: str | None = None
        self._view_version = 0
        self._shutdown: ShutdownRequested | None = None
        self._stopped = False
        self._dirty = True
        interval = options.hooks.heartbeat_interval
        self._next_heartbeat = self.clock.monotonic() if interval else None
        self._storage_retry_at: float | None = None  # a data_dir write failed; try again then
        self._data_dir_debounce = Debounce()

    # -- thread-safe entry point -------------------------------------------------------------

    def post(self, event: Event) -> None:
        """Hand an event to the loop (safe from any thread and from signal handlers)."""
        self._events.put(event)
        # No lock here: a signal handler may interrupt close() on the same thread. The
        # flag is set before the fds close; a post racing a close may still hit a closed
        # fd (EBADF), which is ignored, but never writes into a reused fd number, because
        # close() waits for the scan thread -- the only other late poster.
        if self._closed:
            return
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway
        except OSError:
            if not self._closed:
                raise

    @property
    def wake_fd(self) -> int:
        """Write end of the wake pipe, for ``signal.set_wakeup_fd``."""
        return self._wake_write

    # -- start-up -----------------------------------------------------------------------------

    def start(self, config: AgentConfig) -> None:
        """Adopt survivors of an earlier run, then converge on ``config``."""
        store = self.options.data_dir
        if store is not None:
            allocations, problem = store.load_allocations()
            if problem:
                log.error("%s; proxies get new tokens and ports", problem)
            self._allocations = allocations
            loaded = store.load_records()
            if loaded.problem:
                log.error("%s; running proxies are found by their marker instead", loaded.problem)
            result = adopt_survivors(
                loaded.records, self.options.node_id, self.options.scan_marked, kill_marked
            )
            for description in result.killed:
                log.warning("killed %s", description)
            self._restarts_seed = result.records
            now = self.clock.monotonic()
            for proxy_id, adopted in result.adopted.items():
                slot = self._slot(proxy_id)
                slot.handle = adopted.handle
                slot.running_spec_hash = adopted.spec_hash
                slot.adopted = True
                slot.started_wall = self.clock.wall() - adopted.age
                slot.machine.adopted(adopted.handle.generation, now, adopted.age, adopted.restarts)
                self._selector.register(adopted.handle.pidfd, selectors.EVENT_READ, proxy_id)
                try:  # pid files are for humans; one left damaged or missing is put right
                    store.write_pid_file(proxy_id, adopted.handle.pid)
                except (DataDirError, OSError) as exc:
                    log.warning("proxy %s: cannot write pid file: %s", proxy_id, exc)
                log.info(
                    "adopted proxy %s (pid %d, up %.0fs, found by %s)",
                    proxy_id,
                    adopted.handle.pid,
                    adopted.age,
                    adopted.found_by,
                )
        self._apply(config)
        self._flush()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Run until a shutdown has been carried out."""
        while not self._stopped:
            self.step()

    def step(self, max_wait: float | None = None) -> None:
        """One iteration: wait for an event, a process exit or a deadline, then act."""
        timeout = self._timeout()
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._drain_wake_pipe()
            else:
                self._on_exit_ready(key.data)
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self._handle(event)
        now = self.clock.monotonic()
        self._maybe_heartbeat(now)
        if self._data_dir_debounce.fire(now):
            self._check_data_dir()
        if self._storage_retry_at is not None and now >= self._storage_retry_at:
            self._storage_retry_at = None
            self._check_data_dir()
            if self._config is not None and self._shutdown is None:
                self._apply(self._config)
        if self.options.debounce.fire(now):
            self._reload("config files changed")
        for slot in list(self._slots.values()):
            before = slot.machine.state
            actions = slot.machine.tick(now)
            if actions or slot.machine.state is not before:
                self._execute(slot, actions)
        self._flush()
        self._maybe_finish_shutdown()

    def close(self) -> None:
        """Release fds; proxies keep running (they are re-adopted by the next agent)."""
        if self._sweep_thread is not None:
            self._sweep_thread.join(timeout=10)
        self._closed = True
        for slot in self._slots.values():
            if slot.handle is not None:
                slot.handle.close()
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- events -------------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, SweepScanned):
            self._sweep_thread = None
            self._kill_leftovers(event)
            return
        if self._shutdown is not None and not isinstance(event, ShutdownRequested):
            if isinstance(event, ReloadRequested) and event.reply is not None:
                event.reply.set_exception(SupervisorError("the agent is shutting down"))
            return
        if isinstance(event, DataDirChanged):
            # Checked once the removals stop: repairing in the middle of an `rm -rf`
            # would only be undone (and make that rm fail).
            self._data_dir_debounce.poke(self.clock.monotonic())
        elif isinstance(event, FilesChanged):
            self.options.debounce.poke(self.clock.monotonic())
        elif isinstance(event, ServicesChanged):
            if self._config is not None:
                self._apply(self._config)
        elif isinstance(event, ReloadRequested):
            try:
                self._reload(event.reason)
            except BaseException as exc:  # the caller must hear about any failure
                if event.reply is not None:
                    event.reply.set_exception(exc)
                raise
            if event.reply is not None:
                if self._reload_error:
                    event.reply.set_exception(ConfigError.single("", "", self._reload_error))
                else:
                    event.reply.set_result(None)
        elif isinstance(event, RestartRequested):
            self._restart(event)
        elif isinstance(event, ShutdownRequested):
            self.options.hooks.stopping()
            log.info(
                "shutting down (%s)%s",
                event.reason,
                ", stopping all proxies" if event.stop_proxies else "",
            )
            self._shutdown = event
            if event.stop_proxies:
                now = self.clock.monotonic()
                for slot in self._slots.values():
                    self._execute(slot, slot.machine.unwant(now))

    def _reload(self, reason: str) -> None:
        self.options.hooks.reloading()
        try:
            config = self.options.load_config()
        except ConfigError as exc:
            self._reload_error = str(exc)
            self._dirty = True
            log.error(
                "configuration reload (%s) failed; keeping the running configuration:\n%s",
                reason,
                exc,
            )
            return
        finally:
            self.options.hooks.reloaded()
        self._reload_error = None
        log.info("configuration reloaded (%s)", reason)
        self._apply(config)

    def _restart(self, event: RestartRequested) -> None:
        slot = self._slots.get(event.proxy_id)
        if slot is None or not slot.machine.wanted:
            known = ", ".join(sorted(p for p, s in self._slots.items() if s.machine.wanted)) or "none"
            event.reply.set_exception(
                SupervisorError(f"no managed proxy {event.proxy_id!r} (known proxies: {known})")
            )
            return
        generation = slot.machine.generation
        log.info("proxy %s: restart requested by an operator", event.proxy_id)
        self._execute(slot, slot.machine.replace(self.clock.monotonic()))
        event.reply.set_result(generation)

    def _check_data_dir(self) -> None:
        """Put data_dir back if it was deleted under us (see supervisor.state.guard)."""
        guard = self.options.guard
        if guard is None:
            return
        running = {proxy_id: slot.handle.pid for proxy_id, slot in self._slots.items() if slot.handle}
        outcome = guard.repair(self._allocations, running)
        if outcome is Repair.INTACT:
            return
        if outcome is Repair.TAKEN_OVER:
            self._handle(ShutdownRequested(stop_proxies=False, reason="data_dir taken over"))
            return
        if outcome is Repair.RETRY:
            # The retry re-applies the config, which saves the allocations again.
            self._allocations_on_disk = False
            self._storage_retry_at = self.clock.monotonic() + self.options.storage_retry
            return
        self._written_records = None  # rewrite the record on this flush
        self._dirty = True
        self.options.hooks.data_dir_restored()

    def _maybe_heartbeat(self, now: float) -> None:
        interval = self.options.hooks.heartbeat_interval
        if self._next_heartbeat is None or interval is None or now < self._next_heartbeat:
            return
        self.options.hooks.heartbeat()
        # Schedule from now, not from the missed deadline: after a stall (SIGSTOP) one
        # ping is enough, a burst of catch-up pings would say nothing more.
        self._next_heartbeat = now + interval

    def _maybe_finish_shutdown(self) -> None:
        if self._shutdown is None or self._stopped:
            return
        if self._shutdown.stop_proxies and any(slot.machine.alive for slot in self._slots.values()):
            return
        if self._shutdown.stop_proxies:
            # Every proxy is gone; anything still carrying our marker is a leftover (a
            # double-forked daemon) that no later agent would know to clean up.
            for process in self.options.scan_marked(self.options.node_id):
                if kill_marked(process):
                    log.warning(
                        "killed leftover process %d (%s) of proxy %s",
                        process.pid,
                        process.stat.comm,
                        process.marker.proxy_id,
                    )
        self._stopped = True
        if self._shutdown.reply is not None:
            self._shutdown.reply.set_result(None)

    # -- converging on a configuration ----------------------------------------------------------

    def _apply(self, config: AgentConfig) -> None:
        self._config = config
        self._plan = plan_proxies(
            config,
            self.options.api_address,
            self._allocations,
            self._port_is_free,
            registered=self.options.registered_services(),
        )
        unsaved: dict[str, str] = {}
        if self._plan.allocations != self._allocations or not self._allocations_on_disk:
            # Written before any proxy that uses a new token starts: a crash right after
            # must not hand the next agent different tokens than the running proxies have.
            try:
                if self.options.data_dir is not None:
                    self.options.data_dir.save_allocations(self._plan.allocations)
            except DataDirError as exc:
                # Disk full, say: proxies whose token or port is new wait (blocked, with the
                # reason) until it can be saved; everything already running carries on.
                retry = self.options.storage_retry
                problem = f"its token and port cannot be saved: {exc}; retrying every {retry:g}s"
                unsaved = {
                    proxy_id: problem
                    for proxy_id, allocation in self._plan.allocations.items()
                    if self._allocations.get(proxy_id) != allocation
                }
                log.error(
                    "cannot save proxy tokens and ports: %s; trying again in %.0fs",
                    exc,
                    self.options.storage_retry,
                )
                self._storage_retry_at = self.clock.monotonic() + self.options.storage_retry
            else:
                self._allocations = dict(self._plan.allocations)
                self._allocations_on_disk = True
        blocked = ROOT_BLOCKED if self.options.is_root and not config.allow_managed_root else None
        if blocked and self._plan.proxies:
            log.error(
                "agent runs as root and connect.proxy.allow_managed_root is false: %d managed "
                "prox%s will NOT be started. Run the agent as an unprivileged user, or set "
                "connect.proxy.allow_managed_root = true to allow proxies to run as root.",
                len(self._plan.proxies),
                "y" if len(self._plan.proxies) == 1 else "ies",
            )
        for proxy_id, planned in self._plan.proxies.items():
            self._slot(proxy_id).planned = planned
        # Publish the plan before starting anything: a new proxy asks the API for its
        # config within milliseconds, and must never be told that its ID is unknown.
        self._publish()
        now = self.clock.monotonic()
        for proxy_id, planned in self._plan.proxies.items():
            slot = self._slots[proxy_id]
            reason = blocked or planned.problem or unsaved.get(proxy_id)
            self._execute(slot, slot.machine.want(now, reason))
            changed = slot.running_spec_hash not in (None, planned.spec_hash)
            if changed and (slot.machine.alive or slot.machine.state is State.BACKOFF):
                log.info("proxy %s: its command, token or environment changed; restarting it", proxy_id)
                self._execute(slot, slot.machine.replace(now))
        for proxy_id, slot in list(self._slots.items()):
            if proxy_id not in self._plan.proxies and slot.machine.wanted:
                log.info("proxy %s is no longer configured; stopping it", proxy_id)
                self._execute(slot, slot.machine.unwant(now))
            elif proxy_id not in self._plan.proxies and not slot.machine.alive:
                self._execute(slot, slot.machine.unwant(now))
        self._dirty = True

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
            self._slots[proxy_id] = slot
        return slot

    # -- carrying out actions ---------------------------------------------------------------------

    def _execute(self, slot: Slot, actions: list[Action]) -> None:
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
                        self.options.policy.stop_timeout,
                    )
                    slot.handle.kill_group(signal.SIGKILL)
        self._dirty = True

    def _spawn(self, slot: Slot, generation: int) -> list[Action]:
        planned = slot.planned
        assert planned is not None, "a proxy is only started with a plan"
        log_level = self._config.log_level if self._config is not None else "INFO"
        launch = launch_for(
            planned, self.options.node_id, self.options.ambient_env, self.options.data_dir, log_level
        )
        now = self.clock.monotonic()
        try:
            handle = self.options.spawner.spawn(launch, generation)
        except SpawnError as exc:
            log.error("proxy %s: %s", slot.proxy_id, exc)
            return slot.machine.spawn_failed(generation, now, str(exc))
        slot.handle = handle
        slot.adopted = False
        slot.running_spec_hash = planned.spec_hash
        slot.started_wall = self.clock.wall()
        self._selector.register(handle.pidfd, selectors.EVENT_READ, slot.proxy_id)
        if self.options.data_dir is not None:
            try:
                self.options.data_dir.write_pid_file(slot.proxy_id, handle.pid)
            except OSError as exc:
                log.warning("proxy %s: cannot write pid file: %s", slot.proxy_id, exc)
        log.info(
            "proxy %s: started pid %d (generation %d): %s",
            slot.proxy_id,
            handle.pid,
            generation,
            " ".join(launch.argv),
        )
        return []

    def _on_exit_ready(self, proxy_id: str) -> None:
        slot = self._slots.get(proxy_id)
        if slot is None or slot.handle is None:
            return
        handle = slot.handle
        if not handle.has_exited():
            return
        self._selector.unregister(handle.pidfd)
        status = handle.reap()
        handle.close()
        slot.handle = None
        self._sweep_needed.add(proxy_id)
        now = self.clock.monotonic()
        reason = status.describe()
        level = logging.INFO if slot.machine.state is State.STOPPING else logging.WARNING
        log.log(level, "proxy %s: pid %d %s", proxy_id, handle.pid, reason)
        self._execute(slot, slot.machine.exited(handle.generation, now, reason))
        if slot.handle is None and self.options.data_dir is not None:
            self.options.data_dir.remove_pid_file(proxy_id)

    # -- persistence and publishing -----------------------------------------------------------

    def _flush(self) -> None:
        if self._sweep_needed and self._sweep_thread is None:
            self._start_sweep(frozenset(self._sweep_needed))
            self._sweep_needed = set()
        for proxy_id, slot in list(self._slots.items()):
            if slot.machine.finished:
                del self._slots[proxy_id]
                self._dirty = True
        if not self._dirty:
            return
        self._dirty = False
        self._write_records()
        self._publish()

    def _start_sweep(self, proxy_ids: frozenset[str]) -> None:
        """Look for leftovers of exited proxies (a double-forked daemon, say) off the loop:
        reading every process's environment takes milliseconds that must not delay the
        handling of the next exit."""

        def scan() -> None:
            try:
                found = tuple(self.options.scan_marked(self.options.node_id))
            except OSError as exc:
                log.warning("cannot scan /proc for leftover proxy processes: %s", exc)
                found = ()
            self.post(SweepScanned(proxy_ids, found))

        self._sweep_thread = threading.Thread(target=scan, name="sweep-scan", daemon=True)
        self._sweep_thread.start()

    def _kill_leftovers(self, scanned: SweepScanned) -> None:
        """Kill marked processes of these proxies outside their current process's session.
        Decided here, on the loop, against the sessions that exist *now*; ``kill_marked``
        re-checks each process's identity through a pidfd before signalling it."""
        current_sessions = {slot.handle.pid for slot in self._slots.values() if slot.handle is not None}
        for process in scanned.found:
            if process.marker.proxy_id in scanned.proxy_ids and process.stat.session not in current_sessions:
                if kill_marked(process):
                    log.warning(
                        "proxy %s: killed leftover process %d (%s) of an exited generation",
                        process.marker.proxy_id,
                        process.pid,
                        process.stat.comm,
                    )

    def _records(self) -> dict[str, ProxyRecord]:
        return {proxy_id: record_of(slot) for proxy_id, slot in self._slots.items()}

    def _write_records(self) -> None:
        if self.options.data_dir is None:
            return
        records = self._records()
        if records == self._written_records:
            return
        try:
            self.options.data_dir.save_records(records)
        except SupervisorError as exc:
            # Not fatal: proxies keep running and carry their marker, so the next agent
            # still finds them; say it loudly and retry on the next change.
            log.error("cannot save the supervision record: %s", exc)
            return
        self._written_records = records

    def _publish(self) -> None:
        config = self._config
        if config is None:
            return
        self._view_version += 1
        statuses = {proxy_id: self._status(slot) for proxy_id, slot in sorted(self._slots.items())}
        self.board.publish(
            AgentView(
                config=config,
                node_id=self.options.node_id,
                api_address=self.options.api_address,
                proxies=dict(self._plan.proxies),
                statuses=statuses,
                reload_error=self._reload_error,
                version=self._view_version,
            )
        )

    def _status(self, slot: Slot) -> ProxyStatus:
        return status_of(slot, self.options.data_dir)

    # -- helpers --------------------------------------------------------------------------------

    def _timeout(self) -> float | None:
        deadlines = [d for slot in self._slots.values() if (d := slot.machine.next_deadline()) is not None]
        if self.options.debounce.due is not None:
            deadlines.append(self.options.debounce.due)
        if self._next_heartbeat is not None:
            deadlines.append(self._next_heartbeat)
        if self._storage_retry_at is not None:
            deadlines.append(self._storage_retry_at)
        if self._data_dir_debounce.due is not None:
            deadlines.append(self._data_dir_debounce.due)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock.monotonic())

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def statuses(self) -> Mapping[str, Any]:
        """For tests: the current status of each proxy."""
        return {proxy_id: self._status(slot) for proxy_id, slot in self._slots.items()}
