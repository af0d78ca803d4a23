"""``proxy-supervisor agent``: wire config, data_dir, the HTTP API, the config watcher and
the supervision loop together, and run until told to stop.

Start-up order matters: the configuration is validated first (nothing starts on a bad
config), then data_dir is locked (one agent per data_dir), the API address is bound (a
taken port stops the agent before any proxy is touched), survivors of an earlier run
are adopted, and only then are missing proxies started.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.api.catalog_shapes import instance_json
from supervisor.api.server import ApiServer, bind_listener
from supervisor.catalog.index import Index
from supervisor.catalog.registry import Registry
from supervisor.cluster import Cluster
from supervisor.config import load_config
from supervisor.config.model import AgentConfig, ServiceDef
from supervisor.config.registrations import registration_builder
from supervisor.config.sidecars import SidecarPorts
from supervisor.connect.ca import validate_ca_config
from supervisor.controlplane import ControlPlane
from supervisor.logsetup import configure_logging, set_level
from supervisor.net import join_host_port
from supervisor.ops.daemon import Readiness
from supervisor.ops.proxylogs import ProxyLogRotator, RotationPolicy
from supervisor.ops.sdnotify import SdNotifier
from supervisor.resources import raise_open_file_limit
from supervisor.state.datadir import DataDir
from supervisor.state.guard import DataDirGuard, DataDirWatcher
from supervisor.state.lock import AgentLock
from supervisor.supervision.desired import address_for_proxies
from supervisor.supervision.events import (
    DataDirChanged,
    FilesChanged,
    LoopHooks,
    ReloadRequested,
    ServicesChanged,
    ShutdownRequested,
)
from supervisor.supervision.manager import Supervisor, SupervisorOptions
from supervisor.supervision.ports import ephemeral_overlap
from supervisor.supervision.view import AgentView, ViewBoard
from supervisor.watch import ConfigWatcher

log = logging.getLogger("supervisor.agent")

# Settings read once at start: a reload cannot move the agent, so changing them is only noted.
_RESTART_ONLY = (
    "data_dir",
    "http_host",
    "http_port",
    "node_name",
    "datacenter",
    "log_file",
    "log_json",
    "log_rotate_bytes",
    "log_rotate_max_files",
    "cluster",
)


@dataclass(frozen=True)
class AgentOptions:
    config_files: tuple[str, ...] = ()
    config_dirs: tuple[str, ...] = ()
    flags: Mapping[str, Any] = field(default_factory=dict)
    dev: bool = False


class ServiceManagerHooks(LoopHooks):
    """Tells systemd (``Type=notify``) what the supervision loop is doing."""

    def __init__(self, notifier: SdNotifier | None, on_data_dir_restored: Callable[[], None]) -> None:
        self.notifier = notifier
        self.heartbeat_interval = notifier.watchdog_interval if notifier else None
        self.on_data_dir_restored = on_data_dir_restored

    def reloading(self) -> None:
        if self.notifier:
            self.notifier.reloading()

    def reloaded(self) -> None:
        if self.notifier:
            self.notifier.ready()

    def stopping(self) -> None:
        if self.notifier:
            self.notifier.stopping()

    def heartbeat(self) -> None:
        if self.notifier:
            self.notifier.watchdog()

    def data_dir_restored(self) -> None:
        self.on_data_dir_restored()


def status_line(view: AgentView) -> str:
    """systemd's STATUS=: what ``systemctl status`` shows under the unit."""
    statuses = view.statuses.values()
    if not statuses:
        text = "no managed proxies"
    else:
        counts = Counter(status.state for status in statuses)
        parts = ", ".join(f"{counts[state]} {state}" for state in sorted(counts))
        text = f"{len(statuses)} prox{'y' if len(statuses) == 1 else 'ies'}: {parts}"
    if view.reload_error:
        text += "; last reload failed (running config kept, see the log)"
    return text


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self._current_services: Callable[[], tuple[ServiceDef, ...]] = tuple
        self.config = self.load()
        self.lock: AgentLock | None = None
        self.data_dir: DataDir | None = None
        self.notifier: SdNotifier | None = None  # opened in run(): -daemon closes fds when it forks
        self.readiness: Readiness | None = None  # set in -daemon mode: the launcher waits on it
        self.rotator: ProxyLogRotator | None = None
        self.api: ApiServer | None = None
        self.data_watcher: DataDirWatcher | None = None

    def load(self) -> AgentConfig:
        options = self.options
        # A reload keeps the ports sidecars have now (Consul 1.5's rule).
        config = load_config(
            options.config_files,
            options.config_dirs,
            options.flags,
            dev=options.dev,
            sidecar_ports=SidecarPorts.of(self._current_services()),
        )
        validate_ca_config(config.ca)  # a bad operator CA fails the load (or the reload) as a whole
        return config

    def run(self) -> int:
        try:
            return self._run()
        except BaseException as exc:
            if self.readiness is not None:
                self.readiness.failed(str(exc) or type(exc).__name__)
            raise

    def _run(self) -> int:
        raise_open_file_limit()
        limit_malloc_arenas()
        config = self.config
        _start_logging(config)
        # Every resource is stopped on every path out, in reverse order of starting.
        with contextlib.ExitStack() as resources:
            self.notifier = SdNotifier.from_environment(unset=True)
            if self.notifier is not None:
                resources.callback(self.notifier.close)
            node_id = self._prepare_data_dir(config)
            if self.lock is not None:
                resources.callback(self.lock.release)
            sock = bind_listener(config.http_host, config.http_port)
            resources.callback(sock.close)
            host, port = sock.getsockname()[:2]
            api_address = address_for_proxies(config.http_host, int(port))
            registry = Registry(os.path.join(self.data_dir.root, "services") if self.data_dir else None)
            registry.load(registration_builder(config))
            if registry.services and any(service.sidecar_for for service in config.services):
                # The first read could not know the ports the kept registrations hold.
                self._current_services = lambda: registry.services
                config = self.config = self.load()
            board = ViewBoard(AgentView(config=config, node_id=node_id, api_address=api_address))
            guard = None
            if self.data_dir is not None and self.lock is not None:
                guard = DataDirGuard(self.data_dir, self.lock, node_id)
            self._current_services = lambda: (*board.current.config.services, *registry.services)
            supervisor = Supervisor(
                SupervisorOptions(
                    data_dir=self.data_dir,
                    node_id=node_id,
                    api_address=api_address,
                    load_config=self.load,
                    registered_services=lambda: registry.services,
                    hooks=ServiceManagerHooks(self.notifier, self._data_dir_restored),
                    guard=guard,
                ),
                board,
            )
            resources.callback(supervisor.close)
            index = Index()
            cluster = self._cluster(config, node_id, index)
            plane = ControlPlane(
                self.data_dir, registry, index, lambda: supervisor.post(ServicesChanged()), cluster=cluster
            )
            plane.load_stores(config)
            board.subscribe(self._on_view_change)
            self.api = ApiServer(sock, board, supervisor, plane)
            self.api.start()
            resources.callback(self.api.stop)
            if cluster is not None:
                # Stopped before the API (callbacks run last-in first): its deliveries go to the API loop.
                carried = (list(plane.intentions.intentions.values()), list(plane.queries.queries.values()))
                cluster.start(self.api.call_soon, plane.cluster_changed, carried)
                resources.callback(cluster.stop)
            log.info("HTTP API listening on %s", join_host_port(str(host), int(port)))
            self._start_watchers(resources, supervisor, config)
            self._install_signal_handlers(supervisor, stop_proxies=config.data_dir is None)
            supervisor.start(config)
            self._announce_ready(board.current)
            _log_started(board.current, config)
            supervisor.run()
        log.info("agent stopped")
        return 0

    def _cluster(self, config: AgentConfig, node_id: str, index: Index) -> Cluster | None:
        if not config.cluster.enabled:
            return None
        data_dir = self.data_dir.root if self.data_dir is not None else None
        return Cluster(config, node_id, index, instance_json, data_dir)

    def _start_watchers(
        self, resources: contextlib.ExitStack, supervisor: Supervisor, config: AgentConfig
    ) -> None:
        """Config and data_dir watchers, and proxy log rotation; all only post events."""
        watcher = ConfigWatcher(
            self.options.config_dirs,
            self.options.config_files,
            lambda path: supervisor.post(FilesChanged(path)),
        )
        watcher.start()
        resources.callback(watcher.stop)
        if self.data_dir is None:
            return
        self.data_watcher = DataDirWatcher(self.data_dir, lambda path: supervisor.post(DataDirChanged(path)))
        self.data_watcher.start()
        resources.callback(self.data_watcher.stop)
        self.rotator = ProxyLogRotator(self.data_dir.logs_dir, _rotation_policy(config))
        self.rotator.start()
        resources.callback(self.rotator.stop)

    def _prepare_data_dir(self, config: AgentConfig) -> str:
        if config.data_dir is None:
            return config.node_id or str(uuid.uuid4())
        self.data_dir = DataDir(config.data_dir)
        removed = self.data_dir.prepare()
        self.lock = self.data_dir.lock()
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted write", len(removed))
        return self.data_dir.node_id()

    def _install_signal_handlers(self, supervisor: Supervisor, *, stop_proxies: bool) -> None:
        """Signals only post events: the loop's own signal handling (a wake-up fd) runs
        them on the supervision loop, never in the middle of a decision."""
        loop = supervisor.loop
        loop.add_signal_handler(signal.SIGHUP, supervisor.post, ReloadRequested("SIGHUP"))
        for signum in (signal.SIGTERM, signal.SIGINT):
            shutdown = ShutdownRequested(stop_proxies=stop_proxies, reason=signal.Signals(signum).name)
            loop.add_signal_handler(signum, supervisor.post, shutdown)

    def _data_dir_restored(self) -> None:
        """On the supervision loop, after it rebuilt data_dir: the control plane saves its
        stores on its own loop, and the watcher follows the re-created directories."""
        if self.api is not None:
            self.api.call_soon(self.api.plane.save_all)
        if self.data_watcher is not None:
            self.data_watcher.restart()

    def _announce_ready(self, view: AgentView) -> None:
        if self.notifier is not None:
            self.notifier.ready(status_line(view))
        if self.readiness is not None:
            self.readiness.ready()

    def _on_view_change(self, view: AgentView) -> None:
        if self.notifier is not None:
            self.notifier.status(status_line(view))
        if view.config is self.config:
            return
        previous, self.config = self.config, view.config
        if previous.log_level != view.config.log_level:
            set_level(view.config.log_level)
        if self.rotator is not None:
            self.rotator.configure(_rotation_policy(view.config))
        for name in _RESTART_ONLY:
            if getattr(previous, name) != getattr(view.config, name):
                log.warning("config: %s changed; restart the agent for it to take effect", name)


