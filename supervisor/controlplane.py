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

from supervisor.catalog.agent_checks import AgentChecks
from supervisor.catalog.catalog import DEREGISTER_MINIMUM, Catalog, Sources
from supervisor.catalog.errors import Conflict, InvalidDefinition, NotFound
from supervisor.catalog.index import Index
from supervisor.catalog.intentions import IntentionFields, IntentionFile, Intentions
from supervisor.catalog.queries import Queries, QueryDefinition, QueryFile
from supervisor.catalog.registry import Registry
from supervisor.changes import ChangeSignal
from supervisor.cluster import Cluster
from supervisor.cluster.authority import ClusterAuthority
from supervisor.cluster.leaves import ClusterLeaves
from supervisor.config.model import AgentConfig, CheckDef, ServiceDef
from supervisor.config.registrations import registration_builder, registration_rules
from supervisor.connect.ca import CertificateAuthority
from supervisor.connect.leaves import LeafManager
from supervisor.errors import DataDirError, SupervisorError
from supervisor.state.datadir import DataDir
from supervisor.supervision.view import AgentView

log = logging.getLogger("supervisor.controlplane")

MANAGED_DEREGISTER = (
    "Managed proxy service cannot be deregistered directly. "
    "Deregister the service that has a managed proxy instead."
)


