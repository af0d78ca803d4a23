"""Everything proxies need from their agent besides supervision: the CA and leaves, the
catalog with health checks, intentions, prepared queries and API registrations.

All of it lives on the HTTP API's event loop (one thread, no locks). The supervision
loop's views arrive through ``on_view``; a change anywhere bumps the shared index and
wakes blocking queries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from supervisor.catalog.catalog import Catalog
from supervisor.catalog.index import Index
from supervisor.catalog.intentions import IntentionFile, Intentions
from supervisor.catalog.queries import Queries, QueryFile
from supervisor.catalog.registry import Registry
from supervisor.changes import ChangeSignal
from supervisor.config.model import AgentConfig
from supervisor.connect.ca import CertificateAuthority
from supervisor.connect.leaves import LeafManager
from supervisor.errors import DataDirError, SupervisorError
from supervisor.state.datadir import DataDir
from supervisor.supervision.view import AgentView

log = logging.getLogger("supervisor.controlplane")


class ControlPlane:
    def __init__(
        self,
        data_dir: DataDir | None,
        registry: Registry,
        index: Index,
        services_changed: Callable[[], None],
    ) -> None:
        self.data_dir = data_dir
        self.registry = registry
        self.index = index
        self.services_changed = services_changed
        connect_dir = os.path.join(data_dir.root, "connect") if data_dir is not None else None
        self.connect_dir = connect_dir
        self.changes = ChangeSignal()
        self.ca: CertificateAuthority | None = None
        self.leaves: LeafManager | None = None
        self.catalog = Catalog(index, self.changes)
        self.intentions = Intentions(
            IntentionFile(os.path.join(connect_dir, "intentions.json")) if connect_dir else None,
            index.next,
            self.changed,
        )
        self.queries = Queries(
            QueryFile(os.path.join(connect_dir, "queries.json")) if connect_dir else None,
            index.next,
            self.changed,
        )
        self.view: AgentView | None = None
        self._prune_task: asyncio.Task[None] | None = None

    def load_stores(self) -> None:
        """Read intentions and queries (before serving: a bad file stops the agent)."""
        self.intentions.load()
        self.queries.load()

    def save_all(self) -> None:
        """Write every store again, from memory: data_dir was deleted under the running agent.
        Runs on the event loop, so no request changes a store halfway through."""
        stores: list[tuple[str, Callable[[], None]]] = [
            ("intentions", self.intentions.save),
            ("prepared queries", self.queries.save),
            ("service registrations", self.registry.save_all),
        ]
        if self.ca is not None:
            stores.insert(0, ("the CA", self.ca.save))
        for name, save in stores:
            try:
                save()
            except DataDirError as exc:
                log.error("cannot restore %s in data_dir: %s", name, exc)
            else:
                log.info("restored %s in data_dir from memory", name)

    def start(self, view: AgentView) -> None:
        """Called on the event loop before the first request is served."""
        config = view.config
        self.ca = CertificateAuthority(
            os.path.join(self.connect_dir, "ca.json") if self.connect_dir else None,
            config.datacenter,
            self.index.next,
        )
        message = self.ca.start(config.ca)
        if message:
            log.warning("%s", message)
        log.info("Connect CA ready: trust domain %s, active root %s", self.ca.trust_domain, self.ca.active.id)
        self.leaves = LeafManager(self.ca, self.changed)
        self.view = view
        self.catalog.update(view, self.registry.services)
        self._schedule_prune()

    def changed(self) -> None:
        self.index.next()
        self.changes.fire()

    def on_view(self, view: AgentView) -> None:
        previous = self.view
        self.view = view
        if previous is not None and previous.config is not view.config:
            self._apply_config(previous.config, view.config)
        self.catalog.update(view, self.registry.services)

    def _apply_config(self, previous: AgentConfig, config: AgentConfig) -> None:
        if self.ca is not None and config.ca != previous.ca:
            try:
                message = self.ca.apply(config.ca)
            except SupervisorError as exc:  # the loader validated it; a surprise is logged
                log.error("cannot apply connect.ca_config: %s", exc)
                return
            if message:
                log.warning("%s", message)
                if self.leaves is not None:
                    self.leaves.reissue_all()
                self._schedule_prune()
            self.changed()
        if config.proxy_defaults != previous.proxy_defaults and self.registry.services:
            self.registry.rebuild(config.proxy_defaults)
            self.services_changed()

    def _schedule_prune(self) -> None:
        """Drop the old root once the last leaf it signed has expired."""
        if self._prune_task is not None:
            self._prune_task.cancel()
            self._prune_task = None
        if self.ca is None or self.ca.next_prune_time() is None:
            return

        async def prune_later() -> None:
            assert self.ca is not None
            while (when := self.ca.next_prune_time()) is not None:
                await asyncio.sleep(max(0.0, when - time.time()) + 0.1)
                if self.ca.prune():
                    log.info("the old CA root is no longer trusted: every leaf it signed has expired")
                    self.changed()

        self._prune_task = asyncio.get_running_loop().create_task(prune_later(), name="ca prune")

    def close(self) -> None:
        self.catalog.close()
        if self.leaves is not None:
            self.leaves.close()
        if self._prune_task is not None:
            self._prune_task.cancel()
