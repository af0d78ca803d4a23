"""``?filter=`` expressions (go-bexpr's language) evaluated over wire JSON objects."""

from __future__ import annotations

import re
from typing import Any

import pytest

from supervisor.api.filtering import FilterError, apply_filter, compile_filter, filter_values

WEB: dict[str, Any] = {
    "Service": "web",
    "Tags": ["v1", "prod"],
    "Meta": {"env": "prod", "team-name": "edge"},
    "Port": 80,
    "Weights": {"Passing": 1},
    "Connect": {"Native": False},
    "Checks": [{"Status": "passing"}, {"Status": "critical"}],
    "Address": "",
}
DB: dict[str, Any] = {
    "Service": "db",
    "Tags": [],
    "Meta": {},
    "Port": 5432,
    "Weights": {"Passing": 3},
    "Connect": {"Native": True},
    "Checks": [{"Status": "passing"}],
    "Address": "10.0.0.5",
}


def chosen(expression: str) -> list[str]:
    return [item["Service"] for item in apply_filter(expression, [WEB, DB])]


@pytest.mark.parametrize(
    ("expression", "names"),
    [
        ("Service == web", ["web"]),
        ('Service == "web"', ["web"]),
        ("Service == `web`", ["web"]),
        ("Service != web", ["db"]),
        ('"v1" in Tags', ["web"]),
        ("v1 not in Tags", ["db"]),
        ("Tags contains prod", ["web"]),
        ("Tags is empty", ["db"]),
        ("Tags is not empty", ["web"]),
        ("Address is empty", ["web"]),
        ("Meta.env == prod", ["web"]),
        ('Meta["team-name"] == edge', ["web"]),
        ("Meta.env is empty", ["db"]),  # a key a map does not have is empty, not an error
        ("env in Meta", ["web"]),
        ("Port == 5432", ["db"]),
        ("Weights.Passing == 3", ["db"]),
        ("Connect.Native == true", ["db"]),
        ("Checks.Status == critical", ["web"]),  # through a list: any element
        ("not Checks.Status == critical", ["db"]),
        ('Service matches "^w"', ["web"]),
        ("Service not matches `^w`", ["db"]),
        ("Service == web or Service == db and Port == 80", ["web"]),  # and binds tighter
        ("(Service == web or Service == db) and Port == 5432", ["db"]),
        ("not (Service == web or Port == 1)", ["db"]),
        ("service == web", ["web"]),  # field names as Consul's decoder: any case
    ],
)
def test_expressions_select_as_go_bexpr_does(expression: str, names: list[str]) -> None:
    assert chosen(expression) == names


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("Service ==", "1:11 (10): no match found, the expression ends too early"),
        ("Service = web", "1:9 (8): no match found"),
        ("((Service == web)", "ends too early"),
        ('Service matches "("', "invalid regular expression"),
        ('Service matches "^(a+)+$"', "repetition inside a repetition"),  # would backtrack for ever
        ("x" * 5000, "longer than 4096 characters"),
    ],
)
def test_a_bad_expression_says_where(expression: str, says: str) -> None:
    with pytest.raises(FilterError, match=re.escape(says)):
        compile_filter(expression)


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("Colour == red", 'Selector "Colour" is not valid'),
        ("Port == eighty", "'eighty' is not a number"),
        ("Connect.Native == perhaps", "'perhaps' is not a boolean"),
        ("Connect == x", "is an object"),
        ("x in Port", "is not a list, map or string"),
    ],
)
def test_an_expression_that_does_not_fit_the_objects_is_an_error(expression: str, says: str) -> None:
    with pytest.raises(FilterError, match=says):
        apply_filter(expression, [WEB])


def test_no_expression_keeps_everything_and_maps_are_filtered_by_value() -> None:
    assert apply_filter(None, [WEB, DB]) == [WEB, DB]
    assert apply_filter("", [WEB]) == [WEB]
    assert list(filter_values("Port == 80", {"web": WEB, "db": DB})) == ["web"]


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert chosen("(" * 2000 + "Service == web" + ")" * 2000) == ["web"]  # parentheses: no depth
    assert chosen("not " * 30 + "Service == web") == ["web"]
    with pytest.raises(FilterError, match="nested more than 64 levels"):
        compile_filter("not " * 1000 + "Service == web")
