"""What an agent publishes about its host, as etcd values, and how others read them back.

Values are compact JSON. A service record carries the instance as Consul's AgentService
(what ``/v1/catalog`` and ``/v1/health`` show elsewhere; the renderer is handed in, so
this layer knows no HTTP shapes) plus the fields discovery selects by. A managed proxy's
command line and config stay on its host: other hosts see the proxy's registration, not
how it is run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from supervisor.catalog.model import CheckResult, Entry, Instance, Node, RemoteInstance
from supervisor.catalog.status import CheckStatus
from supervisor.cluster.layout import Layout
from supervisor.config.limits import MAX_DEPTH, no_constant

T = TypeVar("T", dict[str, Any], list[Any])
Render = Callable[[Instance], dict[str, Any]]  # an instance as Consul's AgentService


class BadRecord(ValueError):
    """A value in etcd that is not what an agent writes: skipped (and logged once)."""


def encode(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


RECORD_DEPTH = MAX_DEPTH + 8  # an API body's deepest, inside the record that carries it


def decode(data: bytes) -> dict[str, Any]:
    """A record's JSON object. Refused (``BadRecord``): what no agent writes, including
    NaN/Infinity and nesting deeper than any API body may be (the readers that copy or walk
    a record would end in a RecursionError on every agent)."""
    try:
        value = json.loads(data, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRecord(f"not JSON an agent writes: {str(exc)[:100]}") from None
    if not isinstance(value, dict):
        raise BadRecord("not a JSON object")
    if _nested_deeper(value, RECORD_DEPTH):
        raise BadRecord(f"nested more than {RECORD_DEPTH} levels deep")
    return value


def _nested_deeper(value: dict[str, Any], limit: int) -> bool:
    """Whether objects and lists nest deeper than ``limit`` (a walk over containers only:
    this runs for every record of the mirror)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > limit:
            return True
        children = container.values() if type(container) is dict else container
        stack.extend((child, depth + 1) for child in children if type(child) is dict or type(child) is list)
    return False


# -- this host's records ----------------------------------------------------------------------


def meta_record(index_base: int) -> bytes:
    """``meta/cluster``: the cluster's index base, written once by the first agent."""
    return encode({"schema": 1, "index_base": index_base})


def read_index_base(value: bytes) -> int:
    """The index base a ``meta/cluster`` value holds (0: none usable)."""
    try:
        base = int(decode(value).get("index_base", 0))
    except (BadRecord, TypeError, ValueError, OverflowError):
        return 0
    return max(base, 0)


def node_record(node: Node) -> dict[str, Any]:
    return {
        "ID": node.node_id,
        "Node": node.name,
        "Address": node.address,
        "Datacenter": node.datacenter,
        "Meta": dict(node.meta),
    }


def service_record(instance: Instance, render: Render) -> dict[str, Any]:
    document = render(instance)
    connect = document.get("Connect")
    if isinstance(connect, dict) and "Proxy" in connect:
        document["Connect"] = {key: value for key, value in connect.items() if key != "Proxy"}
    return {
        "Service": document,
        "ConnectTarget": instance.connect_target,
        "ConnectTags": list(instance.connect_tags),
    }


def check_record(check: CheckResult) -> dict[str, Any]:
    return {
        "CheckID": check.check_id,
        "Name": check.name,
        "Status": str(check.status),
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": list(check.service_tags),
    }


def host_records(
    layout: Layout,
    node: Node,
    entries: Mapping[str, Entry],
    node_checks: tuple[CheckResult, ...],
    service_value: Callable[[Instance], bytes],
    *,
    skip_check: str,
) -> dict[str, bytes]:
    """Every key this host owns, with its value (``service_value``: an instance's encoded
    ``service_record``; ``skip_check``: the synthetic node check, which every agent derives
    from ``alive/`` instead)."""
    records = {layout.node(node.name): encode(node_record(node))}
    checks: dict[str, CheckResult] = {check.check_id: check for check in node_checks}
    for service_id, entry in entries.items():
        if isinstance(entry.instance, Instance):
            records[layout.service(node.name, service_id)] = service_value(entry.instance)
        checks.update((check.check_id, check) for check in entry.checks)
    for check_id, check in checks.items():
        if check_id != skip_check:
            records[layout.check(node.name, check_id)] = encode(check_record(check))
    return records


# -- other hosts' records -------------------------------------------------------------------


def read_node(value: Mapping[str, Any], name: str, index: int) -> Node:
    meta = value.get("Meta")
    return Node(
        node_id=str(value.get("ID", "")),
        name=name,
        address=str(value.get("Address", "")),
        datacenter=str(value.get("Datacenter", "")),
        meta={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
        index=index,
    )


def read_instance(value: Mapping[str, Any], service_id: str) -> RemoteInstance:
    document = value.get("Service")
    if not isinstance(document, dict):
        raise BadRecord("no Service")
    weights = _of(document, "Weights", dict)
    tags = _of(document, "Tags", list)
    meta = _of(document, "Meta", dict)
    connect_tags = _of(value, "ConnectTags", list)
    target = value.get("ConnectTarget")
    try:
        name, port = _text(document.get("Service")), _number(document.get("Port", 0))
        passing, warning = _number(weights.get("Passing", 1)), _number(weights.get("Warning", 1))
        if not name:
            raise BadRecord("a service without a name")
        if not 0 <= port <= 65535 or not (0 <= passing <= 2**31 and 0 <= warning <= 2**31):
            raise BadRecord(f"port {port} or weights out of range")
        # The fields every reader of an AgentService expects, whatever the record left out.
        shown = {
            **document,
            "Kind": _text(document.get("Kind")),
            "ID": service_id,
            "Service": name,
            "Tags": [tag for tag in tags if isinstance(tag, str)],
            "Meta": {str(k): v for k, v in meta.items() if isinstance(v, str)},
            "Port": port,
            "Address": _text(document.get("Address")),
            "Weights": {"Passing": passing, "Warning": warning},
            "EnableTagOverride": bool(document.get("EnableTagOverride", False)),
        }
        return RemoteInstance(
            service_id=service_id,
            name=name,
            kind=shown["Kind"],
            tags=tuple(shown["Tags"]),
            meta=shown["Meta"],
            port=port,
            address=shown["Address"],
            connect_target=str(target) if target else None,
            connect_tags=tuple(str(tag) for tag in connect_tags),
            weights=(passing, warning),
            document=shown,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRecord(str(exc)[:200]) from None


def read_check(value: Mapping[str, Any], check_id: str, create_index: int, modify_index: int) -> CheckResult:
    try:
        status = CheckStatus(str(value.get("Status", "")))
    except ValueError:
        raise BadRecord(f"status {value.get('Status')!r}") from None
    tags = _of(value, "ServiceTags", list)
    return CheckResult(
        check_id=check_id,
        name=str(value.get("Name", "")),
        status=status,
        output=str(value.get("Output", "")),
        notes=str(value.get("Notes", "")),
        service_id=str(value.get("ServiceID", "")),
        service_name=str(value.get("ServiceName", "")),
        service_tags=tuple(str(tag) for tag in tags),
        create_index=create_index,
        modify_index=modify_index,
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> int:
    """A whole number as JSON has it (not a bool, not 80.7, not 1e400)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRecord(f"{value!r} is not a whole number")
    return value


def _of(value: Mapping[str, Any], key: str, kind: type[T]) -> T:
    """``value[key]`` when it is a ``kind``, else an empty one."""
    found = value.get(key)
    return found if isinstance(found, kind) else kind()
