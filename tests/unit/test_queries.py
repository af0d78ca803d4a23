"""Prepared queries (``supervisor/catalog/queries.py``): typed definitions and their stored
form, name rules, template resolution and persistence through ``QueryFile`` -- what
tests/test_intentions_queries.py leaves out. Executing a query (catalog selection,
shuffling, limits) is the API layer's, in supervisor/api/query_endpoints.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.catalog.errors import Conflict, InvalidDefinition, NotFound
from supervisor.catalog.queries import (
    PreparedQuery,
    Queries,
    QueryDefinition,
    QueryFile,
    ServiceQuery,
    interpolate,
    parse_query,
)
from supervisor.errors import ConfigError, CorruptStateError


class Store:
    def __init__(self, path: Path | None = None) -> None:
        self.counter = itertools.count(1)
        self.changes = 0
        self.queries = Queries(
            QueryFile(str(path)) if path else None, lambda: next(self.counter), self.changed
        )

    def changed(self) -> None:
        self.changes += 1

    def create(self, body: dict[str, Any]) -> PreparedQuery:
        return self.queries.create(parse_query(body))


def template(name: str, service: str, tags: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "Name": name,
        "Template": {"Type": "name_prefix_match", **extra},
        "Service": {"Service": service, **({"Tags": tags} if tags is not None else {})},
    }


# -- definitions -------------------------------------------------------------------------------


def test_every_service_field_is_read_from_consuls_spelling() -> None:
    definition = parse_query(
        {
            "Name": "db-nearby",
            "Token": "secret",
            "Service": {
                "Service": "db",
                "Failover": {"NearestN": 3, "Datacenters": ["dc2", "dc3"]},
                "OnlyPassing": True,
                "IgnoreCheckIDs": ["maint"],
                "Near": "_agent",
                "Tags": ["primary", "!legacy"],
                "NodeMeta": {"rack": "r1"},
                "ServiceMeta": {"version": "2"},
                "Connect": True,
            },
            "DNS": {"TTL": "10s"},
        }
    )
    assert definition.service == ServiceQuery(
        service="db",
        failover_nearest_n=3,
        failover_datacenters=("dc2", "dc3"),
        only_passing=True,
        ignore_check_ids=("maint",),
        near="_agent",
        tags=("primary", "!legacy"),
        node_meta={"rack": "r1"},
        service_meta={"version": "2"},
        connect=True,
    )
    assert (definition.name, definition.token, definition.dns_ttl) == ("db-nearby", "secret", "10s")
    assert definition.template is None


def test_fields_left_out_stay_unset_and_empty_ones_stay_empty() -> None:
    # Consul shows a field the definition leaves out as null, an empty one as []
    bare = parse_query({"Service": {"Service": "db"}}).service
    assert (bare.tags, bare.failover_datacenters, bare.node_meta, bare.ignore_check_ids) == (
        None,
        None,
        None,
        None,
    )
    empty = parse_query({"Service": {"Service": "db", "Tags": [], "Failover": {"Datacenters": []}}})
    assert (empty.service.tags, empty.service.failover_datacenters) == ((), ())
    # the stored form leaves out what is not set, and reads back the same
    assert parse_query({"Service": {"Service": "db"}}).to_fields() == {"service": {"service": "db"}}
    for definition in (parse_query({"Service": {"Service": "db"}}), empty):
        assert QueryDefinition.from_fields(definition.to_fields()) == definition


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"Name": "a/b", "Service": {"Service": "db"}}, "<api>: Name: 'a/b' cannot be used"),
        ({"Service": {"Service": "db", "Failover": {"NearestN": -1}}}, "Service.Failover.NearestN"),
        (template("t-", "x", Type="regexp"), "Template.Type: 'regexp' is not one of"),
        ("db", "expected an object"),
    ],
)
def test_invalid_definitions_name_the_key(body: Any, path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_query(body)
    assert any(path in str(problem) for problem in raised.value.problems), raised.value.problems


# -- names and the store's rules -----------------------------------------------------------------


def test_renaming_onto_a_taken_name_is_a_conflict_but_keeping_ones_own_is_not() -> None:
    store = Store()
    first = store.create({"Name": "db", "Service": {"Service": "db"}})
    second = store.create({"Name": "cache", "Service": {"Service": "cache"}})
    with pytest.raises(Conflict, match=first.id):
        store.queries.update(second.id, parse_query({"Name": "db", "Service": {"Service": "x"}}))
    updated = store.queries.update(first.id, parse_query({"Name": "db", "Service": {"Service": "db2"}}))
    assert updated.definition.service.service == "db2"
    assert (updated.create_index, updated.modify_index > first.modify_index) == (first.create_index, True)


def test_an_unnamed_query_needs_a_session_as_in_consul_and_this_agent_has_none() -> None:
    store = Store()
    with pytest.raises(InvalidDefinition, match="Must be bound to a session"):
        store.create({"Service": {"Service": "a"}})
    assert store.queries.list() == []


def test_the_empty_named_template_is_the_catch_all_and_there_is_one() -> None:
    store = Store()
    store.create(template("", "${name.full}"))
    store.create(template("geo-", "geo-${name.suffix}"))
    assert store.queries.resolve("db")[1].service == "db"  # nothing else matches: the catch-all
    assert store.queries.resolve("geo-web")[1].service == "geo-web"  # a longer prefix wins
    with pytest.raises(Conflict, match="a query template with an empty name already exists"):
        store.create(template("", "other"))


def test_queries_are_listed_by_name_and_every_change_notifies() -> None:
    store = Store()
    for name in ("zeta", "alpha", "mid"):
        store.create({"Name": name, "Service": {"Service": name}})
    assert [query.name for query in store.queries.list()] == ["alpha", "mid", "zeta"]
    doomed = store.queries.list()[0]
    store.queries.delete(doomed.id)
    assert store.changes == 4
    with pytest.raises(NotFound, match=doomed.id):
        store.queries.delete(doomed.id)
    with pytest.raises(NotFound):
        store.queries.update(doomed.id, parse_query({"Service": {"Service": "x"}}))


# -- templates ------------------------------------------------------------------------------------


def test_name_expressions_take_the_full_name_the_prefix_and_the_rest() -> None:
    store = Store()
    store.create(template("geo-", "${name.suffix}", ["${name.full}", "${name.prefix}", "${ name.suffix }"]))
    _, service = store.queries.resolve("geo-web")
    assert service.service == "web"
    assert service.tags == ("geo-web", "geo-", "web")


def test_the_longest_matching_template_prefix_wins() -> None:
    store = Store()
    store.create(template("geo-", "short"))
    longer = store.create(template("geo-eu-", "long"))
    query, service = store.queries.resolve("geo-eu-web")
    assert query.id == longer.id and service.service == "long"
    assert store.queries.resolve("geo-us-web")[1].service == "short"


def test_an_exact_plain_name_beats_a_template_prefix() -> None:
    store = Store()
    store.create(template("geo-", "${name.suffix}"))
    plain = store.create({"Name": "geo-special", "Service": {"Service": "special"}})
    query, service = store.queries.resolve("geo-special")
    assert query.id == plain.id and service.service == "special"


def test_match_groups_past_the_regexp_or_without_a_match_are_empty() -> None:
    store = Store()
    store.create(template("svc-", "${match(1)}", ["${match(2)}", "keep"], Regexp="^svc-([a-z]+)$"))
    _, service = store.queries.resolve("svc-web")
    assert (service.service, service.tags) == ("web", ("", "keep"))
    _, unmatched = store.queries.resolve("svc-WEB")  # prefix matches, regexp does not
    assert unmatched.service == ""


def test_remove_empty_tags_drops_tags_that_render_empty() -> None:
    store = Store()
    store.create(
        template("svc-", "${match(1)}", ["${match(2)}", "keep"], Regexp="^svc-(\\w+)$", RemoveEmptyTags=True)
    )
    assert store.queries.resolve("svc-web")[1].tags == ("keep",)


def test_an_unknown_template_expression_is_an_invalid_definition() -> None:
    with pytest.raises(InvalidDefinition, match=r"unknown template expression \$\{name.middle\}"):
        interpolate("${name.middle}", "geo-web", "geo-", None)
    store = Store()
    store.create(template("geo-", "${agent.segment}"))
    with pytest.raises(InvalidDefinition):
        store.queries.resolve("geo-web")


def test_a_template_is_resolved_by_name_only_as_in_consul() -> None:
    store = Store()
    created = store.create(template("geo-", "${name.suffix}"))
    with pytest.raises(InvalidDefinition, match="templates can only be resolved up by name, not by ID"):
        store.queries.resolve(created.id)


# -- persistence ---------------------------------------------------------------------------------


def test_a_stored_query_with_an_invalid_definition_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "queries.json"
    entry = {"ID": "q1", "Definition": {"service": {"service": "db", "tags": "x"}}, "CreateIndex": 1}
    path.write_text(json.dumps({"Version": 1, "Queries": [{**entry, "ModifyIndex": 1}]}))
    original = path.read_bytes()
    with pytest.raises(CorruptStateError) as raised:
        Store(path).queries.load()
    message = str(raised.value)
    assert message.startswith(f"{path} cannot be used") and "service.tags: expected a list" in message
    assert "move it away to start with no prepared queries" in message
    assert path.read_bytes() == original


def test_a_deleted_query_stays_deleted_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "connect" / "queries.json"
    store = Store(path)
    kept = store.create({"Name": "keep", "Service": {"Service": "db", "OnlyPassing": True}})
    gone = store.create({"Name": "gone", "Service": {"Service": "db"}})
    store.queries.delete(gone.id)
    restarted = Store(path)
    restarted.queries.load()
    assert restarted.queries.list() == [kept]


def test_template_regexps_that_would_backtrack_exponentially_are_refused() -> None:
    from supervisor.catalog.queries import parse_query
    from supervisor.errors import ConfigError

    body = {
        "Name": "re",
        "Template": {"Type": "name_prefix_match", "Regexp": "^re(a+)+$"},
        "Service": {"Service": "x"},
    }
    with pytest.raises(ConfigError) as raised:
        parse_query(body)
    assert "repetition inside a repetition" in str(raised.value.problems[0])
    fine = {**body, "Template": {"Type": "name_prefix_match", "Regexp": "^geo-db-(.*?)-([^-]+?)$"}}
    assert parse_query(fine).template is not None
