"""Services and checks from their validated definitions, for config files and API
registrations alike: Consul's defaults, sidecar services (``sidecars``), managed and
hand-registered proxies, and Consul's rules for checks. ``supervisor.config.build`` adds
the agent-level keys; ``supervisor.config.registrations`` builds single API bodies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from supervisor.catalog.status import CheckKind, CheckStatus
from supervisor.config.model import (
    CheckDef,
    ConnectProxyDef,
    ManagedProxyDef,
    ProxyDefaults,
    ServiceDef,
    Upstream,
    freeze,
)
from supervisor.config.schema import join
from supervisor.config.sidecars import (
    NO_SIDECAR_PORTS,
    NoSidecarPort,
    SidecarPorts,
    assign_ports,
    build_sidecar,
    sidecar_id,
    supervised,
)
from supervisor.errors import ConfigProblem

log = logging.getLogger("supervisor.config")

_CHECK_KINDS = (
    ("tcp", CheckKind.TCP),
    ("http", CheckKind.HTTP),
    ("ttl", CheckKind.TTL),
    ("args", CheckKind.SCRIPT),
    ("alias_service", CheckKind.ALIAS),
    ("alias_node", CheckKind.ALIAS),
)
# Kinds Consul had that this agent refuses (never drops silently), and what to use instead.
_REFUSED_CHECK_KEYS = {
    "grpc": "grpc checks are not run by this agent: use an http or tcp check of the service instead",
    "docker_container_id": (
        "docker checks are not run by this agent: use a script check (args) that runs "
        "`docker exec`, with enable_script_checks"
    ),
    "script": "script was removed in Consul 1.0: give the command as args, a list of strings",
}
SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or "
    "'enable_local_script_checks' to true"
)
REMOTE_SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent from remote calls; "
    "to enable, configure 'enable_script_checks' to true"
)


TAGGED = ("__services__", "__checks__")  # (source, key path, definition) lists of a document


def empty_document() -> dict[str, Any]:
    return {tag: [] for tag in TAGGED}


class DefinitionBuilder:
    """Collects problems while it builds services and checks from one merged document."""

    def __init__(
        self,
        doc: dict[str, Any],
        notices: tuple[ConfigProblem, ...],
        *,
        dev: bool,
        from_api: bool = False,
        remote_scripts: bool = False,
        sidecar_ports: SidecarPorts = NO_SIDECAR_PORTS,
    ) -> None:
        self.doc = doc
        self.sidecar_ports = sidecar_ports
        self.dev = dev
        self.from_api = from_api
        self.remote_scripts = remote_scripts
        self.notices = list(notices)
        self.problems: list[ConfigProblem] = []

    def problem(self, source: str, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(source, path, message))

    def _services(
        self,
        tagged: Sequence[tuple[str, str, dict[str, Any]]],
        defaults: ProxyDefaults,
        sidecar_range: tuple[int, int],
        *,
        supervise: bool,
    ) -> tuple[ServiceDef, ...]:
        """Every service, each sidecar right after its parent."""
        built: list[tuple[ServiceDef, dict[str, Any] | None, str, str]] = []
        for source, path, raw in tagged:
            service = self._service(raw, source, path, defaults)
            if service is not None:
                built.append((service, raw.get("connect", {}).get("sidecar_service"), source, path))
        explicit = {service.port for service, _, _, _ in built if service.port}
        explicit |= {block["port"] for _, block, _, _ in built if block and block.get("port")}
        wanted = {
            sidecar_id(service.id): (block or {}).get("port", 0)
            for service, block, _, _ in built
            if block is not None
        }
        ports = assign_ports(wanted, explicit, *sidecar_range, self.sidecar_ports)
        services: list[ServiceDef] = []
        for service, block, source, path in built:
            if block is None:
                services.append(service)
                continue
            sidecar = self._sidecar(service, block, ports[sidecar_id(service.id)], source, path)
            if sidecar is None:
                continue
            services += [supervised(service, sidecar, defaults) if supervise else service, sidecar]
        return tuple(services)

    def _sidecar(
        self, parent: ServiceDef, block: dict[str, Any], port: int | NoSidecarPort, source: str, path: str
    ) -> ServiceDef | None:
        path = join(path, "connect.sidecar_service")
        if parent.managed_proxy is not None:
            self.problem(
                source,
                path,
                "a service cannot have both a managed proxy (connect.proxy) and a sidecar_service; "
                "keep one (proxy-supervisor convert turns a managed proxy into a sidecar_service)",
            )
            return None
        if parent.kind == "connect-proxy":
            self.problem(source, path, "a connect-proxy service cannot have a sidecar_service")
            return None
        if isinstance(port, NoSidecarPort):
            self.problem(source, join(path, "port"), str(port))
            return None
        proxy_block = block.get("proxy", {})
        config, upstreams = self._split_legacy_upstreams(proxy_block, source, join(path, "proxy"))
        service_id = sidecar_id(parent.id)
        name = block.get("name") or f"{parent.name}-sidecar-proxy"
        return build_sidecar(
            block,
            parent,
            port,
            checks=self._checks(block, service_id, name, source, path),
            upstreams=upstreams,
            proxy_config=freeze(config),
        )

    def _service(
        self, raw: dict[str, Any], source: str, path: str, defaults: ProxyDefaults
    ) -> ServiceDef | None:
        name = raw.get("name")
        if not name:
            return None
        service_id = raw.get("id") or name
        kind = raw.get("kind", "")
        connect = raw.get("connect", {})
        managed = (
            self._managed_proxy(connect["proxy"], source, join(path, "connect.proxy"), defaults)
            if "proxy" in connect
            else None
        )
        proxy = self._connect_proxy(raw, source, path) if kind == "connect-proxy" else None
        if kind == "connect-proxy" and managed is not None:
            self.problem(
                source,
                join(path, "connect.proxy"),
                "a connect-proxy service cannot ask for a managed proxy",
            )
        if kind != "connect-proxy" and ("proxy" in raw or "proxy_destination" in raw):
            self.problem(
                source,
                join(path, "proxy"),
                'only services with kind "connect-proxy" take a proxy block',
            )
        weights = raw.get("weights", {})
        return ServiceDef(
            id=service_id,
            name=name,
            source=f"{source}: {path}",
            kind=kind,
            tags=tuple(raw.get("tags", ())),
            address=raw.get("address", ""),
            port=raw.get("port", 0),
            meta=freeze(raw.get("meta", {})),
            checks=self._checks(raw, service_id, name, source, path),
            token=raw.get("token", ""),
            enable_tag_override=raw.get("enable_tag_override", False),
            weights=(weights.get("passing", 1), weights.get("warning", 1)),
            native=connect.get("native", False),
            proxy=proxy,
            managed_proxy=managed,
        )

    def _upstreams(self, raw: list[dict[str, Any]]) -> tuple[Upstream, ...]:
        return tuple(
            Upstream(
                destination_name=entry["destination_name"],
                local_bind_port=entry["local_bind_port"],
                destination_type=entry.get("destination_type", Upstream.destination_type),
                destination_namespace=entry.get("destination_namespace", ""),
                datacenter=entry.get("datacenter", ""),
                local_bind_address=entry.get("local_bind_address") or Upstream.local_bind_address,
                config=freeze(entry.get("config", {})),
            )
            for entry in raw
        )

    def _split_legacy_upstreams(
        self, raw: dict[str, Any], source: str, path: str
    ) -> tuple[dict[str, Any], tuple[Upstream, ...]]:
        """Consul 1.2 kept upstreams in ``config.upstreams``; 1.3+ in ``upstreams``. The old
        place is used only when the new one is empty (as Consul's translation did)."""
        config = dict(raw.get("config", {}))
        legacy = config.pop("upstreams", None) or []
        current = raw.get("upstreams") or []
        if legacy and current:
            self.notices.append(
                ConfigProblem(
                    source, join(path, "config.upstreams"), "ignored: upstreams is also set and wins"
                )
            )
        return config, self._upstreams(current or legacy)

    def _managed_proxy(
        self, raw: dict[str, Any], source: str, path: str, defaults: ProxyDefaults
    ) -> ManagedProxyDef:
        config, upstreams = self._split_legacy_upstreams(raw, source, path)
        command = raw.get("command")
        if raw.get("group") and not raw.get("user"):
            self.problem(source, join(path, "group"), "needs user: a proxy's group is set with its user")
        if self.from_api and (raw.get("user") or raw.get("group")):
            self.problem(
                source,
                join(path, "user"),
                "who a proxy runs as can only be set in the agent's config files, not through the API",
            )
        return ManagedProxyDef(
            exec_mode=raw.get("exec_mode", defaults.exec_mode),
            command=tuple(command) if command else None,
            config=freeze(config),
            upstreams=upstreams,
            user=raw.get("user", ""),
            group=raw.get("group", ""),
        )

    def _connect_proxy(self, raw: dict[str, Any], source: str, path: str) -> ConnectProxyDef | None:
        block = raw.get("proxy", {})
        destination = block.get("destination_service_name") or raw.get("proxy_destination", "")
        if not destination:
            self.problem(
                source,
                join(path, "proxy.destination_service_name"),
                "a connect-proxy service needs the service it represents "
                "(proxy.destination_service_name, or the legacy proxy_destination)",
            )
            return None
        if not raw.get("port"):
            self.problem(
                source,
                join(path, "port"),
                "a connect-proxy service needs a port for other services to reach it",
            )
        config, upstreams = self._split_legacy_upstreams(block, source, join(path, "proxy"))
        return ConnectProxyDef(
            destination_service_name=destination,
            destination_service_id=block.get("destination_service_id", ""),
            local_service_address=block.get("local_service_address", ""),
            local_service_port=block.get("local_service_port", 0),
            config=freeze(config),
            upstreams=upstreams,
        )

    def _checks(
        self, raw: dict[str, Any], service_id: str, name: str, source: str, path: str
    ) -> tuple[CheckDef, ...]:
        entries = [
            ("check" if len(raw.get("check", [])) == 1 else f"check[{i}]", c)
            for i, c in enumerate(raw.get("check", []))
        ]
        entries += [(f"checks[{i}]", c) for i, c in enumerate(raw.get("checks", []))]
        checks = []
        for number, (key, check) in enumerate(entries, start=1):
            check_path = join(path, key)
            default_id = f"service:{service_id}" if len(entries) == 1 else f"service:{service_id}:{number}"
            built = self._check_def(
                check, default_id, f"Service '{name}' check", source, check_path, service_id=service_id
            )
            if built is not None:
                checks.append(built)
        return tuple(checks)

    def _check_def(
        self,
        raw: dict[str, Any],
        default_id: str,
        default_name: str,
        source: str,
        path: str,
        service_id: str = "",
    ) -> CheckDef | None:
        refused = [key for key in _REFUSED_CHECK_KEYS if raw.get(key)]
        if refused:
            self.problem(source, join(path, refused[0]), _REFUSED_CHECK_KEYS[refused[0]])
            return None
        kinds = sorted({kind for key, kind in _CHECK_KINDS if raw.get(key) not in (None, "", [])})
        if len(kinds) != 1:
            self.problem(
                source,
                path,
                "a check needs exactly one of tcp, http, ttl, args (a script) or alias_service",
            )
            return None
        kind = kinds[0]
        if not self._check_rules_hold(raw, kind, source, path):
            return None
        return CheckDef(
            check_id=raw.get("id") or raw.get("check_id") or default_id,
            name=raw.get("name") or default_name,
            kind=kind,
            target=raw.get(kind.value, "") if kind in (CheckKind.TCP, CheckKind.HTTP) else "",
            interval=raw.get("interval", CheckDef.interval),
            timeout=raw.get("timeout", CheckDef.timeout),
            ttl=raw.get("ttl", CheckDef.ttl),
            status=CheckStatus(raw.get("status", CheckDef.status)),
            notes=raw.get("notes", ""),
            method=raw.get("method", CheckDef.method),
            header=freeze(raw.get("header", {})),
            tls_skip_verify=raw.get("tls_skip_verify", CheckDef.tls_skip_verify),
            deregister_critical_service_after=raw.get(
                "deregister_critical_service_after", CheckDef.deregister_critical_service_after
            ),
            service_id=service_id or raw.get("service_id", ""),
            args=tuple(raw.get("args", ())),
            alias_node=raw.get("alias_node", ""),
            alias_service=raw.get("alias_service", ""),
        )

    def _check_rules_hold(self, raw: dict[str, Any], kind: CheckKind, source: str, path: str) -> bool:
        """Consul's rules for a check's timing (``CheckType.Validate``), and who may run scripts."""
        problems = []
        interval, ttl = raw.get("interval"), raw.get("ttl")
        if kind is CheckKind.ALIAS:
            if interval:
                problems.append(("interval", "Interval cannot be set for Alias checks"))
            if ttl:
                problems.append(("ttl", "TTL must be not be set for Alias checks"))
        elif kind is CheckKind.TTL:
            if interval:
                problems.append(("interval", "Interval and TTL cannot both be specified"))
        elif not interval:
            problems.append(("interval", f'a {kind} check needs an interval such as "10s"'))
        if kind is CheckKind.SCRIPT and not self._scripts_allowed():
            problems.append(("args", REMOTE_SCRIPTS_DISABLED if self.from_api else SCRIPTS_DISABLED))
        for key, message in problems:
            self.problem(source, join(path, key), message)
        return not problems

    def _scripts_allowed(self) -> bool:
        if self.from_api:
            return self.remote_scripts
        return bool(self.doc.get("enable_script_checks") or self.doc.get("enable_local_script_checks"))

    def _agent_checks(self) -> tuple[CheckDef, ...]:
        """Top-level ``check``/``checks``: the node's own, or a service's by ``service_id``."""
        checks = []
        for source, path, raw in self.doc["__checks__"]:
            check_id = raw.get("id") or raw.get("check_id") or raw.get("name") or ""
            if not check_id:
                self.problem(source, join(path, "name"), "a check needs a name (or an id)")
                continue
            built = self._check_def(raw, check_id, raw.get("name") or check_id, source, path)
            if built is not None:
                checks.append(built)
        return tuple(checks)


def foreign_datacenters(services: Sequence[ServiceDef], datacenter: str) -> list[ConfigProblem]:
    """Cluster mode is one datacenter: an upstream in another could never be reached."""
    return [
        ConfigProblem(
            service.source,
            f"service {service.name!r} upstream {upstream.destination_name!r}",
            f"names datacenter {upstream.datacenter!r}: this cluster is datacenter "
            f"{datacenter!r}, and federation between datacenters is not supported",
        )
        for service in services
        for proxy in (service.managed_proxy, service.proxy)
        if proxy is not None
        for upstream in proxy.upstreams
        if upstream.datacenter and upstream.datacenter != datacenter
    ]
