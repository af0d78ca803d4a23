"""Evaluating filter expressions against Consul's wire objects (``supervisor/api/filtering.py``
is the entry point): what a selector reaches and what ``==``, ``in`` and ``is empty`` mean
for each JSON type, as go-bexpr decides them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Predicate = Callable[[Any], bool]
MISSING = object()


class FilterError(ValueError):
    """The expression cannot be parsed or cannot be applied to this endpoint's objects."""


def unquote(token: str) -> str:
    body = str(token)[1:-1]
    return re.sub(r"\\(.)", lambda found: {"n": "\n", "t": "\t"}.get(found.group(1), found.group(1)), body)


def resolve(item: Any, path: Sequence[str]) -> list[Any]:
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
                if found is MISSING:
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
    return MISSING


def equals(found: Any, value: str, path: Sequence[str]) -> bool:
    if isinstance(found, list):
        return any(equals(element, value, path) for element in found)
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


def empty(found: Any) -> bool:
    return found is None or (isinstance(found, str | list | Mapping) and len(found) == 0)


def holds(found: Any, value: str, path: Sequence[str]) -> bool:
    if isinstance(found, str):
        return value in found
    if isinstance(found, list):
        return any(str(element) == value for element in found if not isinstance(element, Mapping | list))
    if isinstance(found, Mapping):
        return value in found
    raise FilterError(f'Selector "{".".join(path)}" is not a list, map or string: use ==')
