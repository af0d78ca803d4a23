"""Consul 1.5's JSON shapes for the agent endpoints, built from an ``AgentView``.

Pure functions: the handlers in ``agent_endpoints`` only pick the view, check access
and call these. Field names and nesting follow Consul's ``api`` package so that Consul
clients decode our answers unchanged.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Collection, Sequence
from typing import Any

from supervisor.api.blocking import content_hash
from supervisor.catalog.model import CheckResult, Node
from supervisor.config.model import ServiceDef, Upstream, thaw
from supervisor.net import split_host_port
from supervisor.supervision.desired import PlannedProxy
from supervisor.supervision.view import AgentView, ProxyStatus
from supervisor.version import __version__

CONSUL_COMPATIBLE_VERSION = "1.5.3"


def upstream_json(upstream: Upstream) -> dict[str, Any]:
    return {
        "DestinationType": upstream.destination_type,
        "DestinationNamespace": upstream.destination_namespace,
        "DestinationName": upstream.destination_name,
        "Datacenter": upstream.datacenter,
        "LocalBindAddress": upstream.local_bind_address,
        "LocalBindPort": upstream.local_bind_port,
        "Config": thaw(upstream.config),
    }


def _base_service(service: ServiceDef) -> dict[str, Any]:
    return {
        "Kind": service.kind,
        "ID": service.id,
        "Service": service.name,
        "Tags": list(service.tags),
        "Meta": thaw(service.meta),
        "Port": service.port,
        "Address": service.address,
        "Weights": {"Passing": service.weights[0], "Warning": service.weights[1]},
        "EnableTagOverride": service.enable_tag_override,
    }


def service_json(service: ServiceDef, planned: PlannedProxy | None) -> dict[str, Any]:
    """A service as ``/v1/agent/services`` lists it (with its managed proxy, if any)."""
    data = _base_service(service)
    if service.proxy is not None:  # a hand-registered connect-proxy
        proxy = service.proxy
        data["ProxyDestination"] = proxy.destination_service_name
        data["Proxy"] = {
            "DestinationServiceName": proxy.destination_service_name,
            "DestinationServiceID": proxy.destination_service_id,
            "LocalServiceAddress": proxy.local_service_address,
            "LocalServicePort": proxy.local_service_port,
            "Config": thaw(proxy.config),
            "Upstreams": [upstream_json(upstream) for upstream in proxy.upstreams],
        }
    if planned is not None:
        data["Connect"] = {
            "Proxy": {
                "ExecMode": planned.spec.exec_mode,
                "Command": list(planned.spec.command),
                "Config": thaw(planned.config),
                "Upstreams": [upstream_json(upstream) for upstream in planned.upstreams],
            }
        }
    elif service.native:
        data["Connect"] = {"Native": True}
    data["ContentHash"] = content_hash(data)
    return data


def managed_proxy_service_json(planned: PlannedProxy) -> dict[str, Any]:
    """The ``<service>-proxy`` registration the agent makes for a managed proxy."""
    service = planned.service
    try:
        local_address, local_port = split_host_port(str(planned.config.get("local_service_address", "")))
    except ValueError:
        local_address, local_port = "", service.port
    bind = planned.bind_address if planned.bind_address not in ("0.0.0.0", "::", "[::]") else ""
    data: dict[str, Any] = {
        "Kind": "connect-proxy",
        "ID": service.proxy_id,
        "Service": service.proxy_name,
        "Tags": [],
        "Meta": {},
        "Port": planned.port,
        "Address": bind,
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "ProxyDestination": service.name,
        "Proxy": {
            "DestinationServiceName": service.name,
            "DestinationServiceID": service.id,
            "LocalServiceAddress": local_address,
            "LocalServicePort": local_port,
            "Config": thaw(planned.config),
            "Upstreams": [upstream_json(upstream) for upstream in planned.upstreams],
        },
    }
    data["ContentHash"] = content_hash(data)
    return data


def agent_services(
    view: AgentView, registered: Sequence[ServiceDef] = (), hidden: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    """Every service registered on this agent, keyed by ID (managed proxies included;
    ``hidden``: config-file services deregistered through the API until a reload)."""
    services: dict[str, dict[str, Any]] = {}
    for service in (*(s for s in view.config.services if s.id not in hidden), *registered):
        managed = service.managed_proxy is not None and not service.supervises_sidecar
        planned = view.proxies.get(service.proxy_id) if managed else None
        services[service.id] = service_json(service, planned)
        if planned is not None:
            services[planned.proxy_id] = managed_proxy_service_json(planned)
    return services


def proxy_config_json(planned: PlannedProxy) -> dict[str, Any]:
    """``GET /v1/agent/connect/proxy/:id``: the managed proxy's effective configuration."""
    service = planned.service
    data: dict[str, Any] = {
        "ProxyServiceID": planned.proxy_id,
        "TargetServiceID": service.id,
        "TargetServiceName": service.name,
        "ContentHash": "",
        "ExecMode": planned.spec.exec_mode,
        "Command": list(planned.spec.command),
        "Config": thaw(planned.config),
        "Upstreams": [upstream_json(upstream) for upstream in planned.upstreams],
    }
    data["ContentHash"] = content_hash(data)
    return data


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat().replace("+00:00", "Z")


