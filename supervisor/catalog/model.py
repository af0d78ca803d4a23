"""The catalog's values: nodes, service instances, check results, and what discovery
returns. Typed domain values only -- Consul's wire shapes are built from them in
``supervisor/api/catalog_shapes.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.catalog.status import CheckStatus, worst
from supervisor.config.model import ServiceDef
from supervisor.supervision.desired import PlannedProxy


class InstanceSource(enum.StrEnum):
    CONFIG = "config"
    API = "api"
    MANAGED_PROXY = "managed proxy"


@dataclass(frozen=True)
class Node:
    """An agent's host, as discovery shows it."""

    node_id: str
    name: str
    address: str
    datacenter: str
    meta: Mapping[str, str]
    index: int = 1  # when the node's record last changed (cluster mode: from etcd)


@dataclass(frozen=True)
class Instance:
    """One service instance: a service from a config file or the API (``planned``: its
    managed proxy, if it has one), or the ``<service>-proxy`` instance of a managed proxy
    (``service`` is then the proxied service and ``planned`` the proxy)."""

    service: ServiceDef
    source: InstanceSource
    check_ids: tuple[str, ...] = ()
    planned: PlannedProxy | None = None

    @property
    def is_managed_proxy(self) -> bool:
        return self.source is InstanceSource.MANAGED_PROXY

    @property
    def service_id(self) -> str:
        return self.service.proxy_id if self.is_managed_proxy else self.service.id

    @property
    def name(self) -> str:
        return self.service.proxy_name if self.is_managed_proxy else self.service.name

    @property
    def kind(self) -> str:
        return "connect-proxy" if self.is_managed_proxy else self.service.kind

    @property
    def tags(self) -> tuple[str, ...]:
        return () if self.is_managed_proxy else self.service.tags

    @property
    def meta(self) -> Mapping[str, Any]:
        return {} if self.is_managed_proxy else self.service.meta

    @property
    def port(self) -> int:
        if self.is_managed_proxy and self.planned is not None:
            return self.planned.port
        return self.service.port

    @property
    def address(self) -> str:
        """The instance's own address; "" means its node's."""
        if self.is_managed_proxy and self.planned is not None:
            bind = self.planned.bind_address
            return "" if bind in ("0.0.0.0", "::", "[::]", "") else bind
        return self.service.address

    @property
    def connect_target(self) -> str | None:
        """The service this instance serves over Connect (a proxy, or a native app)."""
        if self.is_managed_proxy:
            return self.service.name
        proxy = self.service.proxy
        if proxy is not None and proxy.destination_service_name:
            return proxy.destination_service_name
        return self.service.name if self.service.native else None

    @property
    def connect_tags(self) -> tuple[str, ...]:
        """The tags Connect lookups filter by: a managed proxy answers for its service,
        so it is matched by that service's tags (as Consul 1.3+ sidecars, which copy them)."""
        return self.service.tags

    @property
    def weights(self) -> tuple[int, int]:
        return (1, 1) if self.is_managed_proxy else self.service.weights


@dataclass(frozen=True)
class RemoteInstance:
    """An instance another agent of the cluster registered: what it published (``document``,
    Consul's AgentService shape) and the fields discovery selects by."""

    service_id: str
    name: str
    kind: str
    tags: tuple[str, ...]
    meta: Mapping[str, Any]
    port: int
    address: str
    connect_target: str | None
    connect_tags: tuple[str, ...]
    weights: tuple[int, int]
    document: Mapping[str, Any]

    is_managed_proxy = False


@dataclass(frozen=True)
class CheckResult:
    """A health check as the catalog reports it."""

    check_id: str
    name: str
    status: CheckStatus
    output: str
    notes: str
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    create_index: int
    modify_index: int


@dataclass(frozen=True)
class Entry:
    """What discovery returns: an instance on its node, with its checks."""

    node: Node
    instance: Instance | RemoteInstance
    checks: tuple[CheckResult, ...]
    index: int  # the catalog index at which this instance last changed

    @property
    def status(self) -> CheckStatus:
        """The instance's health: its worst check's (passing when it has none)."""
        return worst([check.status for check in self.checks])
