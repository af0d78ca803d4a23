"""The keys of a config file: what each means to this tool, and Consul keys we accept and ignore.

Shapes follow Consul 1.2-1.5 agent config files (snake_case). Everything here is pure
data; ``supervisor.config.build`` turns the cleaned documents into frozen dataclasses.
"""

from __future__ import annotations

import re
from typing import Any

from supervisor.config.limits import parse_uint
from supervisor.config.schema import (
    Bool,
    Context,
    Custom,
    Duration,
    Int,
    Invalid,
    List,
    Map,
    Node,
    Obj,
    OneOrMany,
    Str,
    as_int,
    describe,
)
from supervisor.levels import SPELLINGS

LOG_LEVELS = tuple(SPELLINGS)

_SAFE_ID = re.compile(r"[A-Za-z0-9_@:+=-][A-Za-z0-9._@:+=-]{0,199}")


def is_safe_id(value: str) -> bool:
    """Can ``value`` be used as a service or proxy ID (it becomes a file name)?"""
    return _SAFE_ID.fullmatch(value) is not None


def check_safe_id(value: Any, path: str, ctx: Context) -> str:
    """Service IDs and names become file names and URL segments: refuse anything that could
    escape a directory or confuse a path (``../x``, ``a/b``, leading dots, control characters)."""
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {describe(value)}")
    if value == "" and ctx.from_client:
        return value  # Consul's clients send "" for unset: the ID becomes the name
    if not _SAFE_ID.fullmatch(value):
        raise Invalid(
            f"{value!r} cannot be used: IDs and names become file names, so use only letters, "
            "digits and - _ . @ : + = (not starting with a dot, at most 200 characters)"
        )
    return value


def check_port_number(value: Any, path: str, ctx: Context) -> int:
    """A TCP port in a proxy ``config`` map, decoded weakly as Consul did ("1234", 1234.0)."""
    number = as_int(value)
    if number is None and isinstance(value, str):
        number = parse_uint(value.strip(), 5)
    if number is None:
        raise Invalid(f"expected a port number, got {describe(value)}")
    if not 0 <= number <= 65535:
        raise Invalid(f"{number} is not a TCP port (0-65535)")
    return number


def check_milliseconds(value: Any, path: str, ctx: Context) -> int:
    """``*_ms`` timeouts: any non-negative number (Consul 1.3-1.5 silently ignored floats)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"expected a number of milliseconds, got {describe(value)}")
    if value < 0:
        raise Invalid(f"{value} is negative")
    return int(value)


def check_command(value: Any, path: str, ctx: Context) -> list[str]:
    """A proxy command: a non-empty list of strings (a single string is one argument)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid(f"expected a non-empty list of strings, got {describe(value)}")
    for index, part in enumerate(value):
        if not isinstance(part, str):
            raise Invalid(f"element {index}: expected a string, got {describe(part)}")
    if not value[0]:
        raise Invalid("the program (first element) is empty")
    return list(value)


_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?i?b?)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def check_size(value: Any, path: str, ctx: Context) -> int:
    """A size in bytes: an integer, or a string with a unit ("10MB", "512KiB", "1g")."""
    number = as_int(value)
    if number is None and isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        unit = (match.group(2) or "").lower()
        factor = _SIZE_UNITS[unit[:1]] if "i" not in unit else 1024 ** " kmgt".index(unit[0])
        number = int(match.group(1)) * factor
    if number is None:
        raise Invalid(f'expected a size such as 10485760 or "10MiB", got {describe(value)}')
    if number < 0:
        raise Invalid(f"{number} is negative")
    return number


def check_exec_mode(value: Any, path: str, ctx: Context) -> str:
    if value == "daemon" or value == "":
        return "daemon"
    if value == "script":
        raise Invalid(
            '"script" is not supported: Consul accepted it but never ran script proxies; '
            'use "daemon" (a long-running command that does not fork into the background)'
        )
    raise Invalid(f'{describe(value)} is not a valid exec mode: use "daemon"')