def proxy_status_json(
    status: ProxyStatus, now_monotonic: float, check: CheckResult | None = None
) -> dict[str, Any]:
    """One entry of ``GET /v1/agent/connect/proxies`` (ours, not Consul's); ``check`` is
    its listening check, whose verdict shows a proxy that runs but does not serve."""
    uptime = now_monotonic - status.started_monotonic if status.started_monotonic is not None else None
    next_in = (
        max(0.0, status.next_attempt_monotonic - now_monotonic)
        if status.next_attempt_monotonic is not None
        else None
    )
    return {
        "ProxyServiceID": status.proxy_id,
        "TargetServiceID": status.service_id,
        "State": status.state,
        "Pid": status.pid,
        "Generation": status.generation,
        "Restarts": status.restarts,
        "Adopted": status.adopted,
        "LastExit": status.last_exit,
        "StartedAt": _iso(status.started_wall),
        "UptimeSeconds": round(uptime, 3) if uptime is not None else None,
        "NextAttemptInSeconds": round(next_in, 3) if next_in is not None else None,
        "NextAttemptAt": _iso(time.time() + next_in) if next_in is not None else None,
        "BlockedReason": status.blocked_reason,
        "Port": status.port,
        "Command": list(status.command),
        "StdoutLog": status.stdout_log,
        "StderrLog": status.stderr_log,
        "Check": {"Status": check.status, "Output": check.output} if check is not None else None,
    }


SERF_LAN_PORT = 8301  # Consul's; this agent speaks no Serf, the member is described as Consul would


def member_json(view: AgentView) -> dict[str, Any]:
    """This agent as a Serf member (``/v1/agent/members``, ``/v1/agent/self``): a client
    node, alive (Status 1), with Consul 1.5's protocol numbers."""
    config = view.config
    bind = config.bind_addr
    address = bind if bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return _member(config.node_name, address, config.datacenter, view.node_id, 1)


def remote_member_json(node: Node, *, alive: bool) -> dict[str, Any]:
    """Another host of the cluster: alive (1) while its lease holds, else failed (4)."""
    return _member(node.name, node.address, node.datacenter, node.node_id, 1 if alive else 4)


def _member(name: str, address: str, datacenter: str, node_id: str, status: int) -> dict[str, Any]:
    return {
        "Name": name,
        "Addr": address,
        "Port": SERF_LAN_PORT,
        "Tags": {
            "role": "node",
            "dc": datacenter,
            "id": node_id,
            "segment": "",
            "vsn": "2",
            "vsn_min": "2",
            "vsn_max": "3",
            "build": f"{CONSUL_COMPATIBLE_VERSION}:proxy-supervisor-{__version__}",
        },
        "Status": status,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


def agent_self_json(view: AgentView) -> dict[str, Any]:
    config = view.config
    return {
        "Config": {
            "Datacenter": config.datacenter,
            "NodeName": config.node_name,
            "NodeID": view.node_id,
            "Revision": "",
            "Server": False,
            "Version": CONSUL_COMPATIBLE_VERSION,
        },
        "DebugConfig": {
            "DataDir": config.data_dir or "",
            "ConnectEnabled": config.connect_enabled,
            "ConnectProxyAllowManagedRoot": config.allow_managed_root,
            "ConnectProxyAllowManagedAPIRegistration": config.allow_managed_api_registration,
            "ConnectProxyBindMinPort": config.proxy_min_port,
            "ConnectProxyBindMaxPort": config.proxy_max_port,
            "ACLsEnabled": config.acl.enabled,
            "LogLevel": config.log_level,
        },
        "Member": member_json(view),
        "Meta": {"consul-network-segment": "", **thaw(config.node_meta)},
        "Stats": {
            "agent": {"managed_proxies": str(len(view.proxies))},
            "proxy-supervisor": {
                "version": __version__,
                "reload_error": view.reload_error or "",
                "api_address": view.api_address,
            },
        },
    }
