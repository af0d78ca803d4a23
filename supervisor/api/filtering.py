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
from collections.abc import Iterable, Mapping
from typing import Any

from supervisor.api.filter_eval import FilterError, Predicate

__all__ = ["MAX_FILTER_LENGTH", "FilterError", "apply_filter", "compile_filter", "filter_values"]

MAX_FILTER_LENGTH = 4096


@functools.lru_cache(maxsize=256)
def compile_filter(expression: str) -> Predicate:
    """A predicate over one JSON object; raises FilterError for a bad expression."""
    if len(expression) > MAX_FILTER_LENGTH:
        raise FilterError(f"filter expression is longer than {MAX_FILTER_LENGTH} characters")
    from supervisor.api import filter_parser  # lark only when a client filters

    return filter_parser.parse(expression)


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
