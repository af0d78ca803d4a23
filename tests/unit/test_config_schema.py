"""The config validator (``supervisor/config/schema.py``) on its own: each node's type rule
and cleaned value, Consul's case-insensitive key matching, unknown / ignored / renamed /
required keys, and that every problem names its source and key path (collected, not raised).
"""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.config.formats import RepeatedBlocks
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
    Opaque,
    Str,
    describe,
    normalise_key,
)
from supervisor.errors import ConfigProblem


def check(node: Node, value: Any, path: str = "key") -> tuple[Any, list[str]]:
    """The cleaned value and every problem, as ``source: path: message``."""
    ctx = Context("agent.json")
    cleaned = node.validate(value, path, ctx)
    return cleaned, [str(problem) for problem in ctx.problems]


@pytest.mark.parametrize(
    ("node", "value", "cleaned"),
    [
        (Str(), "x", "x"),
        (Str(("allow", "deny")), "deny", "deny"),
        (Str(("INFO", "WARN"), casefold=True), "warn", "WARN"),
        (Int(), 20000.0, 20000),  # JSON/HCL floats with an integral value
        (Int(0, 10), 10, 10),
        (Bool(), False, False),
        (Duration(), "1m30s", 90.0),
        (Opaque(), {"any": [1, None]}, {"any": [1, None]}),
        (List(Str()), ["a", "b"], ["a", "b"]),
        (List(Str(), allow_single=True), "a", ["a"]),
        (Map(Int()), {"a": 1}, {"a": 1}),
        (OneOrMany(Obj({"name": Str()})), {"name": "web"}, [{"name": "web"}]),
        (OneOrMany(Obj({"name": Str()})), [{"name": "a"}, {"name": "b"}], [{"name": "a"}, {"name": "b"}]),
    ],
)
def test_valid_values_come_back_cleaned(node: Node, value: Any, cleaned: Any) -> None:
    assert check(node, value) == (cleaned, [])


@pytest.mark.parametrize(
    ("node", "value", "message"),
    [
        (Str(), 5, "expected a string, got number 5"),
        (Str(("allow", "deny")), "maybe", "'maybe' is not one of 'allow', 'deny'"),
        (Str(("allow",)), "ALLOW", "'ALLOW' is not one of 'allow'"),  # case matters without casefold
        (Int(), "8500", "expected an integer, got string '8500'"),
        (Int(), True, "expected an integer, got boolean true"),  # a boolean is not a number
        (Int(), 1.5, "expected an integer, got number 1.5"),
        (Int(1), 0, "0 is below the minimum of 1"),
        (Int(0, 65535), 65536, "65536 is above the maximum of 65535"),
        (Bool(), "true", "expected true or false, got string 'true'"),
        (Duration(), 10, 'expected a duration such as "10s", got number 10'),
        (Duration(), "10", "10"),
        (List(Str()), "a", "expected a list, got string 'a'"),
        (List(Str(), allow_single=True), {"a": 1}, "expected a list, got an object"),
        (Map(Str()), [], "expected an object, got a list"),
        (OneOrMany(Obj({})), "web", "expected an object or a list of objects, got string 'web'"),
    ],
)
def test_a_wrong_value_is_a_problem_at_its_path(node: Node, value: Any, message: str) -> None:
    cleaned, problems = check(node, value, "ports.http")
    assert cleaned is None
    (problem,) = problems
    assert problem.startswith("agent.json: ports.http: ") and message in problem


def test_problems_inside_lists_and_maps_name_the_element() -> None:
    node = Obj({"tags": List(Str()), "meta": Map(Str())})
    cleaned, problems = check(node, {"tags": ["a", 1, "c"], "meta": {"owner": None}}, "services[2]")
    # the rest of the document is still cleaned; every problem is collected
    assert cleaned == {"tags": ["a", None, "c"], "meta": {"owner": None}}
    assert problems == [
        "agent.json: services[2].tags[1]: expected a string, got number 1",
        "agent.json: services[2].meta.owner: expected a string, got null",
    ]


