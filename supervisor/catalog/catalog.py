"""The local catalog: every service instance on this agent, its health, and discovery.

Sources: services from config files, services registered through the API, and the
``<service>-proxy`` registration of every managed proxy. Lives on the API's event loop
(single-threaded: no locks); ``update`` is called whenever the supervision loop
publishes a new view or a registration changes.

Discovery is local to this agent: it answers for the services registered here, in this
agent's datacenter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.api.blocking import ChangeSignal
from supervisor.api.shapes import managed_proxy_service_json, service_json
from supervisor.catalog.checks import CRITICAL, PASSING, CheckSpec, CheckState, run_check
from supervisor.catalog.index import Index, Results
from supervisor.catalog.status import CheckKind, CheckStatus, worst
from supervisor.config.model import ServiceDef
from supervisor.supervision.desired import PlannedProxy
from supervisor.supervision.view import AgentView, ProxyStatus

log = logging.getLogger("supervisor.catalog")

SERF_CHECK = "serfHealth"
PROXY_CHECK_NAME = "Connect Proxy Listening"
PROXY_CHECK_INTERVAL = 10.0


@dataclass(frozen=True)
class Instance:
    """One service instance as discovery sees it."""

    service_id: str
    name: str
    kind: str
    tags: tuple[str, ...]
    service: dict[str, Any]  # Consul's AgentService shape
    connect_target: str | None  # the service it serves over Connect (proxy or native), if any
    check_ids: tuple[str, ...]
    source: str  # "config", "api" or "managed proxy"
    # Tags that Connect lookups filter by: a managed proxy answers for its service, so it is
    # matched by that service's tags (as Consul 1.3+ sidecars, which copy them).
    connect_tags: tuple[str, ...] = ()


def proxy_check_target(planned: PlannedProxy) -> str | None:
    """Consul's rule for a managed proxy's TCP check address (``resolveProxyCheckAddress``)."""
    config = planned.config
    if config.get("disable_tcp_check") is True:
        return None
    address = str(config.get("tcp_check_address") or "")
    if not address:
        bind = planned.bind_address.strip("[]")
        address = "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{planned.port}"


def service_checks(service: ServiceDef) -> list[CheckSpec]:
    return [
        CheckSpec(
            check_id=check.check_id,
            name=check.name,
            service_id=service.id,
            service_name=service.name,
            service_tags=service.tags,
            kind=CheckKind(check.kind),
            target=check.target,
            interval=check.interval,
            timeout=check.timeout,
            ttl=check.ttl,
            initial_status=CheckStatus(check.status),
            notes=check.notes,
            method=check.method,
            header=tuple((name, tuple(values)) for name, values in check.header.items()),
            tls_skip_verify=check.tls_skip_verify,
        )
        for check in service.checks
    ]


def _with_index(data: dict[str, Any], index: int) -> dict[str, Any]:
    service = {key: value for key, value in data.items() if key != "ContentHash"}
    service["CreateIndex"] = index
    service["ModifyIndex"] = index
    return service


class Catalog:
    def __init__(self, index: Index, changes: ChangeSignal) -> None:
        self.index = index
        self.changes = changes
        self.results = Results(index)
        self.instances: dict[str, Instance] = {}
        self.checks: dict[str, CheckState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._proxy_pids: dict[str, int | None] = {}
        self.node_name = "localhost"
        self.node_id = ""
        self.datacenter = "dc1"
        self.node_address = "127.0.0.1"
        self.node_meta: dict[str, str] = {}
        self.registry_ids: set[str] = set()
        self._instance_index: dict[str, int] = {}  # index at which each instance last changed

    # -- keeping up with the agent ---------------------------------------------------------

    def update(self, view: AgentView, registered: Sequence[ServiceDef]) -> None:
        config = view.config
        self.node_name, self.node_id, self.datacenter = config.node_name, view.node_id, config.datacenter
        bind = config.bind_addr
        self.node_address = bind if bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.registry_ids = {service.id for service in registered}
        instances: dict[str, Instance] = {}
        specs: dict[str, CheckSpec] = {}
        for service, source in [*((s, "config") for s in config.services), *((s, "api") for s in registered)]:
            planned = view.proxies.get(service.proxy_id) if service.managed_proxy is not None else None
            checks = service_checks(service)
            specs.update((spec.check_id, spec) for spec in checks)
            target = service.proxy.destination_service_name if service.proxy is not None else None
            instances[service.id] = Instance(
                service.id,
                service.name,
                service.kind,
                service.tags,
                service_json(service, planned),
                target if target else (service.name if service.native else None),
                tuple(spec.check_id for spec in checks),
                source,
                service.tags,
            )
        for planned in view.proxies.values():
            proxy_check = self._proxy_check(planned)
            if proxy_check is not None:
                specs[proxy_check.check_id] = proxy_check
            instances[planned.proxy_id] = Instance(
                planned.proxy_id,
                planned.service.proxy_name,
                "connect-proxy",
                (),
                managed_proxy_service_json(planned),
                planned.service.name,
                (proxy_check.check_id,) if proxy_check else (),
                "managed proxy",
                planned.service.tags,
            )
        changed = instances != self.instances
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

    def _proxy_check(self, planned: PlannedProxy) -> CheckSpec | None:
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

    def _follow_proxies(self, statuses: Iterable[tuple[str, ProxyStatus]] | Any) -> bool:
        """Critical the moment a proxy's process goes; probe fast when a new one starts."""
        changed = False
        items = statuses.items() if hasattr(statuses, "items") else statuses
        for proxy_id, status in items:
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
        """``PUT /v1/agent/check/{pass,warn,fail,update}/:id`` (raises KeyError / ValueError)."""
        state = self.checks[check_id]
        if state.spec.kind is not CheckKind.TTL:
            raise ValueError(f"check {check_id!r} is a {state.spec.kind} check, not a TTL check")
        if state.spec.ttl > 0:
            state.ttl_deadline = time.monotonic() + state.spec.ttl
            state.wake.set()
        if self._set(state, status, output):
            self._bump()

    def _bump(self) -> None:
        self.index.next()
        self.changes.fire()

    # -- answers -----------------------------------------------------------------------------

    def node_json(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
            "Meta": {"consul-network-segment": "", **self.node_meta},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def serf_check_json(self) -> dict[str, Any]:
        return {
            "Node": self.node_name,
            "CheckID": SERF_CHECK,
            "Name": "Serf Health Status",
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Definition": {},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def instance_checks(self, instance: Instance) -> list[CheckState]:
        return [self.checks[check_id] for check_id in instance.check_ids if check_id in self.checks]

    def health_status(self, instance: Instance) -> CheckStatus:
        """The worst status of an instance's checks (passing when it has none)."""
        return worst([state.status for state in self.instance_checks(instance)])

    def select(
        self,
        name: str,
        *,
        connect: bool = False,
        tags: Sequence[str] = (),
        passing: bool = False,
        exclude_critical: bool = False,
    ) -> list[Instance]:
        """Instances of ``name`` (its Connect-capable ones with ``connect``), filtered."""
        chosen = []
        for instance in sorted(self.instances.values(), key=lambda i: i.service_id):
            if (instance.connect_target if connect else instance.name) != name:
                continue
            if not _tags_match(instance.connect_tags if connect else instance.tags, tags):
                continue
            status = self.health_status(instance)
            if passing and status != PASSING:
                continue
            if exclude_critical and status == CRITICAL:
                continue
            chosen.append(instance)
        return chosen

    def health_entries(self, instances: Sequence[Instance]) -> list[dict[str, Any]]:
        node = self.node_json()
        return [
            {
                "Node": node,
                "Service": _with_index(instance.service, self._instance_index.get(instance.service_id, 1)),
                "Checks": [
                    self.serf_check_json(),
                    *(state.to_json(self.node_name) for state in self.instance_checks(instance)),
                ],
            }
            for instance in instances
        ]

    def catalog_entries(self, instances: Sequence[Instance]) -> list[dict[str, Any]]:
        entries = []
        for instance in instances:
            service = instance.service
            entries.append(
                {
                    "ID": self.node_id,
                    "Node": self.node_name,
                    "Address": self.node_address,
                    "Datacenter": self.datacenter,
                    "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
                    "NodeMeta": {"consul-network-segment": "", **self.node_meta},
                    "ServiceKind": service["Kind"],
                    "ServiceID": service["ID"],
                    "ServiceName": service["Service"],
                    "ServiceTags": service["Tags"],
                    "ServiceAddress": service["Address"],
                    "ServiceWeights": service["Weights"],
                    "ServiceMeta": service["Meta"],
                    "ServicePort": service["Port"],
                    "ServiceEnableTagOverride": service["EnableTagOverride"],
                    "ServiceProxyDestination": service.get("ProxyDestination", ""),
                    "ServiceProxy": service.get("Proxy", {}),
                    "ServiceConnect": service.get("Connect", {}),
                    "CreateIndex": self._instance_index.get(instance.service_id, 1),
                    "ModifyIndex": self._instance_index.get(instance.service_id, 1),
                }
            )
        return entries

    def services_json(self) -> dict[str, list[str]]:
        services: dict[str, set[str]] = {}
        for instance in self.instances.values():
            services.setdefault(instance.name, set()).update(instance.tags)
        return {name: sorted(tags) for name, tags in sorted(services.items())}

    def checks_json(
        self, predicate: Callable[[CheckState], bool] = lambda _: True
    ) -> dict[str, dict[str, Any]]:
        return {
            check_id: state.to_json(self.node_name)
            for check_id, state in sorted(self.checks.items())
            if predicate(state)
        }


def _tags_match(have: Sequence[str], wanted: Sequence[str]) -> bool:
    """Every wanted tag present; a ``!tag`` (prepared-query syntax) must be absent."""
    for tag in wanted:
        if tag.startswith("!"):
            if tag[1:] in have:
                return False
        elif tag not in have:
            return False
    return True
