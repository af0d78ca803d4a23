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
from dataclasses import dataclass

from supervisor.catalog.checks import CRITICAL, PASSING, CheckSpec, CheckState, run_check
from supervisor.catalog.index import Index
from supervisor.catalog.model import CheckResult, Entry, Instance, InstanceSource, Node
from supervisor.catalog.status import CheckKind, CheckStatus, worst
from supervisor.catalog.storage import CatalogStorage, LocalStorage
from supervisor.changes import ChangeSignal
from supervisor.config.model import CheckDef, ServiceDef
from supervisor.net import bare_host, join_host_port
from supervisor.supervision.desired import PlannedProxy
from supervisor.supervision.view import AgentView, ProxyStatus

log = logging.getLogger("supervisor.catalog")

SERF_CHECK = "serfHealth"
SERF_NAME = "Serf Health Status"
SERF_ALIVE = "Agent alive and reachable"
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


DEREGISTER_MINIMUM = 60.0  # Consul's check_deregister_interval_min


def spec_of(
    check: CheckDef, service_id: str = "", service_name: str = "", tags: tuple[str, ...] = ()
) -> CheckSpec:
    return CheckSpec(
        check_id=check.check_id,
        name=check.name,
        service_id=service_id,
        service_name=service_name,
        service_tags=tags,
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
        args=check.args,
        alias_node=check.alias_node,
        alias_service=check.alias_service,
        deregister_after=check.deregister_critical_service_after,
    )


def service_checks(service: ServiceDef) -> list[CheckSpec]:
    return [spec_of(check, service.id, service.name, service.tags) for check in service.checks]


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


@dataclass(frozen=True)
class Sources:
    """Everything the catalog is made from, besides the supervision loop's view."""

    registered: Sequence[ServiceDef] = ()  # API registrations
    agent_checks: Sequence[CheckDef] = ()  # top-level config checks, API checks, maintenance
    hidden: frozenset[str] = frozenset()  # config-file services deregistered until a reload


def instances_of(
    view: AgentView, sources: Sources
) -> tuple[dict[str, Instance], dict[str, CheckSpec], tuple[str, ...]]:
    """The instances (by service ID), every check spec, and the IDs of the node's own checks."""
    instances: dict[str, Instance] = {}
    specs: dict[str, CheckSpec] = {}
    services = [
        *((s, InstanceSource.CONFIG) for s in view.config.services if s.id not in sources.hidden),
        *((s, InstanceSource.API) for s in sources.registered),
    ]
    extra: dict[str, list[CheckDef]] = {}
    node_ids: list[str] = []
    for check in sources.agent_checks:
        if check.service_id:
            extra.setdefault(check.service_id, []).append(check)
        else:
            specs[check.check_id] = spec_of(check)
            node_ids.append(check.check_id)
    for service, source in services:
        managed = service.managed_proxy is not None and not service.supervises_sidecar
        planned = view.proxies.get(service.proxy_id) if managed else None
        checks = service_checks(service)
        checks += [spec_of(c, service.id, service.name, service.tags) for c in extra.get(service.id, ())]
        specs.update((spec.check_id, spec) for spec in checks)
        instances[service.id] = Instance(service, source, tuple(spec.check_id for spec in checks), planned)
    for planned in view.proxies.values():
        if planned.service.id in sources.hidden or planned.service.supervises_sidecar:
            continue  # (a supervised sidecar is cataloged as the sidecar service it is)
        spec = proxy_check(planned)
        own = [spec] if spec is not None else []
        own += [
            spec_of(c, planned.proxy_id, planned.service.proxy_name) for c in extra.get(planned.proxy_id, ())
        ]
        specs.update((s.check_id, s) for s in own)
        ids = tuple(s.check_id for s in own)
        instances[planned.proxy_id] = Instance(planned.service, InstanceSource.MANAGED_PROXY, ids, planned)
    return instances, specs, tuple(node_ids)


Reap = Callable[[str, str], None]  # (service ID, check ID): the service was critical too long