# Keys inside a proxy's opaque ``config`` map that the agent itself reads.
PROXY_CONFIG_KNOWN: dict[str, Node] = {
    "bind_port": Custom(check_port_number),
    "bind_address": Str(),
    "local_service_address": Str(),
    "tcp_check_address": Str(),
    "disable_tcp_check": Bool(),
    "handshake_timeout_ms": Custom(check_milliseconds),
    "local_connect_timeout_ms": Custom(check_milliseconds),
}

LEGACY_UPSTREAM_KEYS = (
    "destination_name",
    "destination_type",
    "destination_namespace",
    "destination_datacenter",
    "datacenter",
    "local_bind_address",
    "local_bind_port",
)


def check_proxy_config(value: Any, path: str, ctx: Context) -> dict[str, Any]:
    """Validate the keys of a proxy ``config`` map that the agent uses; pass the rest through."""
    if not isinstance(value, dict):
        raise Invalid(f"expected an object, got {describe(value)}")
    cleaned: dict[str, Any] = {}
    for key, item in value.items():
        node = PROXY_CONFIG_KNOWN.get(key)
        if node is not None:
            cleaned[key] = node.validate(item, f"{path}.{key}", ctx)
        elif key == "upstreams":
            cleaned[key] = List(LEGACY_UPSTREAM).validate(item, f"{path}.{key}", ctx)
        else:
            cleaned[key] = item
    return cleaned


def check_legacy_upstream(value: Any, path: str, ctx: Context) -> dict[str, Any]:
    """1.2-style ``config.upstreams`` entries: known keys checked, unknown keys kept as config."""
    if not isinstance(value, dict):
        raise Invalid(f"expected an object, got {describe(value)}")
    known = {key: value[key] for key in LEGACY_UPSTREAM_KEYS if key in value}
    extra = {key: item for key, item in value.items() if key not in LEGACY_UPSTREAM_KEYS}
    cleaned = UPSTREAM.validate({**known, "config": extra}, path, ctx)
    return cleaned if isinstance(cleaned, dict) else {}


UPSTREAM = Obj(
    {
        "destination_name": Str(),
        "destination_type": Str(("service", "prepared_query")),
        "destination_namespace": Str(),
        "datacenter": Str(),
        "local_bind_address": Str(),
        "local_bind_port": Int(1, 65535),
        "config": Custom(check_proxy_config),
    },
    rename={"destination_datacenter": "datacenter"},
    required=("destination_name", "local_bind_port"),
)
# Declared after UPSTREAM because the legacy form reuses it.
LEGACY_UPSTREAM = Custom(check_legacy_upstream)
UPSTREAM.fields["destination_datacenter"] = UPSTREAM.fields["datacenter"]


