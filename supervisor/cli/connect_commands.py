"""``intention`` and ``query`` commands (Consul's command shapes)."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import Sequence
from typing import Any, TextIO

from supervisor.cli.client import AgentClient
from supervisor.cli.dispatch import client_flags, flag, needs_subcommand, with_client
from supervisor.errors import AgentRequestError, UsageError

EXIT_DENIED = 2  # `intention check`: Consul's exit code for "not allowed"


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _find_intention(client: AgentClient, args: Sequence[str]) -> dict[str, Any]:
    if len(args) == 1:
        data: dict[str, Any] = client.get(f"/v1/connect/intentions/{_quote(args[0])}")
        return data
    if len(args) == 2:
        found: dict[str, Any] = client.get(
            f"/v1/connect/intentions/exact?source={_quote(args[0])}&destination={_quote(args[1])}"
        )
        return found
    raise UsageError("give an intention ID, or a source and a destination")


def _describe(intention: dict[str, Any]) -> str:
    return f"{intention['SourceName']} => {intention['DestinationName']} ({intention['Action']})"


def intention_create(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    body: dict[str, Any] = {
        "SourceName": args.source,
        "DestinationName": args.destination,
        "Action": "deny" if args.deny else "allow",
        "Description": args.description or "",
        "Meta": dict(_key_values(args.meta)),
    }
    if args.replace:
        try:
            existing = _find_intention(client, [args.source, args.destination])
        except AgentRequestError:
            existing = None
        if existing is not None:
            client.put(f"/v1/connect/intentions/{existing['ID']}", body)
            out.write(f"Updated: {args.source} => {args.destination} ({body['Action']})\n")
            return 0
    client.request("POST", "/v1/connect/intentions", body)
    out.write(f"Created: {args.source} => {args.destination} ({body['Action']})\n")
    return 0


def intention_delete(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    found = _find_intention(client, args.names)
    client.request("DELETE", f"/v1/connect/intentions/{found['ID']}")
    out.write(f"Intention deleted: {_describe(found)}\n")
    return 0


def intention_get(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    found = _find_intention(client, args.names)
    for key in ("ID", "SourceName", "DestinationName", "Action", "Precedence", "Description", "CreatedAt"):
        out.write(f"{key + ':':<17}{found.get(key, '')}\n")
    return 0


def intention_list(_args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    intentions = client.get("/v1/connect/intentions")
    if not intentions:
        out.write("No intentions.\n")
        return 0
    rows = [("ID", "SOURCE", "ACTION", "DESTINATION", "PRECEDENCE")]
    rows += [
        (i["ID"], i["SourceName"], i["Action"], i["DestinationName"], str(i["Precedence"]))
        for i in intentions
    ]
    _table(rows, out)
    return 0


def intention_check(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    query = f"source={_quote(args.source)}&destination={_quote(args.destination)}"
    allowed = client.get(f"/v1/connect/intentions/check?{query}")["Allowed"]
    out.write("Allowed\n" if allowed else "Denied\n")
    return 0 if allowed else EXIT_DENIED


def intention_match(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    by = "source" if args.source_side else "destination"
    matches = client.get(f"/v1/connect/intentions/match?by={by}&name={_quote(args.name)}")[args.name]
    for found in matches:
        out.write(_describe(found) + "\n")
    return 0


def _key_values(pairs: Sequence[str] | None) -> list[tuple[str, str]]:
    result = []
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-meta wants key=value, got {pair!r}")
        result.append((key, value))
    return result


def query_create(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    service: dict[str, Any] = {
        "Service": args.service,
        "OnlyPassing": args.only_passing,
        "Connect": args.connect,
    }
    if args.tag:
        service["Tags"] = args.tag
    created = client.request("POST", "/v1/query", {"Name": args.name or "", "Service": service})
    out.write(f"Created prepared query {created['ID']}\n")
    return 0


def query_list(_args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    queries = client.get("/v1/query")
    if not queries:
        out.write("No prepared queries.\n")
        return 0
    rows: list[tuple[str, ...]] = [("ID", "NAME", "SERVICE", "TAGS", "ONLY PASSING")]
    rows += [
        (
            q["ID"],
            q["Name"] or "-",
            q["Service"]["Service"],
            ",".join(q["Service"]["Tags"] or []) or "-",
            str(q["Service"]["OnlyPassing"]).lower(),
        )
        for q in queries
    ]
    _table(rows, out)
    return 0


def query_delete(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    target = _query_id(client, args.name_or_id)
    client.request("DELETE", f"/v1/query/{_quote(target)}")
    out.write(f"Prepared query {args.name_or_id} deleted\n")
    return 0


def query_execute(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    suffix = "?connect=true" if args.connect else ""
    result = client.get(f"/v1/query/{_quote(args.name_or_id)}/execute{suffix}")
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
        return 0
    table: list[tuple[str, ...]] = [("SERVICE ID", "ADDRESS", "PORT", "KIND")]
    for entry in result["Nodes"]:
        svc = entry["Service"]
        table.append(
            (svc["ID"], svc["Address"] or entry["Node"]["Address"], str(svc["Port"]), svc["Kind"] or "-")
        )
    if len(table) == 1:
        out.write(f"No healthy instances of {result['Service']}.\n")
    else:
        _table(table, out)
    return 0


def _query_id(client: AgentClient, name_or_id: str) -> str:
    for entry in client.get("/v1/query"):
        if name_or_id in (entry["ID"], entry["Name"]):
            return str(entry["ID"])
    raise UsageError(f"no prepared query named {name_or_id!r}")


def add_parsers(sub: Any) -> None:
    """Register the ``intention`` and ``query`` subcommands (with their handlers) on ``sub``."""
    intention_parser = sub.add_parser("intention", help="manage intentions (who may connect to whom)")
    isub = intention_parser.add_subparsers(
        dest="intention_command", metavar="SUBCOMMAND", parser_class=type(intention_parser)
    )
    intention_parser.set_defaults(
        handler=needs_subcommand("intention needs a subcommand: create, delete, get, list, check or match")
    )
    create = isub.add_parser("create", help="create an intention SRC => DST")
    side = create.add_mutually_exclusive_group()
    flag(side, "allow", action="store_true", help="allow the connection (the default)")
    flag(side, "deny", action="store_true", help="deny the connection")
    flag(create, "description")
    flag(create, "meta", action="append", metavar="KEY=VALUE")
    flag(create, "replace", action="store_true", help="replace an existing intention for SRC => DST")
    create.add_argument("source", metavar="SRC")
    create.add_argument("destination", metavar="DST")
    delete = isub.add_parser("delete", help="delete an intention (by ID, or SRC DST)")
    get = isub.add_parser("get", help="get an intention (by ID, or SRC DST)")
    for parser in (delete, get):
        parser.add_argument("names", nargs="+", metavar="ID|SRC DST")
    listing = isub.add_parser("list", help="list intentions by precedence")
    check = isub.add_parser("check", help="would SRC be allowed to connect to DST? (exit 0 yes, 2 no)")
    check.add_argument("source", metavar="SRC")
    check.add_argument("destination", metavar="DST")
    match = isub.add_parser("match", help="intentions that apply to a destination (or -source)")
    flag(match, "source", dest="source_side", action="store_true")
    match.add_argument("name", metavar="NAME")
    for parser, command in (
        (create, intention_create),
        (delete, intention_delete),
        (get, intention_get),
        (listing, intention_list),
        (check, intention_check),
        (match, intention_match),
    ):
        client_flags(parser)
        parser.set_defaults(handler=with_client(command))

    query_parser = sub.add_parser("query", help="manage prepared queries")
    qsub = query_parser.add_subparsers(
        dest="query_command", metavar="SUBCOMMAND", parser_class=type(query_parser)
    )
    query_parser.set_defaults(
        handler=needs_subcommand("query needs a subcommand: create, list, delete or execute")
    )
    qcreate = qsub.add_parser("create", help="create a prepared query")
    flag(qcreate, "name", help="name to execute it by")
    flag(qcreate, "service", required=True, help="service to look up")
    flag(qcreate, "tag", action="append", help="required tag (!tag: must not have it)")
    flag(qcreate, "only-passing", dest="only_passing", action="store_true")
    flag(qcreate, "connect", action="store_true", help="return Connect-capable instances")
    qlist = qsub.add_parser("list", help="list prepared queries")
    qdelete = qsub.add_parser("delete", help="delete a prepared query")
    qdelete.add_argument("name_or_id", metavar="NAME|ID")
    qexecute = qsub.add_parser("execute", help="run a prepared query")
    qexecute.add_argument("name_or_id", metavar="NAME|ID")
    flag(qexecute, "connect", action="store_true")
    flag(qexecute, "json", action="store_true")
    for parser, command in (
        (qcreate, query_create),
        (qlist, query_list),
        (qdelete, query_delete),
        (qexecute, query_execute),
    ):
        client_flags(parser)
        parser.set_defaults(handler=with_client(command))