def _rotation_policy(config: AgentConfig) -> RotationPolicy:
    return RotationPolicy(config.proxy_log_max_bytes, config.proxy_log_max_files)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates an arena of its own (up to 8 per core) and
    returns little of it: a long-running agent's RSS crept up that way. Two are plenty for
    an agent whose threads mostly wait. (Before any thread starts; harmless elsewhere.)"""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-8), ctypes.c_int(arenas))  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to limit


def _start_logging(config: AgentConfig) -> None:
    configure_logging(
        config.log_level,
        json_lines=config.log_json,
        log_file=config.log_file,
        rotate_bytes=config.log_rotate_bytes,
        rotate_max_files=config.log_rotate_max_files,
    )
    for notice in config.notices:
        log.info("config: %s", notice)
    overlap = ephemeral_overlap(config.proxy_min_port, config.proxy_max_port)
    if overlap:
        log.warning("config: %s", overlap)


def _log_started(view: AgentView, config: AgentConfig) -> None:
    statuses = view.statuses.values()
    log.info(
        "agent started: node %s, %d managed prox%s (%d adopted), data_dir %s",
        config.node_name,
        len(statuses),
        "y" if len(statuses) == 1 else "ies",
        sum(1 for status in statuses if status.adopted),
        config.data_dir or "none (-dev: proxies stop with the agent)",
    )
