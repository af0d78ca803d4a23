"""Managed proxies to sidecar services: the migration Consul 1.6 forced on its users.

``convert_document`` rewrites one parsed config document: every service's
``connect.proxy`` becomes a ``connect.sidecar_service`` that keeps the proxy's port,
upstreams and config, and everything else in the document stays as written. What has no
equivalent in a sidecar registration is reported as a ``Note`` instead of dropped. Pure:
reading and writing files is ``supervisor/cli/convert_command.py``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.config.formats import RepeatedBlocks
from supervisor.config.schema import find_key as _key
from supervisor.config.schema import merge_repeated
from supervisor.net import split_host_port


@dataclass(frozen=True)
class Note:
    """Something of a managed proxy that the sidecar does not carry, or carries differently."""

    path: str  # the service's key path in the document
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Conversion:
    document: Any
    converted: tuple[str, ...]  # key paths of the services rewritten
    notes: tuple[Note, ...]


def _get(mapping: Mapping[str, Any], name: str, default: Any = None) -> Any:
    key = _key(mapping, name)
    return mapping[key] if key is not None else default


def _object(mapping: dict[str, Any], name: str) -> Any:
    """The object under ``name``, repeated HCL blocks (``connect { } connect { }``) merged
    into one in place, as the agent reads them."""
    key = _key(mapping, name)
    if key is None:
        return None
    value = mapping[key]
    if isinstance(value, RepeatedBlocks) and all(isinstance(block, dict) for block in value):
        value = mapping[key] = merge_repeated(list(value))
    return value


def _pop(mapping: dict[str, Any], name: str, default: Any = None) -> Any:
    key = _key(mapping, name)
    return mapping.pop(key) if key is not None else default


def convert_document(document: Any, allocated_ports: Mapping[str, int] | None = None) -> Conversion:
    """Rewrite the managed proxies of ``document``. ``allocated_ports``: proxy ID -> the
    port the agent assigned it (from its data_dir), so automatically assigned ports are
    kept too."""
    result = copy.deepcopy(document)
    converted: list[str] = []
    notes: list[Note] = []
    if not isinstance(result, dict):
        return Conversion(result, (), ())
    for path, service in _services(result):
        if _convert_service(service, path, allocated_ports or {}, notes):
            converted.append(path)
    connect = _get(result, "connect")
    if converted and isinstance(connect, dict) and _key(connect, "proxy_defaults") is not None:
        notes.append(
            Note(
                "connect.proxy_defaults",
                "kept: Consul 1.6+ has no managed proxies to apply it to; here it is the command "
                "of sidecars the agent supervises (connect.proxy.supervise_sidecars)",
            )
        )
    return Conversion(result, tuple(converted), tuple(notes))


def _services(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for name in ("service", "services"):
        key = _key(document, name)
        if key is None:
            continue
        value = document[key]
        if isinstance(value, dict):
            found.append((key, value))
        elif isinstance(value, list | RepeatedBlocks):
            found += [(f"{key}[{i}]", entry) for i, entry in enumerate(value) if isinstance(entry, dict)]
    return found


def _convert_service(
    service: dict[str, Any], path: str, allocated: Mapping[str, int], notes: list[Note]
) -> bool:
    connect = _object(service, "connect")
    if not isinstance(connect, dict) or not isinstance(_object(connect, "proxy"), dict):
        return False
    if _key(connect, "sidecar_service") is not None:
        notes.append(Note(path, "has both connect.proxy and connect.sidecar_service: left as it is"))
        return False
    proxy: dict[str, Any] = dict(_pop(connect, "proxy"))
    service_id = str(_get(service, "id") or _get(service, "name") or "")
    config = dict(_object(proxy, "config") or {})
    upstreams = _get(proxy, "upstreams") or _pop(config, "upstreams") or []
    sidecar: dict[str, Any] = {}
    proxy_block: dict[str, Any] = {}

    port = _port(config, f"{service_id}-proxy", allocated, path, notes)
    if port:
        sidecar["port"] = port
    bind_address = _pop(config, "bind_address")
    if bind_address and bind_address not in ("0.0.0.0", "::"):
        sidecar["address"] = bind_address
        notes.append(Note(path, f"the proxy listened on {bind_address}: now the sidecar's address"))
    local = _pop(config, "local_service_address")
    if local:
        try:
            host, port = split_host_port(str(local))
            proxy_block["local_service_address"] = host
            proxy_block["local_service_port"] = port
        except ValueError:
            proxy_block["local_service_address"] = str(local)
    if upstreams:
        proxy_block["upstreams"] = upstreams
    if config:
        proxy_block["config"] = config
    if proxy_block:
        sidecar["proxy"] = proxy_block

    notes += _not_carried(proxy, service_id, path)
    connect["sidecar_service"] = sidecar
    return True


def _port(
    config: dict[str, Any], proxy_id: str, allocated: Mapping[str, int], path: str, notes: list[Note]
) -> int:
    """The sidecar's port: the proxy's ``bind_port``, else the one the agent assigned."""
    bind_port = _pop(config, "bind_port")
    if isinstance(bind_port, str) and bind_port.isascii() and bind_port.isdigit():
        bind_port = int(bind_port)
    if isinstance(bind_port, int) and not isinstance(bind_port, bool) and 0 < bind_port < 65536:
        return bind_port
    if bind_port not in (None, 0, ""):
        config["bind_port"] = bind_port
        notes.append(Note(path, f"bind_port {bind_port!r} is not a port number: left in the proxy's config"))
    if proxy_id in allocated:
        notes.append(
            Note(path, f"kept port {allocated[proxy_id]}, which the agent had assigned (from its data_dir)")
        )
        return allocated[proxy_id]
    notes.append(
        Note(
            path,
            "the managed proxy's port was assigned by the agent (proxy_min_port..proxy_max_port); "
            "the sidecar gets one of sidecar_min_port..sidecar_max_port (21000-21255) unless you set "
            "port (convert -data-dir DIR keeps the assigned one)",
        )
    )
    return 0


def _not_carried(proxy: Mapping[str, Any], service_id: str, path: str) -> list[Note]:
    """What of a managed proxy a sidecar registration has no place for."""
    notes: list[Note] = []
    command = _get(proxy, "command")
    if command:
        shown = " ".join(str(part) for part in command) if isinstance(command, list) else str(command)
        notes.append(
            Note(
                path,
                f"command {shown!r} is not carried over: a sidecar's proxy is started by you "
                f"(e.g. `{shown} -sidecar-for {service_id}`), or by this agent with "
                "connect.proxy.supervise_sidecars and connect.proxy_defaults.command",
            )
        )
    exec_mode = _get(proxy, "exec_mode")
    if exec_mode and exec_mode != "daemon":
        notes.append(Note(path, f"exec_mode {exec_mode!r} has no sidecar equivalent: dropped"))
    notes.extend(
        Note(
            path,
            f"connect.proxy.{ours} (proxy-supervisor's) is not carried over: sidecars the agent "
            f"supervises run as connect.proxy.{ours} of the agent's config",
        )
        for ours in ("user", "group")
        if _get(proxy, ours)
    )
    return notes
