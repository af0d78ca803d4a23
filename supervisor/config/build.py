"""Parse, validate and merge config sources into one frozen ``AgentConfig``.

Order of work: each file is parsed and validated on its own (so problems name the file
and key), the cleaned documents are merged (later files win for scalars, ``service`` and
``services`` concatenate), legacy forms are translated, then rules that span files are
checked (duplicate IDs, port clashes). Every problem found is reported in one
ConfigError; nothing is returned unless the whole configuration is valid.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from supervisor.config.definitions import TAGGED, DefinitionBuilder, foreign_datacenters
from supervisor.config.formats import parse_text
from supervisor.config.keys import AGENT
from supervisor.config.limits import key_encryption_key
from supervisor.config.model import (
    ACLConfig,
    AgentConfig,
    CAConfig,
    ClusterConfig,
    DNSConfig,
    ProxyDefaults,
    SOAConfig,
    freeze,
)
from supervisor.config.schema import Context
from supervisor.config.sidecars import (
    NO_SIDECAR_PORTS,
    SidecarPorts,
)
from supervisor.config.sources import Source, collect_sources
from supervisor.errors import ConfigError, ConfigProblem
from supervisor.levels import canonical
from supervisor.net import bare_host

log = logging.getLogger("supervisor.config")

COMMAND_LINE = "<command line>"


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


def _merge_documents(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {tag: [] for tag in TAGGED}
    for document in documents:
        for key, value in document.items():
            if key in TAGGED:
                merged[key].extend(value)
            else:
                merged[key] = _merge_values(merged.get(key), value)
    return merged


def _key_file_shape(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return key_encryption_key(handle.read(256)) is not None
    except OSError:
        return False


def _merge_values(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        result = dict(old)
        for key, value in new.items():
            result[key] = _merge_values(result.get(key), value)
        return result
    return new


class _Builder(DefinitionBuilder):
    """Turns one merged, type-checked document into an AgentConfig (or a ConfigError)."""

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
            cluster=self._cluster(doc.get("cluster", {})),
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

    def _cluster(self, raw: dict[str, Any]) -> ClusterConfig:
        where = "cluster"
        endpoints = tuple(raw.get("etcd_endpoints", ()))
        if not endpoints:
            if raw:
                self.problem("", f"{where}.etcd_endpoints", "give the etcd client URLs to join a cluster")
            return ClusterConfig()
        files = {key: raw.get(key, "") for key in ("ca_file", "cert_file", "key_file", "password_file")}
        if bool(files["cert_file"]) != bool(files["key_file"]):
            self.problem("", f"{where}.cert_file", "cert_file and key_file must be given together")
        if any(url.startswith("https://") for url in endpoints) and not files["ca_file"]:
            self.problem(
                "", f"{where}.ca_file", "https endpoints need the CA file that signed etcd's certificates"
            )
        if bool(raw.get("username")) != bool(files["password_file"]):
            self.problem("", f"{where}.username", "username and password_file must be given together")
        missing = False
        for key, path in files.items():
            if path and not os.path.isfile(path):
                self.problem("", f"{where}.{key}", f"{path}: no such file")
                missing = True
        if not missing:
            self._check_tls(files)
        prefix = raw.get("key_prefix", ClusterConfig.key_prefix)
        if not prefix.startswith("/") or "\x00" in prefix:
            self.problem("", f"{where}.key_prefix", 'must start with "/", such as "/proxy-supervisor/"')
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        ttl = raw.get("lease_ttl", ClusterConfig.lease_ttl)
        if not 2 <= ttl <= 3600:
            self.problem("", f"{where}.lease_ttl", "must be between 2s (etcd's shortest lease) and 1h")
        reconnect = raw.get("reconnect_timeout", ClusterConfig.reconnect_timeout)
        if reconnect < 1:
            self.problem("", f"{where}.reconnect_timeout", "must be at least 1s (Consul's default: 72h)")
        deferral = self.doc.get("check_update_interval", ClusterConfig.check_update_interval)
        signer = raw.get("ca_signer", ClusterConfig.ca_signer)
        key_file = raw.get("ca_key_file", "")
        if signer and not key_file:
            self.problem("", f"{where}.ca_key_file", "a CA signer needs the key-encryption key file")
        if key_file and not os.path.isfile(key_file):
            self.problem("", f"{where}.ca_key_file", f"{key_file}: no such file")
        elif key_file and not _key_file_shape(key_file):
            self.problem(
                "",
                f"{where}.ca_key_file",
                f"{key_file}: expected 32 random bytes (openssl rand -hex 32 > FILE)",
            )
        return ClusterConfig(
            endpoints=endpoints,
            ca_file=files["ca_file"],
            cert_file=files["cert_file"],
            key_file=files["key_file"],
            username=raw.get("username", ""),
            password_file=files["password_file"],
            key_prefix=prefix,
            lease_ttl=ttl,
            reconnect_timeout=reconnect,
            ca_signer=signer,
            ca_key_file=key_file,
            check_update_interval=deferral,
        )

    def _check_tls(self, files: dict[str, str]) -> None:
        """Load the TLS files now, so that a wrong one is a config error, not an outage."""
        import ssl

        try:
            context = ssl.create_default_context(cafile=files["ca_file"] or None)
        except (OSError, ssl.SSLError) as exc:
            self.problem("", "cluster.ca_file", f"{files['ca_file']}: not a CA certificate file ({exc})")
            return
        if files["cert_file"] and files["key_file"]:
            try:
                context.load_cert_chain(files["cert_file"], files["key_file"])
            except (OSError, ssl.SSLError) as exc:
                self.problem(
                    "",
                    "cluster.cert_file",
                    f"{files['cert_file']} with {files['key_file']}: not a matching pair ({exc})",
                )

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
        if config.cluster.enabled:
            self._check_datacenters(config)
            for key, name in (("node_name", config.node_name), ("datacenter", config.datacenter)):
                if "/" in name:
                    self.problem("", key, f"{name!r}: a cluster's keys are made of it; no '/'")

    def _check_datacenters(self, config: AgentConfig) -> None:
        self.problems.extend(foreign_datacenters(config.services, config.datacenter))

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
