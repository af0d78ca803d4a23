"""API registrations: one service (with its sidecar) or one check from a client's body,
decoded as Consul decodes bodies and validated as config files are."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from supervisor.config.definitions import DefinitionBuilder, empty_document, foreign_datacenters
from supervisor.config.keys import CHECK, SERVICE
from supervisor.config.model import (
    AgentConfig,
    CheckDef,
    ProxyDefaults,
    ServiceDef,
)
from supervisor.config.schema import Context, find_key
from supervisor.config.sidecars import (
    SidecarPorts,
)
from supervisor.errors import ConfigError, ConfigProblem

log = logging.getLogger("supervisor.config")


def build_service(
    raw: Any, source: str, defaults: ProxyDefaults, *, remote_scripts: bool = False
) -> ServiceDef:
    """Validate and build one service definition (an API registration), as config files are.

    Accepts Consul's API spellings (``ID``, ``Name``, ``Connect.Proxy`` …) and decodes as
    Consul does: ``null`` is absent, unknown fields are skipped (logged at DEBUG), an empty
    ``ID`` means the name. Raises ConfigError naming ``source`` and the key for anything
    invalid.
    """
    ctx = Context(source, from_client=True)
    cleaned = SERVICE.validate(raw, "", ctx)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    if ctx.skipped:
        log.debug("%s: skipped fields this agent does not use: %s", source, ", ".join(ctx.skipped))
    if isinstance(cleaned, dict) and not cleaned.get("name"):
        raise ConfigError.single(source, "Name", "Missing service name")
    builder = DefinitionBuilder(empty_document(), (), dev=False, from_api=True, remote_scripts=remote_scripts)
    service = builder._service(cleaned, source, "", defaults) if isinstance(cleaned, dict) else None
    if builder.problems or service is None:
        raise ConfigError(builder.problems or [ConfigProblem(source, "", "not a service definition")])
    return service


def build_registration(
    raw: Any, source: str, config: AgentConfig, existing: Sequence[ServiceDef] = ()
) -> tuple[tuple[ServiceDef, ...], Any]:
    """An API registration: the service, then its sidecar if it has one, and ``raw`` as it
    is to be kept (with the sidecar's assigned port written in, so that a restart of the
    agent keeps it). Decoded and validated as ``build_service``; the agent's ``config``
    gives the proxy defaults, the script-check rule and the sidecar port range. A sidecar
    is supervised only when the agent supervises sidecars and allows managed proxies
    through the API."""
    ctx = Context(source, from_client=True)
    cleaned = SERVICE.validate(raw, "", ctx)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    if ctx.skipped:
        log.debug("%s: skipped fields this agent does not use: %s", source, ", ".join(ctx.skipped))
    if not isinstance(cleaned, dict):
        raise ConfigError.single(source, "", "not a service definition")
    if not cleaned.get("name"):
        raise ConfigError.single(source, "Name", "Missing service name")
    # ``existing``: the agent's services now. A re-registered sidecar keeps its port;
    # every other service's port is taken.
    parent_id = cleaned.get("id") or cleaned["name"]
    others = [s for s in existing if parent_id not in (s.id, s.sidecar_for)]
    sidecar_ports = SidecarPorts(
        current={s.id: s.port for s in existing if s.sidecar_for == parent_id},
        taken=SidecarPorts.of(others).taken,
    )
    builder = DefinitionBuilder(
        empty_document(),
        (),
        dev=False,
        from_api=True,
        remote_scripts=config.enable_script_checks,
        sidecar_ports=sidecar_ports,
    )
    services = builder._services(
        [(source, "", cleaned)],
        config.proxy_defaults,
        (config.sidecar_min_port, config.sidecar_max_port),
        supervise=config.supervise_sidecars and config.allow_managed_api_registration,
    )
    if config.cluster.enabled:
        builder.problems.extend(foreign_datacenters(services, config.datacenter))
    if builder.problems or not services:
        raise ConfigError(builder.problems or [ConfigProblem(source, "", "not a service definition")])
    if len(services) == 2 and not (cleaned["connect"]["sidecar_service"].get("port")):
        raw = _with_sidecar_port(raw, services[1].port)
    return services, raw


def registration_builder(config: AgentConfig) -> Callable[[Any, str], tuple[ServiceDef, ...]]:
    """Builds kept API registrations again under ``config`` (at start-up, after a reload)."""
    return lambda raw, source: build_registration(raw, source, config, config.services)[0]


def registration_rules(config: AgentConfig) -> tuple[Any, ...]:
    """What decides how a kept registration is built: when it changes, rebuild them."""
    return (
        config.proxy_defaults,
        config.enable_script_checks,
        config.supervise_sidecars,
        config.allow_managed_api_registration,
        config.sidecar_min_port,
        config.sidecar_max_port,
    )


def _with_sidecar_port(raw: Any, port: int) -> Any:
    """A copy of the client's body with ``Connect.SidecarService.Port`` set, whatever
    spelling the client used for the keys."""

    def child(mapping: dict[str, Any], name: str) -> tuple[str, Any]:
        key = find_key(mapping, name) or name
        return key, mapping.get(key)

    copy = dict(raw)
    connect_key, connect = child(copy, "connect")
    connect = dict(connect)
    sidecar_key, sidecar = child(connect, "sidecar_service")
    sidecar = dict(sidecar)
    port_key, _ = child(sidecar, "Port")
    sidecar[port_key] = port
    connect[sidecar_key] = sidecar
    copy[connect_key] = connect
    return copy


def build_check(raw: Any, source: str, *, remote_scripts: bool = False) -> CheckDef:
    """Validate and build one check registered through ``PUT /v1/agent/check/register``
    (Consul's decoding and rules; ``remote_scripts``: enable_script_checks is set)."""
    ctx = Context(source, from_client=True)
    cleaned = CHECK.validate(raw, "", ctx)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    if not isinstance(cleaned, dict):
        raise ConfigError.single(source, "", "expected a JSON object")
    if not cleaned.get("name"):
        raise ConfigError.single(source, "Name", "Missing check name")
    builder = DefinitionBuilder(empty_document(), (), dev=False, from_api=True, remote_scripts=remote_scripts)
    check = builder._check_def(cleaned, cleaned.get("id") or cleaned["name"], cleaned["name"], source, "")
    if builder.problems or check is None:
        raise ConfigError(builder.problems or [ConfigProblem(source, "", "not a check definition")])
    return check
