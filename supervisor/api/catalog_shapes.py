"""Consul 1.5's JSON shapes for discovery (``/v1/health``, ``/v1/catalog``, checks),
built from the catalog's typed entries. Pure functions."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from supervisor.api.shapes import managed_proxy_service_json, service_json
from supervisor.catalog.model import CheckResult, Entry, Instance, Node, RemoteInstance
from supervisor.config.model import thaw


def node_json(node: Node) -> dict[str, Any]:
    index = node.index
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": {"lan": node.address, "wan": node.address},
        "Meta": {"consul-network-segment": "", **node.meta},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def check_json(check: CheckResult, node: str) -> dict[str, Any]:
    return {
        "Node": node,
        "CheckID": check.check_id,
        "Name": check.name,
        "Status": check.status,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": list(check.service_tags),
        "Definition": {},
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    }


def instance_json(instance: Instance | RemoteInstance) -> dict[str, Any]:
    """The instance as Consul's AgentService (without ``ContentHash``)."""
    if isinstance(instance, RemoteInstance):
        return copy.deepcopy(dict(instance.document))
    if instance.is_managed_proxy:
        assert instance.planned is not None
        data = managed_proxy_service_json(instance.planned)
    else:
        data = service_json(instance.service, instance.planned)
    data.pop("ContentHash", None)
    return data


def health_entry_json(entry: Entry) -> dict[str, Any]:
    """One entry of ``/v1/health/service/:s`` (and ``/connect``, prepared queries)."""
    service = instance_json(entry.instance)
    service["CreateIndex"] = service["ModifyIndex"] = entry.index
    return {
        "Node": node_json(entry.node),
        "Service": service,
        "Checks": [check_json(check, entry.node.name) for check in entry.checks],
    }


def catalog_entry_json(entry: Entry) -> dict[str, Any]:
    """One entry of ``/v1/catalog/service/:s`` (Consul's flat CatalogService)."""
    node, service = entry.node, instance_json(entry.instance)
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": {"lan": node.address, "wan": node.address},
        "NodeMeta": {"consul-network-segment": "", **thaw(node.meta)},
        "ServiceKind": service["Kind"],
        "ServiceID": service["ID"],
        "ServiceName": service["Service"],
        "ServiceTags": service["Tags"],
        "ServiceAddress": service["Address"],
        "ServiceWeights": service["Weights"],
        "ServiceMeta": service["Meta"],
        "ServicePort": service["Port"],
        "ServiceEnableTagOverride": service["EnableTagOverride"],
        "ServiceProxyDestination": service.get("ProxyDestination", ""),
        "ServiceProxy": service.get("Proxy", {}),
        "ServiceConnect": service.get("Connect", {}),
        "CreateIndex": entry.index,
        "ModifyIndex": entry.index,
    }


def node_services_json(
    node: Node, entries: Sequence[Entry], narrow: Callable[[Mapping[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """``/v1/catalog/node/:node``: the node, and its services by ID (``narrow`` applies a
    filter to the services, as Consul filters that map's values)."""
    services = {}
    for entry in entries:
        service = instance_json(entry.instance)
        service["CreateIndex"] = service["ModifyIndex"] = entry.index
        services[service["ID"]] = service
    return {"Node": node_json(node), "Services": narrow(services)}
