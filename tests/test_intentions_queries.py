"""Intentions (precedence, decisions, validation, persistence) and prepared-query resolution."""

from __future__ import annotations

import itertools
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from supervisor.catalog.errors import Conflict, NotFound
from supervisor.catalog.intentions import Action, IntentionFile, Intentions, parse_intention
from supervisor.catalog.queries import Queries, QueryFile, parse_query
from supervisor.errors import ConfigError, CorruptStateError


def store(path: Path | None = None) -> Intentions:
    counter = itertools.count(1)
    return Intentions(IntentionFile(str(path)) if path else None, lambda: next(counter), lambda: None)


def create(ixns: Intentions, source: str, destination: str, action: str) -> Any:
    return ixns.create(
        parse_intention({"SourceName": source, "DestinationName": destination, "Action": action})
    )


def test_precedence_exact_beats_wildcards() -> None:
    ixns = store()
    create(ixns, "*", "*", "deny")
    create(ixns, "web", "*", "allow")
    create(ixns, "*", "db", "deny")
    create(ixns, "web", "db", "allow")
    assert [(i.source_name, i.destination_name, i.precedence) for i in ixns.sorted()] == [
        ("web", "db", 9),
        ("*", "db", 8),
        ("web", "*", 6),
        ("*", "*", 5),
    ]
    assert ixns.decide("web", "db", True, False) == (True, "Matched intention: web => db (allow)")
    assert ixns.decide("api", "db", True, False) == (False, "Matched intention: * => db (deny)")
    assert ixns.decide("web", "cache", True, False) == (True, "Matched intention: web => * (allow)")
    assert ixns.decide("api", "cache", True, False) == (False, "Matched intention: * => * (deny)")


def test_no_match_falls_back_to_acl_defaults() -> None:
    ixns = store()
    assert ixns.decide("a", "b", default_allow=False, acls_enabled=False) == (
        True,
        "ACLs disabled, access is allowed by default",
    )
    assert ixns.decide("a", "b", default_allow=False, acls_enabled=True) == (
        False,
        "Default behavior configured by ACLs",
    )
    assert ixns.decide("a", "b", default_allow=True, acls_enabled=True)[0] is True


def test_duplicates_updates_deletes() -> None:
    ixns = store()
    first = create(ixns, "web", "db", "allow")
    with pytest.raises(Conflict) as exc:
        create(ixns, "web", "db", "deny")
    assert first.id in str(exc.value)
    updated = ixns.update(
        first.id, parse_intention({"SourceName": "web", "DestinationName": "db", "Action": "deny"})
    )
    assert updated.action is Action.DENY and updated.modify_index > first.modify_index
    assert updated.created_at == first.created_at
    ixns.delete(first.id)
    with pytest.raises(NotFound):
        ixns.delete(first.id)


def test_match_by_source_and_destination() -> None:
    ixns = store()
    create(ixns, "web", "db", "allow")
    create(ixns, "*", "db", "deny")
    create(ixns, "web", "cache", "allow")
    assert [str(i) for i in ixns.match("destination", "db")] == ["web => db (allow)", "* => db (deny)"]
    # a wildcard source matches every source
    assert [str(i) for i in ixns.match("source", "web")] == [
        "web => cache (allow)",
        "web => db (allow)",
        "* => db (deny)",
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"SourceName": "web", "DestinationName": "db"}, "Action: required key is missing"),
        ({"SourceName": "web", "DestinationName": "db", "Action": "maybe"}, "'maybe' is not one of"),
        (
            {"SourceName": "we*b", "DestinationName": "db", "Action": "allow"},
            "wildcard must be the entire name",
        ),
        ({"SourceName": "../x", "DestinationName": "db", "Action": "allow"}, "cannot be used"),
        ({"SourceName": 5, "DestinationName": "db", "Action": "allow"}, "expected a string"),
        ({"SourceName": "a", "DestinationName": "b", "Action": "allow", "SourceNS": "team"}, "namespaces"),
        ([1, 2], "expected an object"),
    ],
)
def test_invalid_intentions(body: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_intention(body)


def test_intentions_persist_privately(tmp_path: Path) -> None:
    path = tmp_path / "connect" / "intentions.json"
    ixns = store(path)
    created = create(ixns, "web", "db", "deny")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = store(path)
    again.load()
    assert again.intentions[created.id] == created
    path.write_text("{broken")
    with pytest.raises(CorruptStateError, match="cannot be used .*restore it from a backup"):
        store(path).load()


def queries(path: Path | None = None) -> Queries:
    counter = itertools.count(1)
    return Queries(QueryFile(str(path)) if path else None, lambda: next(counter), lambda: None)


def test_query_resolution_by_id_name_and_template(tmp_path: Path) -> None:
    path = tmp_path / "queries.json"
    store_ = queries(path)
    plain = store_.create(
        parse_query({"Name": "db-query", "Service": {"Service": "db", "Tags": ["primary"]}})
    )
    template = store_.create(
        parse_query(
            {
                "Name": "geo-",
                "Template": {"Type": "name_prefix_match", "Regexp": "^geo-(.*?)-(.*)$"},
                "Service": {"Service": "${match(1)}", "Tags": ["${match(2)}", "${name.suffix}"]},
            }
        )
    )
    assert store_.resolve(plain.id)[1].service == "db"
    assert store_.resolve("db-query")[1].tags == ("primary",)
    query, service = store_.resolve("geo-web-eu")
    assert query.id == template.id and service.service == "web" and service.tags == ("eu", "web-eu")
    with pytest.raises(NotFound):
        store_.resolve("nothing")
    with pytest.raises(Conflict):
        store_.create(parse_query({"Name": "db-query", "Service": {"Service": "x"}}))
    reloaded = queries(path)
    reloaded.load()
    assert reloaded.queries == store_.queries  # typed definitions survive the file exactly
    assert json.loads(path.read_text())["Version"] == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Name": "x"}, "Service: required key is missing"),
        ({"Service": {"Tags": ["a"]}}, "Service.Service: required key is missing"),
        ({"Service": {"Service": "db", "OnlyPassing": "yes"}}, "expected true or false"),
        (
            {
                "Name": "t",
                "Template": {"Type": "name_prefix_match", "Regexp": "("},
                "Service": {"Service": "x"},
            },
            "regular",
        ),
    ],
)
def test_invalid_queries(body: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_query(body)