def test_keys_match_consuls_spellings_but_user_map_keys_are_kept() -> None:
    node = Obj({"destination_name": Str(), "meta": Map(Str())})
    for spelling in ("destination_name", "DestinationName", "destinationname", "destination-name"):
        assert check(node, {spelling: "db"}) == ({"destination_name": "db"}, [])
    assert check(node, {"Meta": {"Owner_Name": "x"}})[0] == {"meta": {"Owner_Name": "x"}}
    assert normalise_key("Local_Bind-Port") == "localbindport"


def test_an_unknown_key_is_an_error_with_a_hint_for_a_typo() -> None:
    node = Obj({"command": Str(), "config": Opaque()})
    cleaned, problems = check(node, {"comand": "x", "colour": "red"}, "connect.proxy")
    assert cleaned == {}
    assert problems == [
        "agent.json: connect.proxy.comand: unknown key (did you mean 'command'?)",
        "agent.json: connect.proxy.colour: unknown key",
    ]


def test_an_ignored_key_is_a_notice_not_an_error() -> None:
    node = Obj({"name": Str()}, ignored={"tagged_addresses": "not used"})
    ctx = Context("agent.hcl")
    assert node.validate({"name": "w", "TaggedAddresses": {"lan": "x"}}, "service", ctx) == {"name": "w"}
    assert ctx.problems == []
    assert ctx.notices == [ConfigProblem("agent.hcl", "service.TaggedAddresses", "ignored: not used")]


def test_a_legacy_spelling_is_renamed_and_both_spellings_at_once_are_refused() -> None:
    node = Obj({"datacenter": Str()}, rename={"destination_datacenter": "datacenter"})
    node.fields["destination_datacenter"] = node.fields["datacenter"]  # as keys.UPSTREAM does
    assert check(node, {"destination_datacenter": "dc2"}) == ({"datacenter": "dc2"}, [])
    cleaned, problems = check(node, {"datacenter": "dc1", "DestinationDatacenter": "dc2"}, "up")
    assert cleaned == {"datacenter": "dc1"}
    assert problems == ["agent.json: up.DestinationDatacenter: given twice (also as 'datacenter')"]


def test_a_missing_required_key_is_named_in_the_documents_own_style() -> None:
    node = Obj({"destination_name": Str(), "local_bind_port": Int()}, required=("local_bind_port",))
    assert check(node, {"destination_name": "db"}, "upstreams[0]")[1] == [
        "agent.json: upstreams[0].local_bind_port: required key is missing"
    ]
    assert check(node, {"DestinationName": "db"}, "Upstreams[0]")[1] == [
        "agent.json: Upstreams[0].LocalBindPort: required key is missing"
    ]


def test_repeated_hcl_blocks_merge_into_objects_concatenate_into_lists_and_refuse_scalars() -> None:
    merged = Obj({"a": Int(), "b": Obj({"x": Int(), "y": Int()})})
    blocks = RepeatedBlocks([{"a": 1, "b": {"x": 1}}, {"b": {"y": 2}}])
    assert check(merged, blocks) == ({"a": 1, "b": {"x": 1, "y": 2}}, [])
    assert check(List(Int()), RepeatedBlocks([[1, 2], 3])) == ([1, 2, 3], [])
    assert check(Str(), RepeatedBlocks(["a", "b"]), "node_name") == (
        None,
        ["agent.json: node_name: set more than once in this file"],
    )


def test_a_custom_rule_reports_through_invalid() -> None:
    def even(value: Any, path: str, ctx: Context) -> int:
        if not isinstance(value, int) or value % 2:
            raise Invalid(f"{value!r} is not even")
        return value

    assert check(Custom(even), 4) == (4, [])
    assert check(Custom(even), 3, "n") == (None, ["agent.json: n: 3 is not even"])


@pytest.mark.parametrize(
    ("value", "described"),
    [
        (None, "null"),
        (True, "boolean true"),
        (1.5, "number 1.5"),
        ("x" * 50, "string '" + "x" * 37 + "...'"),
        ([], "a list"),
        ({}, "an object"),
    ],
)
def test_values_are_described_as_a_config_author_thinks_of_them(value: Any, described: str) -> None:
    assert describe(value) == described