class Catalog:
    def __init__(
        self,
        index: Index,
        changes: ChangeSignal,
        storage: CatalogStorage | None = None,
        *,
        reap: Reap | None = None,
        deregister_minimum: float = DEREGISTER_MINIMUM,
    ) -> None:
        self.index = index
        self.changes = changes
        self.storage: CatalogStorage = storage if storage is not None else LocalStorage()
        self.instances: dict[str, Instance] = {}
        self.checks: dict[str, CheckState] = {}
        self.node = Node("", "localhost", "127.0.0.1", "dc1", {})
        self.node_check_ids: tuple[str, ...] = ()
        self._reap = reap
        self._deregister_minimum = deregister_minimum
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reapers: dict[str, asyncio.TimerHandle] = {}
        self._proxy_pids: dict[str, int | None] = {}
        self._instance_index: dict[str, int] = {}  # index at which each instance last changed

    # -- keeping up with the agent ---------------------------------------------------------

    def update(self, view: AgentView, sources: Sources | Sequence[ServiceDef] = Sources()) -> None:
        if not isinstance(sources, Sources):
            sources = Sources(registered=tuple(sources))
        config = view.config
        bind = config.bind_addr
        address = bind if bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        node = Node(view.node_id, config.node_name, address, config.datacenter, dict(config.node_meta))
        instances, specs, node_check_ids = instances_of(view, sources)
        changed = node != self.node or instances != self.instances or node_check_ids != self.node_check_ids
        self.node = node
        self.node_check_ids = node_check_ids
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
            if state is not None:
                new.critical_since = state.critical_since
            self.checks[check_id] = new
            self._track_critical(new)
            if spec.kind.probed or spec.kind is CheckKind.TTL:
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
        reaper = self._reapers.pop(check_id, None)
        if reaper is not None:
            reaper.cancel()

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
        self._track_critical(state)
        return True

    # -- DeregisterCriticalServiceAfter --------------------------------------------------------

    def _track_critical(self, state: CheckState) -> None:
        """Start or stop the countdown of a check that deregisters its service when critical
        too long (at least a minute, as Consul's check_deregister_interval_min)."""
        spec = state.spec
        if state.status is not CRITICAL:
            state.critical_since = None
            reaper = self._reapers.pop(spec.check_id, None)
            if reaper is not None:
                reaper.cancel()
            return
        if state.critical_since is None:
            state.critical_since = time.monotonic()
        if not spec.deregister_after or not spec.service_id or self._reap is None:
            return
        if spec.check_id in self._reapers:
            return
        after = max(spec.deregister_after, self._deregister_minimum)
        delay = max(0.0, state.critical_since + after - time.monotonic())
        self._reapers[spec.check_id] = asyncio.get_running_loop().call_later(delay, self._reap_now, state)

    def _reap_now(self, state: CheckState) -> None:
        spec = state.spec
        self._reapers.pop(spec.check_id, None)
        if self.checks.get(spec.check_id) is not state or state.status is not CRITICAL or self._reap is None:
            return
        log.warning(
            "check %s of service %s has been critical for too long; deregistering the service",
            spec.check_id,
            spec.service_id,
        )
        self._reap(spec.service_id, spec.check_id)

    # -- alias checks ------------------------------------------------------------------------

    def _refresh_aliases(self) -> None:
        """An alias check has the health of the service it names (its checks and the node's):
        worked out again whenever anything changes."""
        for state in self.checks.values():
            spec = state.spec
            if spec.kind is not CheckKind.ALIAS:
                continue
            if spec.alias_node and spec.alias_node != self.node.name:
                self._set(state, CRITICAL, f"alias of node {spec.alias_node!r}: not a node of this agent")
                continue
            watched = [
                other
                for other in self.checks.values()
                if other.spec.kind is not CheckKind.ALIAS
                and (other.spec.service_id == spec.alias_service or not other.spec.service_id)
                and (spec.alias_service or not other.spec.service_id)
            ]
            if not watched:
                self._set(state, PASSING, "No checks found.")
                continue
            status = worst([other.status for other in watched])
            failing = next((other for other in watched if other.status is status), None)
            output = (
                "All checks passing."
                if status is PASSING or failing is None
                else f"Aliased check {failing.spec.check_id!r} is {status}: {failing.output}".rstrip(": ")
            )
            self._set(state, status, output)

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
        self._refresh_aliases()
        self._publish()
        self.index.next()
        self.changes.fire()

    def _publish(self) -> None:
        node_checks = (
            self._serf(),
            *(result_of(self.checks[c]) for c in self.node_check_ids if c in self.checks),
        )
        entries = {
            service_id: Entry(
                self.node,
                instance,
                (*node_checks, *(result_of(self.checks[c]) for c in instance.check_ids if c in self.checks)),
                self._instance_index.get(service_id, 1),
            )
            for service_id, instance in self.instances.items()
        }
        self.storage.put_local(self.node, entries, node_checks)

    def _serf(self) -> CheckResult:
        return CheckResult(SERF_CHECK, SERF_NAME, PASSING, SERF_ALIVE, "", "", "", (), 1, 1)

    # -- answers -----------------------------------------------------------------------------

    def select(
        self,
        name: str,
        *,
        connect: bool = False,
        tags: Sequence[str] = (),
        passing: bool = False,
        exclude_critical: bool = False,
        any_case: bool = False,
    ) -> list[Entry]:
        """Entries of ``name`` (its Connect-capable ones with ``connect``), filtered.
        ``any_case``: names and tags match whatever their letter case (DNS lookups, as
        Consul's catalog index is case-insensitive)."""
        chosen = []
        if any_case:
            name, tags = name.lower(), [tag.lower() for tag in tags]
        for entry in self.storage.entries():
            instance = entry.instance
            own = instance.connect_target if connect else instance.name
            if (own.lower() if any_case and own else own) != name:
                continue
            have = instance.connect_tags if connect else instance.tags
            if not tags_match([tag.lower() for tag in have] if any_case else have, tags):
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
