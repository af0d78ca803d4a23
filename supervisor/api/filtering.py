"""``?filter=``: Consul's filter expression language (go-bexpr), over the JSON it answers.

    Service == web and "v2" in Tags
    Meta.env != prod or not (Checks.Status == critical)

Consul evaluates the expression against its Go structs; the field names are those of its
JSON, so here the expression is evaluated against the wire objects themselves. The
grammar is go-bexpr's (Consul 1.5; ``contains`` and ``matches`` from later versions are
accepted too) and is parsed with lark rather than by hand. A selector that reaches into
a list (``Checks.Status``) matches when any element does.

``FilterError`` carries the parse or evaluation problem; the endpoints answer it with a
400, as Consul does.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lark import Lark, Token, Transformer, Tree, UnexpectedInput, v_args
from lark.exceptions import VisitError

GRAMMAR = r"""
?start: or_expr
?or_expr: and_expr (_OR and_expr)*
?and_expr: not_expr (_AND not_expr)*
?not_expr: _NOT not_expr -> negate
         | "(" or_expr ")"
         | match
match: selector _EQ value                    -> equal
     | selector _NE value                    -> not_equal
     | selector _IS _EMPTY                   -> is_empty
     | selector _IS _NOT _EMPTY              -> is_not_empty
     | value _IN selector                    -> value_in
     | value _NOT _IN selector               -> value_not_in
     | selector _CONTAINS value              -> contains
     | selector _NOT _CONTAINS value         -> not_contains
     | selector _MATCHES value               -> matches
     | selector _NOT _MATCHES value          -> not_matches
