"""Consul 1.5's JSON shapes for intentions and prepared queries. Pure functions."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from supervisor.catalog.intentions import DEFAULT_NS, Intention
from supervisor.catalog.queries import PreparedQuery, ServiceQuery


def intention_json(intention: Intention) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ID": intention.id,
        "Description": intention.description,
        "SourceNS": DEFAULT_NS,
        "SourceName": intention.source_name,
        "DestinationNS": DEFAULT_NS,
        "DestinationName": intention.destination_name,
        "SourceType": "consul",
        "Action": intention.action.value,
        "DefaultAddr": "",
        "DefaultPort": 0,
        "Meta": dict(intention.meta),
        "Precedence": intention.precedence,
        "CreatedAt": intention.created_at,
        "UpdatedAt": intention.updated_at,
        "CreateIndex": intention.create_index,
        "ModifyIndex": intention.modify_index,
    }
    digest = hashlib.blake2b(
        json.dumps(
            [intention.source_name, intention.destination_name, intention.action.value, dict(intention.meta)],
            sort_keys=True,
        ).encode(),
        digest_size=32,
    ).digest()
    data["Hash"] = base64.b64encode(digest).decode()
    return data


def _optional(value: Any) -> Any:
    if value is None:
        return None
    return dict(value) if hasattr(value, "items") else list(value)


def service_query_json(service: ServiceQuery) -> dict[str, Any]:
    return {
        "Service": service.service,
        "Failover": {
            "NearestN": service.failover_nearest_n,
            "Datacenters": _optional(service.failover_datacenters),
        },
        "OnlyPassing": service.only_passing,
        "IgnoreCheckIDs": _optional(service.ignore_check_ids),
        "Near": service.near,
        "Tags": _optional(service.tags),
        "NodeMeta": _optional(service.node_meta),
        "ServiceMeta": _optional(service.service_meta),
        "Connect": service.connect,
    }


def query_json(query: PreparedQuery, show_token: bool) -> dict[str, Any]:
    definition = query.definition
    template = definition.template
    return {
        "ID": query.id,
        "Name": definition.name,
        "Session": definition.session,
        "Token": definition.token if show_token else ("<hidden>" if definition.token else ""),
        "Service": service_query_json(definition.service),
        "DNS": {"TTL": definition.dns_ttl},
        "Template": {
            "Type": template.type if template else "",
            "Regexp": template.regexp if template else "",
            "RemoveEmptyTags": template.remove_empty_tags if template else False,
        },
        "CreateIndex": query.create_index,
        "ModifyIndex": query.modify_index,
    }
