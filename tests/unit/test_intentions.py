"""Intentions (``supervisor/catalog/intentions.py``): the store's rules beyond what
tests/test_intentions_queries.py covers -- clashes on update, indexes and change
notifications, decisions against the ACL default, and persistence through
``IntentionFile`` (state/documents.py), where a damaged file is refused without losing it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.catalog.errors import Conflict, NotFound
from supervisor.catalog.intentions import (
    Action,
    Intention,
    IntentionFile,
    Intentions,
    parse_intention,
)
from supervisor.errors import CorruptStateError, DataDirError


class Store:
    """An ``Intentions`` with a counting index and a record of change notifications."""

    def __init__(self, path: Path | None = None) -> None:
        self.counter = itertools.count(100)
        self.changes = 0
        self.intentions = Intentions(IntentionFile(str(path)) if path else None, self.next, self.changed)

    def next(self) -> int:
        return next(self.counter)

    def changed(self) -> None:
        self.changes += 1

    def create(self, source: str, destination: str, action: str, **extra: Any) -> Intention:
        body = {"SourceName": source, "DestinationName": destination, "Action": action, **extra}
        return self.intentions.create(parse_intention(body))


def fields(source: str, destination: str, action: str) -> Any:
    return parse_intention({"SourceName": source, "DestinationName": destination, "Action": action})


# -- the store's rules ------------------------------------------------------------------------


def test_updating_onto_a_pair_another_intention_holds_is_a_conflict() -> None:
    store = Store()
    web_db = store.create("web", "db", "allow")
    api_db = store.create("api", "db", "deny")
    with pytest.raises(Conflict, match=f"web => db .*{web_db.id}"):
        store.intentions.update(api_db.id, fields("web", "db", "allow"))
    assert store.intentions.get(api_db.id) == api_db  # unchanged


def test_get_update_and_delete_of_an_unknown_id_are_not_found() -> None:
    store = Store()
    with pytest.raises(NotFound, match="Intention not found: nope"):
        store.intentions.get("nope")
    with pytest.raises(NotFound):
        store.intentions.update("nope", fields("a", "b", "allow"))
    assert store.changes == 0 and store.intentions.intentions == {}


def test_every_change_takes_a_new_index_and_notifies_once() -> None:
    store = Store()
    created = store.create("web", "db", "allow")
    assert created.create_index == created.modify_index
    assert store.changes == 1
    updated = store.intentions.update(created.id, fields("web", "db", "deny"))
    assert updated.create_index == created.create_index and updated.modify_index > created.modify_index
    assert store.changes == 2
    store.intentions.delete(created.id)
    assert store.changes == 3
    assert store.next() > updated.modify_index + 1  # the delete took an index too


def test_ties_in_precedence_are_ordered_by_name() -> None:
    store = Store()
    for source, destination in [("web", "db"), ("api", "db"), ("api", "cache"), ("*", "db"), ("*", "api")]:
        store.create(source, destination, "allow")
    assert [str(ixn) for ixn in store.intentions.sorted()] == [
        "api => cache (allow)",
        "api => db (allow)",
        "web => db (allow)",
        "* => api (allow)",
        "* => db (allow)",
    ]


# -- decisions -------------------------------------------------------------------------------------


def test_an_exact_deny_overrides_a_wildcard_allow() -> None:
    store = Store()
    store.create("*", "*", "allow")
    store.create("*", "db", "allow")
    store.create("intruder", "db", "deny")
    assert store.intentions.decide("intruder", "db", True, True) == (
        False,
        "Matched intention: intruder => db (deny)",
    )
    assert store.intentions.decide("web", "db", True, True)[0] is True


def test_a_matching_intention_decides_whatever_the_acl_default() -> None:
    store = Store()
    store.create("web", "db", "allow")
    store.create("batch", "db", "deny")
    for default_allow in (True, False):
        assert store.intentions.decide("web", "db", default_allow, acls_enabled=True)[0] is True
        assert store.intentions.decide("batch", "db", default_allow, acls_enabled=True)[0] is False
    # no intention names "cache": the ACL default decides
    assert store.intentions.decide("web", "cache", False, acls_enabled=True) == (
        False,
        "Default behavior configured by ACLs",
    )


# -- definitions -----------------------------------------------------------------------------------


def test_snake_case_keys_the_default_namespace_and_echoed_computed_fields_are_accepted() -> None:
    # A client may GET an intention, edit it and PUT it back with everything it read.
    parsed = parse_intention(
        {
            "source_name": "web",
            "destination_name": "db",
            "action": "deny",
            "SourceNS": "default",
            "DestinationNS": "",
            "Description": "no web to db",
            "Meta": {"owner": "team-a"},
            "ID": "ignored",
            "Precedence": 1,
            "CreatedAt": "whenever",
            "CreateIndex": 3,
        }
    )
    assert (parsed.source_name, parsed.destination_name, parsed.action) == ("web", "db", Action.DENY)
    assert (parsed.description, dict(parsed.meta)) == ("no web to db", {"owner": "team-a"})


# -- persistence ---------------------------------------------------------------------------------


def test_intentions_survive_a_restart_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "connect" / "intentions.json"
    store = Store(path)
    kept = store.create("web", "db", "deny", Description="why", Meta={"ticket": "OPS-1"})
    gone = store.create("*", "db", "allow")
    store.intentions.delete(gone.id)
    restarted = Store(path)
    restarted.intentions.load()
    assert restarted.intentions.intentions == {kept.id: kept}
    assert restarted.intentions.get(kept.id).action is Action.DENY


def test_the_file_lists_intentions_in_precedence_order(tmp_path: Path) -> None:
    path = tmp_path / "intentions.json"
    store = Store(path)
    store.create("*", "*", "deny")
    store.create("web", "db", "allow")
    document = json.loads(path.read_text())
    assert document["Version"] == 1
    assert [(entry["SourceName"], entry["DestinationName"]) for entry in document["Intentions"]] == [
        ("web", "db"),
        ("*", "*"),
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"Version": 2, "Intentions": []}, "unknown version 2"),
        ({"Version": 1}, "'Intentions'"),
        (
            {
                "Version": 1,
                "Intentions": [{"ID": "x", "SourceName": "a", "DestinationName": "b", "Action": "maybe"}],
            },
            "intention x: invalid action 'maybe'",
        ),
        ({"Version": 1, "Intentions": [{"ID": "x", "Action": "allow"}]}, "'SourceName'"),
    ],
)
def test_a_damaged_file_is_refused_naming_it_and_left_as_it_was(
    tmp_path: Path, content: dict[str, Any], reason: str
) -> None:
    path = tmp_path / "intentions.json"
    path.write_text(json.dumps(content))
    original = path.read_bytes()
    store = Store(path)
    with pytest.raises(CorruptStateError) as raised:
        store.intentions.load()
    message = str(raised.value)
    # the operator is told which file, what is wrong with it and what to do
    assert str(path) in message and reason in message and "restore it from a backup" in message
    assert path.read_bytes() == original  # never silently replaced
    assert raised.value.exit_code == 2


def test_a_failed_load_keeps_what_the_store_held(tmp_path: Path) -> None:
    path = tmp_path / "intentions.json"
    store = Store(path)
    kept = store.create("web", "db", "allow")
    path.write_text("{torn")
    with pytest.raises(CorruptStateError):
        store.intentions.load()
    assert store.intentions.intentions == {kept.id: kept}


def test_an_unwritable_store_is_a_data_dir_error(tmp_path: Path) -> None:
    (tmp_path / "connect").write_text("")  # a file where the directory should be
    store = Store(tmp_path / "connect" / "intentions.json")
    with pytest.raises(DataDirError, match="cannot write"):
        store.create("web", "db", "allow")


def test_a_create_that_cannot_be_saved_leaves_no_intention_in_force(tmp_path: Path) -> None:
    (tmp_path / "connect").write_text("")
    store = Store(tmp_path / "connect" / "intentions.json")
    with pytest.raises(DataDirError):
        store.create("web", "db", "allow")
    # ACLs default to deny: only the intention the caller was told failed could allow this
    assert store.intentions.decide("web", "db", default_allow=False, acls_enabled=True)[0] is False


def test_an_intention_with_an_empty_name_is_refused() -> None:
    from supervisor.catalog.intentions import parse_intention
    from supervisor.errors import ConfigError

    for body in (
        {"SourceName": "", "DestinationName": "db", "Action": "deny"},
        {"SourceName": "web", "DestinationName": "", "Action": "allow"},
    ):
        with pytest.raises(ConfigError, match="must name a service"):
            parse_intention(body)
