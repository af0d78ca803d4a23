"""The parsed configuration as frozen value objects.

Built only by ``supervisor.config.build``; everything else treats these as read-only
facts. Opaque maps (proxy ``config``, ``meta``) are deep-frozen mappings; use
``thaw`` to turn them back into plain dicts for JSON output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from supervisor.catalog.status import CheckKind, CheckStatus
from supervisor.errors import ConfigProblem
from supervisor.net import DEFAULT_PORT, join_host_port

JSONMap = Mapping[str, Any]
EMPTY_MAP: JSONMap = MappingProxyType({})

BUILTIN_COMMAND = ("<builtin>",)
"""The symbolic command of the built-in proxy. It is resolved at spawn time to
``sys.executable -m builtin_proxy`` so that moving or upgrading the agent does not count
as a command change (Consul stored an absolute path: issue 4625)."""


def freeze(value: Any) -> Any:
    """Deep-freeze JSON-like data: dicts become read-only mappings, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(key): freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """Undo ``freeze``: plain dicts and lists, ready for ``json.dumps``."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


@dataclass(frozen=True)
class Upstream:
    destination_name: str
    local_bind_port: int
    destination_type: str = "service"
    destination_namespace: str = ""
    datacenter: str = ""
    local_bind_address: str = "127.0.0.1"
    config: JSONMap = field(default_factory=lambda: EMPTY_MAP)


@dataclass(frozen=True)
class CheckDef:
    """A health check: declared on a service, at the top level of a config file, or
    registered through the API (``service_id``: the service it belongs to, "" for the node)."""

    check_id: str
    name: str
    kind: CheckKind
    target: str = ""  # tcp host:port, http URL
    interval: float = 10.0
    timeout: float = 10.0
    ttl: float = 0.0
    status: CheckStatus = CheckStatus.CRITICAL
    notes: str = ""
    method: str = "GET"
    header: JSONMap = field(default_factory=lambda: EMPTY_MAP)
    tls_skip_verify: bool = False
    deregister_critical_service_after: float = 0.0
    service_id: str = ""
    args: tuple[str, ...] = ()  # script checks: the command
    alias_node: str = ""
    alias_service: str = ""


@dataclass(frozen=True)
class ManagedProxyDef:
    """``connect.proxy`` on a service: the agent starts and supervises this proxy."""

    exec_mode: str = "daemon"
    command: tuple[str, ...] | None = None  # None: proxy_defaults, else the built-in proxy
    config: JSONMap = field(default_factory=lambda: EMPTY_MAP)
    upstreams: tuple[Upstream, ...] = ()
    user: str = ""  # "": connect.proxy.user, else the agent's own user
    group: str = ""  # "": the user's own group


@dataclass(frozen=True)
class ConnectProxyDef:
    """The ``proxy`` block of a hand-registered ``kind: connect-proxy`` service (not supervised)."""

    destination_service_name: str
    destination_service_id: str = ""
    local_service_address: str = ""
    local_service_port: int = 0
    config: JSONMap = field(default_factory=lambda: EMPTY_MAP)
    upstreams: tuple[Upstream, ...] = ()


@dataclass(frozen=True)
class ServiceDef:
    """A service from a config file or the API. A ``sidecar_service`` becomes a service of
    its own (``sidecar_for``: its parent's ID) beside its parent. When the agent supervises
    sidecars, the parent also carries the sidecar's proxy as its ``managed_proxy`` with
    ``proxy_service_id`` the sidecar's ID, so supervision treats both kinds alike."""

    id: str
    name: str
    source: str = ""
    kind: str = ""
    tags: tuple[str, ...] = ()
    address: str = ""
    port: int = 0
    meta: JSONMap = field(default_factory=lambda: EMPTY_MAP)
    checks: tuple[CheckDef, ...] = ()
    token: str = ""
    enable_tag_override: bool = False
    weights: tuple[int, int] = (1, 1)
    native: bool = False
    proxy: ConnectProxyDef | None = None
    managed_proxy: ManagedProxyDef | None = None
    sidecar_for: str = ""
    proxy_service_id: str = ""  # a supervised sidecar: its service ID
    proxy_service_name: str = ""

    @property
    def proxy_id(self) -> str:
        """ID of the managed proxy's own service (Consul: ``<service-id>-proxy``)."""
        return self.proxy_service_id or f"{self.id}-proxy"

    @property
    def proxy_name(self) -> str:
        return self.proxy_service_name or f"{self.name}-proxy"

    @property
    def supervises_sidecar(self) -> bool:
        """The managed proxy is this service's sidecar (cataloged as the sidecar service)."""
        return self.managed_proxy is not None and bool(self.proxy_service_id)


SIDECAR_SUFFIX = "-sidecar-proxy"


@dataclass(frozen=True)
class SOAConfig:
    refresh: int = 3600
    retry: int = 600
    expire: int = 86400
    min_ttl: int = 0


@dataclass(frozen=True)
class DNSConfig:
    """Consul 1.5's ``dns_config`` (the keys this agent uses)."""

    allow_stale: bool = True
    max_stale: float = 87600 * 3600.0
    node_ttl: float = 0.0
    service_ttl: JSONMap = field(default_factory=lambda: EMPTY_MAP)  # name or "prefix*": seconds
    enable_truncate: bool = False
    only_passing: bool = False
    udp_answer_limit: int = 3
    a_record_limit: int = 0
    enable_additional_node_meta_txt: bool = True
    soa: SOAConfig = field(default_factory=SOAConfig)

    def service_ttl_for(self, service: str) -> float:
        """Consul's lookup: the exact name, else the longest ``prefix*`` match, else 0."""
        exact = self.service_ttl.get(service)
        if exact is not None:
            return float(exact)
        best, best_length = 0.0, -1
        for key, ttl in self.service_ttl.items():
            if key.endswith("*") and service.startswith(key[:-1]) and len(key) > best_length:
                best, best_length = float(ttl), len(key)
        return best


DEFAULT_PROXY_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_PROXY_LOG_MAX_FILES = 5


@dataclass(frozen=True)
class ProxyDefaults:
    exec_mode: str = "daemon"
    command: tuple[str, ...] | None = None
    config: JSONMap = field(default_factory=lambda: EMPTY_MAP)


@dataclass(frozen=True)
class CAConfig:
    private_key: str = ""
    root_cert: str = ""
    leaf_cert_ttl: float = 72 * 3600.0


@dataclass(frozen=True)
class ACLConfig:
    enabled: bool = False
    default_policy: Literal["allow", "deny"] = "allow"
    master_token: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    """``cluster``: agents of many hosts form one mesh through etcd. No endpoints: the
    single-host agent, exactly as without the block."""

    endpoints: tuple[str, ...] = ()  # etcd client URLs (http:// or https://)
    ca_file: str = ""  # the CA that signed etcd's server certificates
    cert_file: str = ""  # this agent's client certificate for etcd, and its key
    key_file: str = ""
    username: str = ""  # etcd user (its password in password_file, never in the config)
    password_file: str = ""
    key_prefix: str = "/proxy-supervisor/"  # the datacenter's keys live under <prefix><datacenter>/
    lease_ttl: float = 10.0  # a host is seen dead this long after it stops renewing
    reconnect_timeout: float = 72 * 3600.0  # a dead host's records are reaped after this
    ca_signer: bool = False  # this host may hold the CA key and sign every host's leaves
    ca_key_file: str = ""  # signer: the CA key-encryption key (32 random bytes, hex or raw)
    # Consul's top-level key: output-only check changes are written at most this often
    check_update_interval: float = 300.0

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)