selector: NAME ("." NAME | "[" STRING "]")*
value: STRING | RAW | NUMBER | NAME
_OR.2: "or"
_AND.2: "and"
_NOT.2: "not"
_IS.2: "is"
_EMPTY.2: "empty"
_IN.2: "in"
_CONTAINS.2: "contains"
_MATCHES.2: "matches"
_EQ: "=="
_NE: "!="
NAME: /[A-Za-z_][A-Za-z0-9_\-]*/
NUMBER: /-?[0-9]+(\.[0-9]+)?/
STRING: /"(\\.|[^"\\])*"/
RAW: /`[^`]*`/
%ignore /\s+/
"""

MAX_FILTER_LENGTH = 4096
MAX_FILTER_DEPTH = 64  # nested and/or/not: evaluation recurses once per level

Predicate = Callable[[Any], bool]
_MISSING = object()


class FilterError(ValueError):
    """The expression cannot be parsed or cannot be applied to this endpoint's objects."""


_PARSER = Lark(GRAMMAR, parser="earley", ambiguity="resolve", propagate_positions=False)


@functools.lru_cache(maxsize=256)
def compile_filter(expression: str) -> Predicate:
    """A predicate over one JSON object; raises FilterError for a bad expression."""
    if len(expression) > MAX_FILTER_LENGTH:
        raise FilterError(f"filter expression is longer than {MAX_FILTER_LENGTH} characters")
    try:
        tree = _PARSER.parse(expression)
        if _depth(tree) > MAX_FILTER_DEPTH:
            raise FilterError(f"filter expression is nested more than {MAX_FILTER_DEPTH} levels deep")
        predicate: Predicate = _Compile().transform(tree)
    except UnexpectedInput as exc:
        raise FilterError(_parse_problem(expression, exc)) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, FilterError):
            raise exc.orig_exc from None
        raise
    except RecursionError:
        raise FilterError("filter expression is nested too deeply") from None
    return predicate


def apply_filter(expression: str | None, items: Iterable[Any]) -> list[Any]:
    """The items the expression selects (all of them without one)."""
    items = list(items)
    if not expression:
        return items
    predicate = compile_filter(expression)
    return [item for item in items if predicate(item)]


def filter_values(expression: str | None, mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Consul filters a map-shaped answer (agent services, checks) by its values."""
    if not expression:
        return dict(mapping)
    predicate = compile_filter(expression)
    return {key: value for key, value in mapping.items() if predicate(value)}


def _depth(tree: Tree[Token]) -> int:
    """How deeply and/or/not nest (iteratively: the tree may be deep)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))
    return deepest


def _parse_problem(expression: str, exc: UnexpectedInput) -> str:
    """Where the expression stops making sense, as go-bexpr says it: ``1:9 (8): ...``."""
    position = exc.pos_in_stream if isinstance(exc.pos_in_stream, int) else -1  # -1: at the end
    if position < 0 or position >= len(expression):
        return f"1:{len(expression) + 1} ({len(expression)}): no match found, the expression ends too early"
    return f"1:{position + 1} ({position}): no match found at {expression[position : position + 20]!r}"


@v_args(inline=True)
class _Compile(Transformer[Token, Predicate]):
    """The parse tree as nested closures: built once per expression, run per object."""

    def or_expr(self, *parts: Predicate) -> Predicate:
        return lambda item: any(part(item) for part in parts)

    def and_expr(self, *parts: Predicate) -> Predicate:
        return lambda item: all(part(item) for part in parts)

    def negate(self, part: Predicate) -> Predicate:
        return lambda item: not part(item)

    def selector(self, *names: Token) -> tuple[str, ...]:
        return tuple(_unquote(name) if name.type == "STRING" else str(name) for name in names)

    def value(self, token: Token) -> str:
        if token.type == "STRING":
            return _unquote(token)
        if token.type == "RAW":
            return str(token)[1:-1]
        return str(token)

    def equal(self, path: tuple[str, ...], value: str) -> Predicate:
        return lambda item: any(_equals(found, value, path) for found in _resolve(item, path))

    def not_equal(self, path: tuple[str, ...], value: str) -> Predicate:
        equal = self.equal(path, value)
        return lambda item: not equal(item)

    def is_empty(self, path: tuple[str, ...]) -> Predicate:
        return lambda item: all(_empty(found) for found in _resolve(item, path))

    def is_not_empty(self, path: tuple[str, ...]) -> Predicate:
        empty = self.is_empty(path)
        return lambda item: not empty(item)

    def value_in(self, value: str, path: tuple[str, ...]) -> Predicate:
        return lambda item: any(_holds(found, value, path) for found in _resolve(item, path))

    def value_not_in(self, value: str, path: tuple[str, ...]) -> Predicate:
        holds = self.value_in(value, path)
        return lambda item: not holds(item)

    def contains(self, path: tuple[str, ...], value: str) -> Predicate:
        return self.value_in(value, path)

    def not_contains(self, path: tuple[str, ...], value: str) -> Predicate:
        return self.value_not_in(value, path)

    def matches(self, path: tuple[str, ...], value: str) -> Predicate:
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise FilterError(f"invalid regular expression {value!r}: {exc}") from None

        def match(item: Any) -> bool:
            return any(isinstance(found, str) and pattern.search(found) for found in _resolve(item, path))

        return match

    def not_matches(self, path: tuple[str, ...], value: str) -> Predicate:
        match = self.matches(path, value)
        return lambda item: not match(item)


def _unquote(token: str) -> str:
    body = str(token)[1:-1]
    return re.sub(r"\\(.)", lambda found: {"n": "\n", "t": "\t"}.get(found.group(1), found.group(1)), body)


def _resolve(item: Any, path: Sequence[str]) -> list[Any]:
    """Every value the selector reaches (several through a list); [] if it reaches none.
    A first name the object does not have is an invalid selector, as in Consul."""
    current: list[Any] = [item]
    for depth, name in enumerate(path):
        reached: list[Any] = []
        for value in current:
            for element in value if isinstance(value, list) and depth > 0 else [value]:
                if not isinstance(element, Mapping):
                    continue
                found = _field(element, name)
                if found is _MISSING:
                    if depth == 0:
                        raise FilterError(f'Selector "{".".join(path)}" is not valid')
                    continue
                reached.append(found)
        current = reached
    return current


def _field(mapping: Mapping[str, Any], name: str) -> Any:
    if name in mapping:
        return mapping[name]
    lowered = name.lower()
    for key, value in mapping.items():
        if key.lower() == lowered:
            return value
    return _MISSING


def _equals(found: Any, value: str, path: Sequence[str]) -> bool:
    if isinstance(found, list):
        return any(_equals(element, value, path) for element in found)
    if isinstance(found, Mapping):
        raise FilterError(f'Selector "{".".join(path)}" is an object: compare one of its fields')
    if isinstance(found, bool):
        if value.lower() not in ("true", "false"):
            raise FilterError(f"{value!r} is not a boolean (selector {'.'.join(path)})")
        return found is (value.lower() == "true")
    if isinstance(found, int | float):
        try:
            return float(found) == float(value)
        except ValueError:
            raise FilterError(f"{value!r} is not a number (selector {'.'.join(path)})") from None
    return found is not None and str(found) == value


def _empty(found: Any) -> bool:
    return found is None or (isinstance(found, str | list | Mapping) and len(found) == 0)


def _holds(found: Any, value: str, path: Sequence[str]) -> bool:
    if isinstance(found, str):
        return value in found
    if isinstance(found, list):
        return any(str(element) == value for element in found if not isinstance(element, Mapping | list))
    if isinstance(found, Mapping):
        return value in found
    raise FilterError(f'Selector "{".".join(path)}" is not a list, map or string: use ==')
