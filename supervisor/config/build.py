"""Parse, validate and merge config sources into one frozen ``AgentConfig``.

Order of work: each file is parsed and validated on its own (so problems name the file
and key), the cleaned documents are merged (later files win for scalars, ``service`` and
``services`` concatenate), legacy forms are translated, then rules that span files are
checked (duplicate IDs, port clashes). Every problem found is reported in one
ConfigError; nothing is returned unless the whole configuration is valid.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from supervisor.catalog.status import CheckKind, CheckStatus
from supervisor.config.formats import parse_text
from supervisor.config.keys import AGENT, CHECK, SERVICE
from supervisor.config.model import (
    ACLConfig,
    AgentConfig,
    CAConfig,
    CheckDef,
    ConnectProxyDef,
    DNSConfig,
    ManagedProxyDef,
    ProxyDefaults,
    ServiceDef,
    SOAConfig,
    Upstream,
    freeze,
)
from supervisor.config.schema import Context, join, normalise_key
from supervisor.config.sidecars import (
    NO_SIDECAR_PORTS,
    NoSidecarPort,
    SidecarPorts,
    assign_ports,
    build_sidecar,
    sidecar_id,
    supervised,
)
from supervisor.config.sources import Source, collect_sources
from supervisor.errors import ConfigError, ConfigProblem
from supervisor.levels import canonical
from supervisor.net import bare_host

log = logging.getLogger("supervisor.config")

COMMAND_LINE = "<command line>"
# Check kinds by the key that declares them.
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


def load_config(
    config_files: Sequence[str],
    config_dirs: Sequence[str],
    flags: Mapping[str, Any] | None = None,
    *,
    dev: bool = False,
    sidecar_ports: SidecarPorts = NO_SIDECAR_PORTS,
) -> AgentConfig:
    """Read every source and build the configuration (raises ConfigError)."""
    sources, unreadable = collect_sources(config_files, config_dirs)
    return build_config(sources, flags, dev=dev, problems=unreadable, sidecar_ports=sidecar_ports)


def build_config(
    sources: Sequence[Source],
    flags: Mapping[str, Any] | None = None,
    *,
    dev: bool = False,
    problems: Sequence[ConfigProblem] = (),
    sidecar_ports: SidecarPorts = NO_SIDECAR_PORTS,
) -> AgentConfig:
    """Build from already-read sources; ``flags`` is a config document from the command line.
    ``problems`` (sources that could not be read) are reported with every other problem.
    ``sidecar_ports``: the ports sidecars have now, kept by a reload (see ``sidecars``)."""
    problems = list(problems)
    notices: list[ConfigProblem] = []
    documents: list[dict[str, Any]] = []
    named = [(source.name, _parse(source, problems)) for source in sources]
    if flags:
        named.append((COMMAND_LINE, dict(flags)))
    for name, data in named:
        if data is None:
            continue
        ctx = Context(name)
        try:
            cleaned = AGENT.validate(data, "", ctx)
        except Exception as exc:  # a validator bug must not become a crash
            log.exception("validating %s failed", name)
            ctx.problem(
                "", f"cannot be validated ({type(exc).__name__}: {exc}); this is a bug, please report it"
            )
            cleaned = None
        problems.extend(ctx.problems)
        notices.extend(ctx.notices)
        if isinstance(cleaned, dict):
            documents.append(_tag_services(cleaned, data, name))
    if problems:
        raise ConfigError(problems)
    builder = _Builder(_merge_documents(documents), tuple(notices), dev=dev, sidecar_ports=sidecar_ports)
    try:
        return builder.build()
    except ConfigError:
        raise
    except Exception as exc:  # a builder bug must not become a crash either
        log.exception("building the configuration failed")
        message = f"the configuration cannot be built ({type(exc).__name__}: {exc}); please report this bug"
        raise ConfigError.single("", "", message) from exc


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
    builder = _Builder(_empty_document(), (), dev=False, from_api=True, remote_scripts=remote_scripts)
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
    builder = _Builder(
        _empty_document(),
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
        key = next((k for k in mapping if normalise_key(k) == normalise_key(name)), name)
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
    builder = _Builder(_empty_document(), (), dev=False, from_api=True, remote_scripts=remote_scripts)
    check = builder._check_def(cleaned, cleaned.get("id") or cleaned["name"], cleaned["name"], source, "")
    if builder.problems or check is None:
        raise ConfigError(builder.problems or [ConfigProblem(source, "", "not a check definition")])
    return check


def _empty_document() -> dict[str, Any]:
    return {tag: [] for tag in _TAGGED}


def _parse(source: Source, problems: list[ConfigProblem]) -> Any:
    try:
        data = parse_text(source.text, source.fmt, source.name)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None
    if data is None or data == "":
        return {}
    return data


def _tag_services(cleaned: dict[str, Any], raw: Any, source: str) -> dict[str, Any]:
    """Replace ``service``/``services`` (and the top-level ``check``/``checks``) by
    ``(source, key path, definition)`` triples so later messages can say where each was
    defined."""
    for singular, plural, tag in (("service", "services", "__services__"), ("check", "checks", "__checks__")):
        tagged = []
        for key in (singular, plural):
            entries = cleaned.pop(key, None) or []
            single = key == singular and isinstance(raw, dict) and isinstance(raw.get(key), dict)
            for index, entry in enumerate(entries):
                if isinstance(entry, dict):
                    tagged.append((source, key if single else f"{key}[{index}]", entry))
        cleaned[tag] = tagged
    return cleaned


_TAGGED = ("__services__", "__checks__")


def _merge_documents(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {tag: [] for tag in _TAGGED}
    for document in documents:
        for key, value in document.items():
            if key in _TAGGED:
                merged[key].extend(value)
            else:
                merged[key] = _merge_values(merged.get(key), value)
    return merged


def _merge_values(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        result = dict(old)
        for key, value in new.items():
            result[key] = _merge_values(result.get(key), value)
        return result
    return new


class _Builder:
    """Turns one merged, type-checked document into an AgentConfig (or a ConfigError)."""

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

    def build(self) -> AgentConfig:
        doc = self.doc
        connect = doc.get("connect", {})
        proxy_flags = connect.get("proxy", {})
        ports = doc.get("ports", {})
        limits = doc.get("limits", {})
        defaults = self._proxy_defaults(connect.get("proxy_defaults", {}))
        services = self._services(
            doc["__services__"],
            defaults,
            (
                ports.get("sidecar_min_port", AgentConfig.sidecar_min_port),
                ports.get("sidecar_max_port", AgentConfig.sidecar_max_port),
            ),
            supervise=proxy_flags.get("supervise_sidecars", AgentConfig.supervise_sidecars),
        )
        config = AgentConfig(
            data_dir=doc.get("data_dir") or None,
            dev=self.dev,
            log_level=self._log_level(),
            log_json=doc.get("log_json", AgentConfig.log_json),
            log_file=doc.get("log_file") or None,
            log_rotate_bytes=doc.get("log_rotate_bytes", AgentConfig.log_rotate_bytes),
            log_rotate_max_files=doc.get("log_rotate_max_files", AgentConfig.log_rotate_max_files),
            node_name=doc.get("node_name") or socket.gethostname() or AgentConfig.node_name,
            node_id=self._node_id(),
            datacenter=doc.get("datacenter") or AgentConfig.datacenter,
            bind_addr=doc.get("bind_addr") or AgentConfig.bind_addr,
            http_host=self._http_host(),
            http_port=ports.get("http", AgentConfig.http_port),
            http_max_conns_per_client=limits.get(
                "http_max_conns_per_client", AgentConfig.http_max_conns_per_client
            ),
            http_max_conns=limits.get("http_max_conns", AgentConfig.http_max_conns),
            proxy_min_port=ports.get("proxy_min_port", AgentConfig.proxy_min_port),
            proxy_max_port=ports.get("proxy_max_port", AgentConfig.proxy_max_port),
            sidecar_min_port=ports.get("sidecar_min_port", AgentConfig.sidecar_min_port),
            sidecar_max_port=ports.get("sidecar_max_port", AgentConfig.sidecar_max_port),
            supervise_sidecars=proxy_flags.get("supervise_sidecars", AgentConfig.supervise_sidecars),
            dns_host=self._dns_host(),
            dns_port=ports.get("dns", AgentConfig.dns_port),
            domain=doc.get("domain", AgentConfig.domain),
            dns=self._dns(doc.get("dns_config", {})),
            connect_enabled=connect.get("enabled", AgentConfig.connect_enabled),
            allow_managed_root=proxy_flags.get("allow_managed_root", AgentConfig.allow_managed_root),
            allow_managed_api_registration=proxy_flags.get(
                "allow_managed_api_registration", AgentConfig.allow_managed_api_registration
            ),
            proxy_user=proxy_flags.get("user", AgentConfig.proxy_user),
            proxy_group=proxy_flags.get("group", AgentConfig.proxy_group),
            proxy_log_max_bytes=proxy_flags.get("log_max_bytes", AgentConfig.proxy_log_max_bytes),
            proxy_log_max_files=proxy_flags.get("log_max_files", AgentConfig.proxy_log_max_files),
            proxy_defaults=defaults,
            ca=self._ca(connect.get("ca_config", {})),
            acl=self._acl(),
            enable_script_checks=doc.get("enable_script_checks", AgentConfig.enable_script_checks),
            enable_local_script_checks=doc.get(
                "enable_local_script_checks", AgentConfig.enable_local_script_checks
            ),
            node_meta=freeze(doc.get("node_meta", {})),
            services=services,
            checks=self._agent_checks(),
            sources=tuple(sorted({source for source, _, _ in doc["__services__"]})),
            notices=tuple(self.notices),
        )
        self._check(config)
        if self.problems:
            raise ConfigError(self.problems)
        return config

    # -- agent-level keys -------------------------------------------------------------

    def _log_level(self) -> str:
        level = self.doc.get("log_level") or ("DEBUG" if self.dev else "INFO")
        return canonical(level) or level

    def _node_id(self) -> str | None:
        node_id = self.doc.get("node_id")
        if not node_id:
            return None
        try:
            return str(uuid.UUID(node_id))
        except ValueError:
            self.problem("", "node_id", f"{node_id!r} is not a UUID")
            return None

    def _http_host(self) -> str:
        host = self.doc.get("addresses", {}).get("http") or self.doc.get("client_addr") or ""
        # Consul allowed a space-separated list; the API listens on the first address.
        first = host.split()[0] if host.split() else AgentConfig.http_host
        return bare_host(first)

    def _dns_host(self) -> str:
        host = self.doc.get("addresses", {}).get("dns") or self.doc.get("client_addr") or ""
        first = host.split()[0] if host.split() else AgentConfig.dns_host
        return bare_host(first)

    def _dns(self, raw: dict[str, Any]) -> DNSConfig:
        soa = raw.get("soa", {})
        fields = {key: raw[key] for key in DNSConfig.__dataclass_fields__ if key in raw and key != "soa"}
        if "service_ttl" in fields:
            fields["service_ttl"] = freeze(fields["service_ttl"])
        return DNSConfig(**fields, soa=SOAConfig(**soa))

    def _proxy_defaults(self, raw: dict[str, Any]) -> ProxyDefaults:
        command = raw.get("command")
        daemon_command = raw.get("daemon_command")
        if command is not None and daemon_command is not None and command != daemon_command:
            self.problem(
                "",
                "connect.proxy_defaults",
                "both command and daemon_command are set and differ; they are the same setting "
                "(command is the documented spelling, daemon_command Consul's): keep one",
            )
        chosen = daemon_command if daemon_command is not None else command
        return ProxyDefaults(
            exec_mode=raw.get("exec_mode", ProxyDefaults.exec_mode),
            command=tuple(chosen) if chosen else None,
            config=freeze(raw.get("config", {})),
        )

    def _ca(self, raw: dict[str, Any]) -> CAConfig:
        private_key, root_cert = raw.get("private_key", ""), raw.get("root_cert", "")
        if bool(private_key) != bool(root_cert):
            self.problem("", "connect.ca_config", "private_key and root_cert must be given together")
        ttl = raw.get("leaf_cert_ttl", CAConfig.leaf_cert_ttl)
        if not 10 <= ttl <= 8760 * 3600:
            self.problem("", "connect.ca_config.leaf_cert_ttl", "must be between 10s and 8760h (one year)")
        return CAConfig(private_key=private_key, root_cert=root_cert, leaf_cert_ttl=ttl)

    def _acl(self) -> ACLConfig:
        acl = self.doc.get("acl", {})
        enabled = acl.get("enabled", bool(self.doc.get("acl_datacenter")))
        return ACLConfig(
            enabled=enabled,
            default_policy=acl.get("default_policy")
            or self.doc.get("acl_default_policy")
            or ACLConfig.default_policy,
            master_token=acl.get("tokens", {}).get("master") or self.doc.get("acl_master_token") or "",
        )

    # -- services -----------------------------------------------------------------------

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

    # -- rules across the whole configuration -------------------------------------------

    def _check(self, config: AgentConfig) -> None:
        if config.data_dir is None and not config.dev:
            self.problem(
                "",
                "data_dir",
                "is required: set data_dir in a config file or pass -data-dir "
                "(or run with -dev to keep nothing on disk)",
            )
        if config.proxy_max_port < config.proxy_min_port:
            self.problem(
                "",
                "ports.proxy_max_port",
                f"{config.proxy_max_port} is below proxy_min_port {config.proxy_min_port}",
            )
        if config.proxy_group and not config.proxy_user:
            self.problem(
                "", "connect.proxy.group", "needs connect.proxy.user: a proxy's group is set with its user"
            )
        managed = config.managed_services()
        if managed and not config.connect_enabled:
            self.problem(managed[0].source, "connect.proxy", "managed proxies need connect.enabled = true")
        self._check_ids(config)
        self._check_ports(config)

    def _check_ids(self, config: AgentConfig) -> None:
        owners: dict[str, str] = {}
        for service in config.services:
            ids = [(service.id, f"{service.source}.id")]
            if service.managed_proxy is not None and not service.supervises_sidecar:
                ids.append((service.proxy_id, f"{service.source}.connect.proxy (its proxy ID)"))
            for service_id, where in ids:
                if service_id in owners:
                    source, _, path = where.partition(": ")
                    self.problem(
                        source,
                        path,
                        f"duplicate service ID {service_id!r} (also defined at {owners[service_id]})",
                    )
                else:
                    owners[service_id] = where

    def _check_ports(self, config: AgentConfig) -> None:
        """Two listeners of our proxies on one port can never both run: refuse at load time."""
        claimed: dict[int, str] = {}

        def claim(port: int, owner: str) -> None:
            if port in claimed:
                source, _, path = owner.partition(": ")
                self.problem(source, path, f"port {port} is also used by {claimed[port]}")
            else:
                claimed[port] = owner

        for service in config.managed_services():
            proxy = service.managed_proxy
            assert proxy is not None
            bind_port = proxy.config.get("bind_port") or config.proxy_defaults.config.get("bind_port")
            if bind_port:
                claim(int(bind_port), f"{service.source}.connect.proxy.config.bind_port")
            for index, upstream in enumerate(proxy.upstreams):
                claim(
                    upstream.local_bind_port,
                    f"{service.source}.connect.proxy.upstreams[{index}].local_bind_port",
                )