@dataclass(frozen=True)
class AgentConfig:
    data_dir: str | None
    dev: bool = False
    log_level: str = "INFO"
    log_json: bool = False
    log_file: str | None = None
    log_rotate_bytes: int = 0  # Consul's keys for the agent's own log file; 0: no size limit
    log_rotate_max_files: int = 0  # 0: keep all rotated files (as Consul); -1: keep none
    node_name: str = "localhost"
    node_id: str | None = None
    datacenter: str = "dc1"
    bind_addr: str = "0.0.0.0"
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_PORT
    http_max_conns_per_client: int = 200  # Consul 1.6+'s limits key; 0: no limit
    http_max_conns: int = 0  # ours: a cap on all API connections; 0: the open-file limit decides
    proxy_min_port: int = 20000
    proxy_max_port: int = 20255
    sidecar_min_port: int = 21000  # 0: no automatic sidecar ports
    sidecar_max_port: int = 21255
    supervise_sidecars: bool = False  # connect.proxy.supervise_sidecars: ours, not Consul's
    dns_host: str = "127.0.0.1"
    dns_port: int = 8600  # -1: no DNS interface
    domain: str = "consul."
    dns: DNSConfig = field(default_factory=DNSConfig)
    connect_enabled: bool = True
    allow_managed_root: bool = False
    allow_managed_api_registration: bool = False
    proxy_user: str = ""  # connect.proxy.user: who managed proxies run as ("": the agent's user)
    proxy_group: str = ""
    proxy_log_max_bytes: int = DEFAULT_PROXY_LOG_MAX_BYTES  # 0: the agent never rotates proxy logs
    proxy_log_max_files: int = DEFAULT_PROXY_LOG_MAX_FILES
    proxy_defaults: ProxyDefaults = field(default_factory=ProxyDefaults)
    ca: CAConfig = field(default_factory=CAConfig)
    acl: ACLConfig = field(default_factory=ACLConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    enable_script_checks: bool = False  # script checks from config files and the API
    enable_local_script_checks: bool = False  # script checks from config files only
    node_meta: JSONMap = field(default_factory=lambda: EMPTY_MAP)
    services: tuple[ServiceDef, ...] = ()
    checks: tuple[CheckDef, ...] = ()  # top-level checks (of the node, or naming a service_id)
    sources: tuple[str, ...] = ()
    notices: tuple[ConfigProblem, ...] = ()

    def service(self, service_id: str) -> ServiceDef | None:
        for service in self.services:
            if service.id == service_id:
                return service
        return None

    def managed_services(self) -> tuple[ServiceDef, ...]:
        return tuple(service for service in self.services if service.managed_proxy is not None)

    @property
    def http_address(self) -> str:
        """host:port of the HTTP API, bracketed for IPv6."""
        return join_host_port(self.http_host, self.http_port)