def check_account(value: Any, path: str, ctx: Context) -> str:
    """A user or group: a name or a number (resolved on the host when proxies start)."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise Invalid(f"expected a user or group name, got {describe(value)}")
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?", text):
        raise Invalid(f"{text!r} is not a user or group name")
    return text


MANAGED_PROXY = Obj(
    {
        "exec_mode": Custom(check_exec_mode),
        "command": Custom(check_command),
        "config": Custom(check_proxy_config),
        "upstreams": List(UPSTREAM),
        "user": Custom(check_account),
        "group": Custom(check_account),
    }
)

CHECK = Obj(
    {
        "id": Str(),
        "check_id": Str(),
        "name": Str(),
        "notes": Str(),
        "status": Str(("passing", "warning", "critical")),
        "tcp": Str(),
        "http": Str(),
        "method": Str(),
        "header": Map(List(Str(), allow_single=True)),
        "tls_skip_verify": Bool(),
        "ttl": Duration(),
        "interval": Duration(),
        "timeout": Duration(),
        "deregister_critical_service_after": Duration(),
        "service_id": Str(),
        # Kinds this tool does not run; kept so the check can be reported and skipped.
        "args": List(Str()),
        "script": Str(),
        "docker_container_id": Str(),
        "shell": Str(),
        "grpc": Str(),
        "grpc_use_tls": Bool(),
        "alias_node": Str(),
        "alias_service": Str(),
    },
    rename={"checkid": "check_id", "script_args": "args", "scriptargs": "args"},
    ignored={
        "token": "check tokens are not used",
        "output_max_size": "not used",
        "body": "not used",
    },
)
CHECK.fields["script_args"] = CHECK.fields["args"]

CONNECT_PROXY_BLOCK = Obj(
    {
        "destination_service_name": Str(),
        "destination_service_id": Str(),
        "local_service_address": Str(),
        "local_service_port": Int(0, 65535),
        "config": Custom(check_proxy_config),
        "upstreams": List(UPSTREAM),
    }
)


def _refuse(message: str, *, unset: tuple[Any, ...] = ("", False)) -> Custom:
    def refuse(value: Any, path: str, ctx: Context) -> Any:
        if ctx.from_client and any(value == blank and type(value) is type(blank) for blank in unset):
            return None  # what a client sends for "unset"
        raise Invalid(message)

    return Custom(refuse)


_SERVICE_FIELDS: dict[str, Node] = {
    "name": Custom(check_safe_id),
    "kind": Str(("", "connect-proxy")),
    "tags": List(Str()),
    "address": Str(),
    "port": Int(0, 65535),
    "meta": Map(Str()),
    "check": OneOrMany(CHECK),
    "checks": List(CHECK),
    "token": Str(),
    "enable_tag_override": Bool(),
    "weights": Obj({"passing": Int(1), "warning": Int(0)}),  # Consul: Passing must be > 0
    "proxy": CONNECT_PROXY_BLOCK,
}

# Consul 1.3+'s shorthand: a connect-proxy service registered with (and named after) its
# parent. What cannot be overridden is refused with Consul's reasons.
SIDECAR_SERVICE = Obj(
    {
        **_SERVICE_FIELDS,
        "id": _refuse(
            "a sidecar_service cannot specify an ID: the agent names it <service-id>-sidecar-proxy"
        ),
        "connect": Obj(
            {
                "native": _refuse("a sidecar cannot also be Connect-native, only typical services"),
                "proxy": _refuse("a sidecar_service cannot have a managed proxy"),
                # Any nested block at all, even {}: Consul refuses every non-null one.
                "sidecar_service": _refuse("a sidecar_service cannot have a nested one", unset=()),
            }
        ),
    },
    ignored={"tagged_addresses": "not used", "namespace": "namespaces are not supported"},
)

SERVICE = Obj(
    {
        **_SERVICE_FIELDS,
        "id": Custom(check_safe_id),
        "proxy_destination": Str(),
        "connect": Obj({"native": Bool(), "proxy": MANAGED_PROXY, "sidecar_service": SIDECAR_SERVICE}),
    },
    required=("name",),
    ignored={"tagged_addresses": "not used", "namespace": "namespaces are not supported"},
)

_NOT_USED = "a Consul setting this tool does not use"

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_domain(value: Any, path: str, ctx: Context) -> str:
    """The DNS domain the agent answers for (``consul.``): one or more labels."""
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {describe(value)}")
    labels = value.rstrip(".").split(".")
    if not value.rstrip(".") or len(value) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
        raise Invalid(f"{value[:80]!r} is not a DNS domain: use labels of letters, digits and -, as consul.")
    return value.rstrip(".").lower() + "."


DNS_CONFIG = Obj(
    {
        "allow_stale": Bool(),
        "max_stale": Duration(),
        "node_ttl": Duration(),
        "service_ttl": Map(Duration()),
        "enable_truncate": Bool(),
        "only_passing": Bool(),
        "udp_answer_limit": Int(1),
        "a_record_limit": Int(0),
        "enable_additional_node_meta_txt": Bool(),
        "soa": Obj({"refresh": Int(0), "retry": Int(0), "expire": Int(0), "min_ttl": Int(0)}),
    },
    ignored={
        "recursor_timeout": "the agent answers only for its own domain (it does not recurse)",
        "use_cache": "answers come from the agent's own catalog, always current",
        "cache_max_age": "answers come from the agent's own catalog, always current",
        "prefer_namespace": "namespaces are not supported",
        "disable_compression": "answers are always compressed (dnspython's wire format)",
    },
)


def _unused(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, _NOT_USED)


# Consul 1.2-1.5 top-level keys that have no meaning here (servers, gossip, DNS, TLS for
# RPC, UI …). Accepted so that an unmodified Consul config loads; each use is a notice.
CONSUL_ONLY_TOP_LEVEL = tuple(
    """
    acl_agent_master_token acl_agent_token acl_down_policy acl_enable_key_list_policy
    acl_replication_token acl_token acl_ttl acl_enforce_version_8 advertise_addr
    advertise_addr_ipv4 advertise_addr_ipv6 advertise_addr_wan advertise_addr_wan_ipv4
    advertise_addr_wan_ipv6 advertise_addrs autopilot bootstrap bootstrap_expect ca_file
    ca_path cert_file key_file config_entries
    disable_anonymous_signature disable_coordinates disable_host_node_id
    disable_http_unprintable_char_filter disable_keyring_file disable_remote_exec
    disable_update_check discard_check_output discovery_max_stale
    enable_acl_replication enable_agent_tls_for_checks enable_central_service_config
    enable_debug enable_syslog encrypt
    encrypt_verify_incoming encrypt_verify_outgoing gossip_lan gossip_wan http_config
    leave_on_terminate log_rotate_duration
    non_voting_server performance pid_file primary_datacenter protocol
    raft_protocol raft_snapshot_threshold raft_snapshot_interval raft_trailing_logs
    reconnect_timeout reconnect_timeout_wan recursors rejoin_after_leave retry_interval
    retry_interval_wan retry_join retry_max retry_max_wan retry_join_wan segment segments
    serf_lan serf_wan server server_name session_ttl_min skip_leave_on_interrupt start_join
    start_join_wan syslog_facility tagged_addresses telemetry tls_cipher_suites
    tls_min_version tls_prefer_server_cipher_suites translate_wan_addrs ui ui_dir
    ui_content_path unix_sockets verify_incoming verify_incoming_https verify_incoming_rpc
    verify_outgoing verify_server_hostname watches snapshot_agent ae_interval
    check_deregister_interval_min check_reap_interval consul revision segment_limit
    segment_name_limit sync_coordinate_interval_min sync_coordinate_rate_target version
    version_prerelease audit alt_domain default_query_time max_query_time cache auto_encrypt
    dns
    """.split()
)

ACL = Obj(
    {
        "enabled": Bool(),
        "default_policy": Str(("allow", "deny")),
        "tokens": Obj(
            {"master": Str()},
            ignored=_unused(
                "agent",
                "agent_master",
                "default",
                "replication",
                "managed_service_provider",
            ),
        ),
    },
    ignored=_unused(
        "down_policy",
        "enable_token_persistence",
        "policy_ttl",
        "token_ttl",
        "role_ttl",
        "enable_key_list_policy",
        "enable_token_replication",
        "disabled_ttl",
    ),
)

CONNECT = Obj(
    {
        "enabled": Bool(),
        "proxy": Obj(
            {
                "allow_managed_root": Bool(),
                "allow_managed_api_registration": Bool(),
                "supervise_sidecars": Bool(),
                "log_max_bytes": Custom(check_size),
                "log_max_files": Int(0, 1000),
                "user": Custom(check_account),
                "group": Custom(check_account),
            }
        ),
        "proxy_defaults": Obj(
            {
                "exec_mode": Custom(check_exec_mode),
                "daemon_command": Custom(check_command),
                "command": Custom(check_command),
                "config": Custom(check_proxy_config),
            },
            ignored={"script_command": "script proxies are not supported (exec_mode must be daemon)"},
        ),
        "ca_config": Obj(
            {"private_key": Str(), "root_cert": Str(), "leaf_cert_ttl": Duration()},
            ignored=_unused(
                "rotation_period",
                "csr_max_per_second",
                "csr_max_concurrent",
                "private_key_type",
                "private_key_bits",
                "cluster_id",
            ),
        ),
        "ca_provider": Str(("consul",)),
    },
    ignored={"enable_mesh_gateway_wan_federation": _NOT_USED},
)


def check_etcd_endpoint(value: Any, path: str, ctx: Context) -> str:
    """An etcd client URL: scheme, host and port, nothing else (the gateway's paths are ours)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or not value:
        raise Invalid(f'expected a URL such as "https://10.0.0.1:2379", got {describe(value)}')
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise Invalid(f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise Invalid(f'{value!r}: give scheme, host and port, such as "https://10.0.0.1:2379"')
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise Invalid(f"{value!r}: only scheme, host and port (no path, query or user)")
    return value.rstrip("/")


CLUSTER = Obj(
    {
        "etcd_endpoints": List(Custom(check_etcd_endpoint), allow_single=True),
        "ca_file": Str(),
        "cert_file": Str(),
        "key_file": Str(),
        "username": Str(),
        "password_file": Str(),
        "key_prefix": Str(),
        "lease_ttl": Duration(),
        "reconnect_timeout": Duration(),
        "ca_signer": Bool(),
        "ca_key_file": Str(),
    }
)

AGENT = Obj(
    {
        "data_dir": Str(),
        "log_level": Str(LOG_LEVELS, casefold=True),
        "log_json": Bool(),
        "log_file": Str(),
        "log_rotate_bytes": Custom(check_size),
        "log_rotate_max_files": Int(-1, 100000),
        "node_name": Str(),
        "node_id": Str(),
        "datacenter": Str(),
        "bind_addr": Str(),
        "client_addr": Str(),
        "addresses": Obj({"http": Str(), "dns": Str()}, ignored={"https": _NOT_USED, "grpc": _NOT_USED}),
        "ports": Obj(
            {
                "http": Int(0, 65535),
                "dns": Int(-1, 65535),
                "proxy_min_port": Int(1, 65535),
                "proxy_max_port": Int(1, 65535),
                "sidecar_min_port": Int(0, 65535),
                "sidecar_max_port": Int(0, 65535),
            },
            ignored=_unused("https", "serf_lan", "serf_wan", "server", "grpc", "rpc"),
        ),
        "domain": Custom(check_domain),
        "dns_config": DNS_CONFIG,
        "connect": CONNECT,
        "limits": Obj(
            {"http_max_conns_per_client": Int(0), "http_max_conns": Int(0)},
            ignored=_unused(
                "rpc_rate",
                "rpc_max_burst",
                "rpc_max_conns_per_client",
                "rpc_handshake_timeout",
                "https_handshake_timeout",
                "kv_max_value_size",
                "txn_max_req_len",
            ),
        ),
        "acl": ACL,
        "cluster": CLUSTER,
        "check_update_interval": Duration(),
        "acl_master_token": Str(),
        "acl_default_policy": Str(("allow", "deny")),
        "acl_datacenter": Str(),
        "enable_script_checks": Bool(),
        "enable_local_script_checks": Bool(),
        "node_meta": Map(Str()),
        "service": OneOrMany(SERVICE),
        "services": List(SERVICE),
        "check": OneOrMany(CHECK),
        "checks": List(CHECK),
    },
    ignored=dict.fromkeys(CONSUL_ONLY_TOP_LEVEL, _NOT_USED),
)
