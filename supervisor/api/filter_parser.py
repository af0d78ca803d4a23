"""The grammar of filter expressions (go-bexpr's), parsed with lark into nested closures.

Imported on the first ``?filter=`` only (``supervisor/api/filtering.py``): lark and the
compiled grammar cost the agent several MiB it need not carry when no client filters.
"""

from __future__ import annotations

import re
from typing import Any

from lark import Lark, Token, Transformer, Tree, UnexpectedInput, v_args
from lark.exceptions import VisitError

from supervisor.api.filter_eval import FilterError, Predicate, empty, equals, holds, resolve, unquote
from supervisor.regexps import SlowPattern, compile_client_regexp

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

MAX_FILTER_DEPTH = 64  # nested and/or/not: evaluation recurses once per level

_PARSER = Lark(GRAMMAR, parser="earley", ambiguity="resolve", propagate_positions=False)


def parse(expression: str) -> Predicate:
    """A predicate over one JSON object; raises FilterError for a bad expression."""
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
        return tuple(unquote(name) if name.type == "STRING" else str(name) for name in names)

    def value(self, token: Token) -> str:
        if token.type == "STRING":
            return unquote(token)
        if token.type == "RAW":
            return str(token)[1:-1]
        return str(token)

    def equal(self, path: tuple[str, ...], value: str) -> Predicate:
        return lambda item: any(equals(found, value, path) for found in resolve(item, path))

    def not_equal(self, path: tuple[str, ...], value: str) -> Predicate:
        equal = self.equal(path, value)
        return lambda item: not equal(item)

    def is_empty(self, path: tuple[str, ...]) -> Predicate:
        return lambda item: all(empty(found) for found in resolve(item, path))

    def is_not_empty(self, path: tuple[str, ...]) -> Predicate:
        is_empty = self.is_empty(path)
        return lambda item: not is_empty(item)

    def value_in(self, value: str, path: tuple[str, ...]) -> Predicate:
        return lambda item: any(holds(found, value, path) for found in resolve(item, path))

    def value_not_in(self, value: str, path: tuple[str, ...]) -> Predicate:
        holds = self.value_in(value, path)
        return lambda item: not holds(item)

    def contains(self, path: tuple[str, ...], value: str) -> Predicate:
        return self.value_in(value, path)

    def not_contains(self, path: tuple[str, ...], value: str) -> Predicate:
        return self.value_not_in(value, path)

    def matches(self, path: tuple[str, ...], value: str) -> Predicate:
        try:
            pattern = compile_client_regexp(value)
        except re.error as exc:
            raise FilterError(f"invalid regular expression {value!r}: {exc}") from None
        except SlowPattern as exc:
            raise FilterError(f"regular expression {value!r}: {exc}") from None

        def match(item: Any) -> bool:
            return any(isinstance(found, str) and pattern.search(found) for found in resolve(item, path))

        return match

    def not_matches(self, path: tuple[str, ...], value: str) -> Predicate:
        match = self.matches(path, value)
        return lambda item: not match(item)