class ControlPlane:
    def __init__(
        self,
        data_dir: DataDir | None,
        registry: Registry,
        index: Index,
        services_changed: Callable[[], None],
        *,
        deregister_minimum: float = DEREGISTER_MINIMUM,
        cluster: Cluster | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.cluster = cluster  # cluster mode: the catalog reads every host's entries
        self.registry = registry
        self.index = index
        self.services_changed = services_changed
        connect_dir = os.path.join(data_dir.root, "connect") if data_dir is not None else None
        self.connect_dir = connect_dir
        self.changes = ChangeSignal()
        self.ca: CertificateAuthority | None = None  # this host's own CA
        self.leaves: LeafManager | ClusterLeaves | None = None
        self.cluster_authority: ClusterAuthority | None = None  # cluster mode: the cluster's CA
        self.catalog = Catalog(
            index,
            self.changes,
            cluster.storage if cluster is not None else None,
            reap=self._reap,
            deregister_minimum=deregister_minimum,
        )
        self.checks = AgentChecks(os.path.join(data_dir.root, "checks") if data_dir is not None else None)
        # Config-file services deregistered through the API: gone until the next reload.
        self.hidden: frozenset[str] = frozenset()
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

    def load_stores(self, config: AgentConfig) -> None:
        """Read intentions, queries and registered checks (before serving: a bad
        intentions or queries file stops the agent; a bad check file is set aside)."""
        self.intentions.load()
        self.queries.load()
        self.checks.load(remote_scripts=config.enable_script_checks)

    def save_all(self) -> None:
        """Write every store again, from memory: data_dir was deleted under the running agent.
        Runs on the event loop, so no request changes a store halfway through."""
        stores: list[tuple[str, Callable[[], None]]] = [
            ("intentions", self.intentions.save),
            ("prepared queries", self.queries.save),
            ("service registrations", self.registry.save_all),
            ("check registrations", self.checks.save_all),
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
        if self.cluster is not None:
            self.cluster_authority, self.leaves = self.cluster.attach_ca(
                self.ca, self.leaves, config, self.changed
            )
        self.view = view
        self._drop_shadowed(config)
        self.refresh_catalog()
        self._schedule_prune()

    def changed(self) -> None:
        self.index.next()
        self.changes.fire()

    @property
    def authority(self) -> CertificateAuthority | ClusterAuthority:
        """The CA the Connect endpoints serve: the cluster's in cluster mode, else our own."""
        if self.cluster_authority is not None:
            return self.cluster_authority
        assert self.ca is not None
        return self.ca

    def cluster_changed(self) -> None:
        """The mirror of etcd moved (cluster mode, on this loop): take its intentions and
        queries, and wake blocking queries."""
        if self.cluster is None:
            return
        self.cluster.refresh_documents(self.intentions, self.queries)
        self.cluster.ca_changed()
        self.cluster.mirror_moved()
        self.changes.fire()

    # -- intentions and prepared queries: local, or in etcd in cluster mode -------------------

    async def create_intention(self, fields: IntentionFields) -> str:
        if self.cluster is None:
            return self.intentions.create(fields).id
        self._refuse_duplicate(fields, None)
        intention_id, _ = await self.cluster.write(lambda writer: writer.create_intention(fields))
        return intention_id

    async def update_intention(self, intention_id: str, fields: IntentionFields) -> None:
        if self.cluster is None:
            self.intentions.update(intention_id, fields)
            return
        current = self.intentions.get(intention_id)
        self._refuse_duplicate(fields, intention_id)
        seen = self.cluster.seen(current.modify_index)
        await self.cluster.write(lambda writer: writer.update_intention(current, seen, fields))

    async def delete_intention(self, intention_id: str) -> None:
        if self.cluster is None:
            self.intentions.delete(intention_id)
            return
        current = self.intentions.get(intention_id)
        seen = self.cluster.seen(current.modify_index)
        await self.cluster.write(lambda writer: writer.delete_intention(current, seen))

    def _refuse_duplicate(self, fields: IntentionFields, own_id: str | None) -> None:
        existing = self.intentions.exact(fields.source_name, fields.destination_name)
        if existing is not None and existing.id != own_id:
            raise Conflict(f"duplicate intention found: {existing} (ID {existing.id})")

    async def create_query(self, definition: QueryDefinition) -> str:
        if self.cluster is None:
            return self.queries.create(definition).id
        self.queries.check_definition(definition, None)
        query_id, _ = await self.cluster.write(lambda writer: writer.create_query(definition))
        return query_id

    async def update_query(self, query_id: str, definition: QueryDefinition) -> None:
        if self.cluster is None:
            self.queries.update(query_id, definition)
            return
        current = self.queries.get(query_id)
        self.queries.check_definition(definition, query_id)
        seen = self.cluster.seen(current.modify_index)
        await self.cluster.write(lambda writer: writer.update_query(current, seen, definition))

    async def delete_query(self, query_id: str) -> None:
        if self.cluster is None:
            self.queries.delete(query_id)
            return
        current = self.queries.get(query_id)
        seen = self.cluster.seen(current.modify_index)
        await self.cluster.write(lambda writer: writer.delete_query(current, seen))

    def contact(self) -> tuple[bool, int]:
        """Whether the cluster's state is current here, and milliseconds since etcd last
        answered (Consul's X-Consul-KnownLeader and X-Consul-LastContact). A single-host
        agent is its own authority."""
        return self.cluster.contact() if self.cluster is not None else (True, 0)

    def on_view(self, view: AgentView) -> None:
        previous = self.view
        self.view = view
        if previous is not None and previous.config is not view.config:
            self._apply_config(previous.config, view.config)
            self._drop_shadowed(view.config)
            if self.hidden:
                log.info(
                    "reloaded: services deregistered through the API are back: %s", ", ".join(self.hidden)
                )
                self.hidden = frozenset()
        self.refresh_catalog()

    def refresh_catalog(self) -> None:
        """Rebuild the catalog from the view and the API's registrations."""
        view = self.view
        if view is None:
            return
        service_ids = {s.id for s in (*view.config.services, *self.registry.services)} | set(view.proxies)
        self.checks.keep_only(service_ids)
        agent_checks: tuple[CheckDef, ...] = (*view.config.checks, *self.checks.checks)
        self.catalog.update(view, Sources(self.registry.services, agent_checks, self.hidden))

    def service_exists(self, service_id: str) -> bool:
        return service_id in self.catalog.instances

    # -- service registrations ----------------------------------------------------------------

    def register_service(self, services: ServiceDef | tuple[ServiceDef, ...], raw: object) -> None:
        """Keep a registration (a service, or a service and its sidecar)."""
        group = services if isinstance(services, tuple) else (services,)
        previous = self.registry.get(group[0].id)
        self.registry.register(group, raw)
        self.refresh_catalog()
        if group[0].managed_proxy is not None or (
            previous is not None and previous.managed_proxy is not None
        ):
            self.services_changed()

    def deregister_service(self, service_id: str) -> None:
        """Remove an API registration with its checks. A config-file service is removed
        until the next reload, as in Consul -- unless it has a managed proxy: that proxy is
        supervised from the file, and stopping it until a reload restarts it would be a
        restart nobody asked for."""
        view = self.view
        assert view is not None
        if service_id in view.proxies:
            raise InvalidDefinition(MANAGED_DEREGISTER)
        configured = view.config.service(service_id)
        if configured is not None and service_id not in self.hidden:
            if configured.managed_proxy is not None:
                raise InvalidDefinition(
                    f"service {service_id!r} has a managed proxy supervised from {configured.source}; "
                    "remove it there and reload"
                )
            sidecars = {s.id for s in view.config.services if s.sidecar_for == service_id}
            self.hidden = self.hidden | {service_id} | sidecars
            log.warning(
                "service %s (defined in %s) deregistered through the API: gone until the next reload",
                service_id,
                configured.source,
            )
        else:
            previous = self.registry.get(service_id)
            if not self.registry.deregister(service_id):
                raise NotFound(f"Unknown service ID {service_id!r}")
            if previous is not None and previous.managed_proxy is not None:
                self.services_changed()
        self.checks.drop_service(service_id)
        self.refresh_catalog()

    def _reap(self, service_id: str, check_id: str) -> None:
        """DeregisterCriticalServiceAfter ran out for ``check_id``."""
        try:
            self.deregister_service(service_id)
        except (InvalidDefinition, NotFound, DataDirError) as exc:
            log.warning("check %s: service %s stays registered: %s", check_id, service_id, exc)

    # -- checks registered through the API ----------------------------------------------------

    def register_check(self, check: CheckDef, raw: object) -> None:
        if check.service_id and not self.service_exists(check.service_id):
            raise NotFound(f"ServiceID {check.service_id!r} does not exist")
        self.checks.register(check, raw)
        self.refresh_catalog()

    def deregister_check(self, check_id: str) -> None:
        """Unknown IDs are no error, as in Consul; checks from config files stay (they go
        with their file)."""
        if self.checks.deregister(check_id):
            self.refresh_catalog()

    def _apply_config(self, previous: AgentConfig, config: AgentConfig) -> None:
        if self.cluster is not None and config.ca != previous.ca:
            log.warning(
                "connect.ca_config changed: in a cluster the signer host applies it (restart the "
                "signer agent with the new ca_config to rotate the cluster's root)"
            )
        elif self.ca is not None and config.ca != previous.ca:
            try:
                message = self.ca.apply(config.ca)
            except SupervisorError as exc:  # the loader validated it; a surprise is logged
                log.error("cannot apply connect.ca_config: %s", exc)
                return
            if message:
                log.warning("%s", message)
                if isinstance(self.leaves, LeafManager):
                    self.leaves.reissue_all()
                self._schedule_prune()
            self.changed()
        if registration_rules(config) != registration_rules(previous) and self.registry.services:
            self.registry.rebuild(registration_builder(config))
            self.services_changed()

    def _drop_shadowed(self, config: AgentConfig) -> None:
        """A config file now defines an ID the API registered: the file's definition wins
        and the registration is removed, as Consul does (it would otherwise hide the
        file's service without a word)."""
        for service in self.registry.services:
            configured = config.service(service.id)
            if configured is None or service.sidecar_for:
                continue
            try:
                self.registry.deregister(service.id)
            except DataDirError as exc:
                log.error("cannot remove the registration of %s: %s", service.id, exc)
                continue
            self.checks.drop_service(service.id)
            log.warning(
                "service %s is defined in %s now: its API registration is replaced by that definition",
                service.id,
                configured.source,
            )

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
        if self.cluster is not None:
            self.cluster.close_ca()
        if self.leaves is not None:
            self.leaves.close()
        if self._prune_task is not None:
            self._prune_task.cancel()
