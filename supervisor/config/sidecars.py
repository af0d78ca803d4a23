"""Consul 1.3+'s ``connect.sidecar_service``: a connect-proxy service registered with its
parent, filled in with Consul 1.3-1.5's defaults (``agent/sidecar_service.go``).

Pure functions on already validated values; ``supervisor.config.build`` calls them for
config files and API registrations alike. Two things need more than one definition:

* the port, when none is given, is the lowest one of ``ports.sidecar_min_port`` ..
  ``sidecar_max_port`` no other service holds -- except that a sidecar keeps the port it
  has now (Consul 1.5 picked at random before and "consul reload would assign new ports
  to all the sidecars");
* supervision (``connect.proxy.supervise_sidecars``, ours): the parent then also carries
  the sidecar's proxy as its managed proxy, so logs, backoff, adoption, rolling restarts
  and the root refusal are the managed proxies' own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from supervisor.catalog.status import CheckKind
from supervisor.config.model import (
    EMPTY_MAP,
    SIDECAR_SUFFIX,
    CheckDef,
    ConnectProxyDef,
    JSONMap,
    ManagedProxyDef,
    ProxyDefaults,
    ServiceDef,
    Upstream,
    freeze,
    thaw,
)
from supervisor.net import join_host_port

LISTENING_CHECK = "Connect Sidecar Listening"
ALIASING_CHECK = "Connect Sidecar Aliasing {parent}"
DEFAULT_LOCAL_ADDRESS = "127.0.0.1"


class NoSidecarPort(ValueError):
    """No port was given and none can be assigned; the message is Consul's."""


@dataclass(frozen=True)
class SidecarPorts:
    """What port assignment knows beyond the definitions at hand: the port each sidecar
    (by ID) has now, and the ports of services defined elsewhere (the API's, for a config
    file; the files', for an API registration)."""

    current: Mapping[str, int] = field(default_factory=lambda: EMPTY_MAP)
    taken: frozenset[int] = frozenset()

    @staticmethod
    def of(services: Iterable[ServiceDef]) -> SidecarPorts:
        services = list(services)
        return SidecarPorts(
            current={s.id: s.port for s in services if s.sidecar_for},
            taken=frozenset(s.port for s in services if s.port),
        )


NO_SIDECAR_PORTS = SidecarPorts()


def sidecar_id(parent_id: str) -> str:
    return parent_id + SIDECAR_SUFFIX


def assign_ports(
    wanted: Mapping[str, int], explicit: set[int], low: int, high: int, hint: SidecarPorts
) -> dict[str, int | NoSidecarPort]:
    """A port for every sidecar in ``wanted`` (ID: its given port, 0 for none), in order.
    ``explicit``: the ports services of the same definitions give themselves."""
    taken = set(explicit) | set(hint.taken)
    result: dict[str, int | NoSidecarPort] = {service_id: port for service_id, port in wanted.items() if port}
    for service_id, port in wanted.items():
        kept = hint.current.get(service_id, 0)
        if not port and low <= kept <= high and low > 0 and kept not in explicit:
            result[service_id] = kept
            taken.add(kept)
    for service_id in wanted:
        if service_id in result:
            continue
        if low < 1 or high < 1:
            result[service_id] = NoSidecarPort(
                "no port provided for sidecar_service and auto-assignment disabled in config "
                "(ports.sidecar_min_port / sidecar_max_port)"
            )
            continue
        free = next((p for p in range(low, high + 1) if p not in taken), 0)
        if not free:
            result[service_id] = NoSidecarPort(
                f"no port provided for sidecar_service and none left in the configured range [{low}, {high}]"
            )
            continue
        result[service_id] = free
        taken.add(free)
    return result


def build_sidecar(
    raw: Mapping[str, Any],
    parent: ServiceDef,
    port: int,
    *,
    checks: tuple[CheckDef, ...],
    upstreams: tuple[Upstream, ...],
    proxy_config: JSONMap,
) -> ServiceDef:
    """The sidecar of ``parent`` from its cleaned ``sidecar_service`` block, with Consul's
    defaults for everything the block leaves out. ``checks``: the block's own, built."""
    block = raw.get("proxy", {})
    service_id = sidecar_id(parent.id)
    name = raw.get("name") or parent.name + SIDECAR_SUFFIX
    local_address = block.get("local_service_address") or DEFAULT_LOCAL_ADDRESS
    proxy = ConnectProxyDef(
        destination_service_name=block.get("destination_service_name") or parent.name,
        destination_service_id=block.get("destination_service_id") or parent.id,
        local_service_address=local_address,
        local_service_port=block.get("local_service_port") or parent.port,
        config=proxy_config,
        upstreams=upstreams,
    )
    if not checks:
        checks = (
            CheckDef(
                check_id=f"service:{service_id}:1",
                name=LISTENING_CHECK,
                kind=CheckKind.TCP,
                target=join_host_port(local_address, port),
                service_id=service_id,
            ),
            CheckDef(
                check_id=f"service:{service_id}:2",
                name=ALIASING_CHECK.format(parent=parent.id),
                kind=CheckKind.ALIAS,
                alias_service=parent.id,
                service_id=service_id,
            ),
        )
    weights = raw.get("weights", {})
    # Tags and meta come from the parent unless the block gives its own: all or nothing,
    # as Consul 1.4.3+ does.
    return ServiceDef(
        id=service_id,
        name=name,
        source=parent.source + ".connect.sidecar_service",
        kind="connect-proxy",
        tags=tuple(raw.get("tags") or parent.tags),
        address=raw.get("address") or parent.address,
        port=port,
        meta=freeze(raw["meta"]) if raw.get("meta") else parent.meta,
        checks=checks,
        token=raw.get("token") or parent.token,
        enable_tag_override=raw.get("enable_tag_override", False),
        weights=(weights.get("passing", 1), weights.get("warning", 1)),
        proxy=proxy,
        sidecar_for=parent.id,
    )


def supervised(parent: ServiceDef, sidecar: ServiceDef, defaults: ProxyDefaults) -> ServiceDef:
    """``parent`` with the sidecar's proxy as its managed proxy: supervised as one, served
    its config at ``/v1/agent/connect/proxy/<sidecar-id>``, listening on the sidecar's port."""
    proxy = sidecar.proxy
    assert proxy is not None
    config: dict[str, Any] = dict(thaw(proxy.config))
    config["bind_port"] = sidecar.port
    if sidecar.address:
        config.setdefault("bind_address", sidecar.address)
    config.setdefault(
        "local_service_address", join_host_port(proxy.local_service_address, proxy.local_service_port)
    )
    managed = ManagedProxyDef(exec_mode=defaults.exec_mode, config=freeze(config), upstreams=proxy.upstreams)
    return replace(
        parent, managed_proxy=managed, proxy_service_id=sidecar.id, proxy_service_name=sidecar.name
    )
