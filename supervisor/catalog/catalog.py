"""The catalog: this agent's service instances, their health, and discovery.

Sources: services from config files, services registered through the API, and the
``<service>-proxy`` instance of every managed proxy. The catalog turns them into typed
instances, runs their health checks, and writes the result -- entries with their checks
-- to its storage (``storage.py``); every query reads from the storage, so a store shared
by a cluster would answer for every node without a change here or in the endpoints.

Lives on the API's event loop (single-threaded: no locks); ``update`` is called whenever
the supervision loop publishes a new view or a registration changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from supervisor.catalog.checks import CRITICAL, PASSING, CheckSpec, CheckState, run_check
from supervisor.catalog.index import Index
from supervisor.catalog.model import CheckResult, Entry, Instance, InstanceSource, Node
from supervisor.catalog.status import CheckKind, CheckStatus
from supervisor.catalog.storage import CatalogStorage, LocalStorage
from supervisor.changes import ChangeSignal
from supervisor.config.model import ServiceDef
from supervisor.net import bare_host, join_host_port
from supervisor.supervision.desired import PlannedProxy
from supervisor.supervision.view import AgentView, ProxyStatus

log = logging.getLogger("supervisor.catalog")

SERF_CHECK = "serfHealth"
PROXY_CHECK_NAME = "Connect Proxy Listening"
PROXY_CHECK_INTERVAL = 10.0


class UnknownCheck(LookupError):
    """No check of that ID on this agent."""


class NotATTLCheck(ValueError):
    """A TTL update for a check of another kind."""


def proxy_check_target(planned: PlannedProxy) -> str | None:
    """Consul's rule for a managed proxy's TCP check address (``resolveProxyCheckAddress``)."""
    config = planned.config
    if config.get("disable_tcp_check") is True:
        return None
    address = str(config.get("tcp_check_address") or "")
    if not address:
        bind = bare_host(planned.bind_address)
        address = "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind
    return join_host_port(address, planned.port)


def service_checks(service: ServiceDef) -> list[CheckSpec]:
    return [
        CheckSpec(
            check_id=check.check_id,
            name=check.name,
            service_id=service.id,
            service_name=service.name,
            service_tags=service.tags,
            kind=check.kind,
            target=check.target,
            interval=check.interval,
            timeout=check.timeout,
            ttl=check.ttl,
            initial_status=check.status,
            notes=check.notes,
            method=check.method,
            header=tuple((name, tuple(values)) for name, values in check.header.items()),
            tls_skip_verify=check.tls_skip_verify,
        )
        for check in service.checks
    ]


def proxy_check(planned: PlannedProxy) -> CheckSpec | None:
    target = proxy_check_target(planned)
    if target is None:
        return None
    return CheckSpec(
        check_id=f"service:{planned.proxy_id}",
        name=PROXY_CHECK_NAME,
        service_id=planned.proxy_id,
        service_name=planned.service.proxy_name,
        service_tags=(),
        kind=CheckKind.TCP,
        target=target,
        interval=PROXY_CHECK_INTERVAL,
        timeout=PROXY_CHECK_INTERVAL,
        proxy_id=planned.proxy_id,
        tls_listener=planned.spec.is_builtin,
    )


def instances_of(
    view: AgentView, registered: Sequence[ServiceDef]
) -> tuple[dict[str, Instance], dict[str, CheckSpec]]:
    """The instances (by service ID) and check specs a view and the API registrations make."""
    instances: dict[str, Instance] = {}
    specs: dict[str, CheckSpec] = {}
    sources = [
        *((s, InstanceSource.CONFIG) for s in view.config.services),
        *((s, InstanceSource.API) for s in registered),
    ]
    for service, source in sources:
        planned = view.proxies.get(service.proxy_id) if service.managed_proxy is not None else None
        checks = service_checks(service)
        specs.update((spec.check_id, spec) for spec in checks)
        instances[service.id] = Instance(service, source, tuple(spec.check_id for spec in checks), planned)
    for planned in view.proxies.values():
        spec = proxy_check(planned)
        if spec is not None:
            specs[spec.check_id] = spec
        ids = (spec.check_id,) if spec is not None else ()
        instances[planned.proxy_id] = Instance(planned.service, InstanceSource.MANAGED_PROXY, ids, planned)
    return instances, specs


class Catalog:
    def __init__(self, index: Index, changes: ChangeSignal, storage: CatalogStorage | None = None) -> None:
        self.index = index
        self.changes = changes
        self.storage: CatalogStorage = storage if storage is not None else LocalStorage()
        self.instances: dict[str, Instance] = {}
        self.checks: dict[str, CheckState] = {}
        self.node = Node("", "localhost", "127.0.0.1", "dc1", {})
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._proxy_pids: dict[str, int | None] = {}
        self._instance_index: dict[str, int] = {}  # index at which each instance last changed

    # -- keeping up with the agent ---------------------------------------------------------

    def update(self, view: AgentView, registered: Sequence[ServiceDef]) -> None:
        config = view.config
        bind = config.bind_addr
        address = bind if bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        node = Node(view.node_id, config.node_name, address, config.datacenter, {})
        instances, specs = instances_of(view, registered)
        changed = node != self.node or instances != self.instances
        self.node = node
        for service_id, instance in instances.items():
            if self.instances.get(service_id) != instance:
                self._instance_index[service_id] = self.index.next()
        for service_id in set(self._instance_index) - set(instances):
            del self._instance_index[service_id]
        self.instances = instances
        changed |= self._reconcile_checks(specs)
        changed |= self._follow_proxies(view.statuses)
        if changed:
            self._bump()

    def _reconcile_checks(self, specs: dict[str, CheckSpec]) -> bool:
        changed = False
        for check_id in list(self.checks):
            if check_id not in specs:
                self._stop(check_id)
                del self.checks[check_id]
                changed = True
        for check_id, spec in specs.items():
            state = self.checks.get(check_id)
            if state is not None and state.spec == spec:
                continue
            if state is not None:
                self._stop(check_id)
            index = self.index.next()
            status = state.status if state is not None else spec.initial_status
            output = state.output if state is not None else ""
            new = CheckState(spec, status, output, index, index)
            if spec.kind is CheckKind.TTL and spec.ttl > 0:
                new.ttl_deadline = time.monotonic() + spec.ttl
            if spec.proxy_id:
                # A new or moved proxy listener comes up a moment after the config says so:
                # probe quickly until it answers instead of waiting a full interval.
                new.pid = self._proxy_pids.get(spec.proxy_id)
                new.probe_fast(time.monotonic())
            self.checks[check_id] = new
            self._tasks[check_id] = asyncio.get_running_loop().create_task(
                run_check(new, self._report), name=f"check {check_id}"
            )
            changed = True
        return changed

    def _follow_proxies(self, statuses: Mapping[str, ProxyStatus]) -> bool:
        """Critical the moment a proxy's process goes; probe fast when a new one starts."""
        changed = False
        for proxy_id, status in statuses.items():
            previous = self._proxy_pids.get(proxy_id, -1)
            if status.pid == previous:
                continue
            self._proxy_pids[proxy_id] = status.pid
            state = self.checks.get(f"service:{proxy_id}")
            if state is None:
                continue
            state.pid = status.pid
            if status.pid is None:
                why = status.blocked_reason or status.last_exit or status.state
                changed |= self._set(state, CRITICAL, f"proxy process is not running ({status.state}: {why})")
            else:
                state.probe_fast(time.monotonic())
        return changed

    def close(self) -> None:
        for check_id in list(self._tasks):
            self._stop(check_id)

    def _stop(self, check_id: str) -> None:
        task = self._tasks.pop(check_id, None)
        if task is not None:
            task.cancel()

    # -- check results ---------------------------------------------------------------------

    def _report(self, state: CheckState, status: CheckStatus, output: str) -> None:
        if self.checks.get(state.spec.check_id) is state and self._set(state, status, output):
            self._bump()

    def _set(self, state: CheckState, status: CheckStatus, output: str) -> bool:
        if state.status == status and state.output == output:
            return False
        if state.status != status:
            log.info("check %s (%s): %s -> %s", state.spec.check_id, state.spec.name, state.status, status)
        state.status, state.output = status, output
        state.modify_index = self.index.next()
        return True

    def update_ttl(self, check_id: str, status: CheckStatus, output: str) -> None:
        """``PUT /v1/agent/check/{pass,warn,fail,update}/:id``."""
        state = self.checks.get(check_id)
        if state is None:
            raise UnknownCheck(check_id)
        if state.spec.kind is not CheckKind.TTL:
            raise NotATTLCheck(f"check {check_id!r} is a {state.spec.kind} check, not a TTL check")
        if state.spec.ttl > 0:
            state.ttl_deadline = time.monotonic() + state.spec.ttl
            state.wake.set()
        if self._set(state, status, output):
            self._bump()

    def _bump(self) -> None:
        self._publish()
        self.index.next()
        self.changes.fire()

    def _publish(self) -> None:
        entries = {
            service_id: Entry(
                self.node,
                instance,
                (self._serf(), *(result_of(self.checks[c]) for c in instance.check_ids if c in self.checks)),
                self._instance_index.get(service_id, 1),
            )
            for service_id, instance in self.instances.items()
        }
        self.storage.put_local(self.node, entries, (self._serf(),))

    def _serf(self) -> CheckResult:
        return CheckResult(
            SERF_CHECK, "Serf Health Status", PASSING, "Agent alive and reachable", "", "", "", (), 1, 1
        )

    # -- answers -----------------------------------------------------------------------------

    def select(
        self,
        name: str,
        *,
        connect: bool = False,
        tags: Sequence[str] = (),
        passing: bool = False,
        exclude_critical: bool = False,
    ) -> list[Entry]:
        """Entries of ``name`` (its Connect-capable ones with ``connect``), filtered."""
        chosen = []
        for entry in self.storage.entries():
            instance = entry.instance
            if (instance.connect_target if connect else instance.name) != name:
                continue
            if not tags_match(instance.connect_tags if connect else instance.tags, tags):
                continue
            status = entry.status
            if passing and status is not PASSING:
                continue
            if exclude_critical and status is CRITICAL:
                continue
            chosen.append(entry)
        return chosen

    def entries(self) -> Iterable[Entry]:
        return self.storage.entries()

    def nodes(self) -> list[Node]:
        return self.storage.nodes()

    def services(self, chosen: Callable[[Entry], bool] = lambda _: True) -> dict[str, list[str]]:
        """Every service name with the union of its instances' tags."""
        services: dict[str, set[str]] = {}
        for entry in self.storage.entries():
            if chosen(entry):
                services.setdefault(entry.instance.name, set()).update(entry.instance.tags)
        return {name: sorted(tags) for name, tags in sorted(services.items())}

    def local_checks(self, predicate: Callable[[CheckResult], bool] = lambda _: True) -> list[CheckResult]:
        """This agent's checks (not the node's serfHealth), by ID."""
        results = (result_of(self.checks[check_id]) for check_id in sorted(self.checks))
        return [result for result in results if predicate(result)]

    def service_checks(self, name: str) -> list[tuple[str, CheckResult]]:
        """The checks of every instance of ``name``, with the name of the node they run on."""
        return [
            (entry.node.name, check)
            for entry in self.select(name)
            for check in entry.checks
            if check.service_id
        ]

    def node_entries(self, node_name: str) -> list[Entry]:
        return [entry for entry in self.storage.entries() if entry.node.name == node_name]

    def node_health(self, node_name: str) -> list[CheckResult]:
        """Every check on a node: its own, then its instances'."""
        instance_checks = [
            check for entry in self.node_entries(node_name) for check in entry.checks if check.service_id
        ]
        return [*self.storage.node_checks(node_name), *instance_checks]

    def all_checks(self) -> list[tuple[str, CheckResult]]:
        """Every check of the datacenter, with its node's name."""
        return [(node.name, check) for node in self.storage.nodes() for check in self.node_health(node.name)]

    def check(self, check_id: str) -> CheckResult | None:
        state = self.checks.get(check_id)
        return result_of(state) if state is not None else None


def result_of(state: CheckState) -> CheckResult:
    spec = state.spec
    return CheckResult(
        spec.check_id,
        spec.name,
        state.status,
        state.output,
        spec.notes,
        spec.service_id,
        spec.service_name,
        spec.service_tags,
        state.create_index,
        state.modify_index,
    )


def tags_match(have: Sequence[str], wanted: Sequence[str]) -> bool:
    """Every wanted tag present; a ``!tag`` (prepared-query syntax) must be absent."""
    for tag in wanted:
        if tag.startswith("!"):
            if tag[1:] in have:
                return False
        elif tag not in have:
            return False
    return True
