"""A small declarative validator for config documents.

Each node (``Str``, ``Int``, ``Obj`` …) checks one value and returns it cleaned
(canonical snake_case keys, numbers normalised). Problems are collected with the key
path (``services[0].connect.proxy.comand``) so that every mistake in a file is
reported at once. Keys that Consul understood but this tool does not use are accepted
and reported as notices, so an unmodified Consul agent config still loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.config.durations import parse_duration
from supervisor.config.formats import RepeatedBlocks
from supervisor.errors import ConfigProblem


class Invalid(Exception):
    """Raised inside a node when a value cannot be used; caught and recorded by ``Context``."""


@dataclass
class Context:
    """Collects problems and notices while one document is validated.

    ``from_client``: the document is an API body, decoded as Consul decodes bodies --
    ``null`` means absent and keys this tool does not know are skipped (newer clients
    send fields such as ``Namespace``); they are listed in ``skipped``. Config files
    stay strict: there an unknown key is a typo worth an error.
    """

    source: str
    problems: list[ConfigProblem] = field(default_factory=list)
    notices: list[ConfigProblem] = field(default_factory=list)
    from_client: bool = False
    skipped: list[str] = field(default_factory=list)

    def problem(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.source, path, message))

    def notice(self, path: str, message: str) -> None:
        self.notices.append(ConfigProblem(self.source, path, message))


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    """Name a value's type the way a config author thinks of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def normalise_key(key: str) -> str:
    """Consul matched keys case-insensitively: ``DestinationName`` is ``destination_name``."""
    return key.replace("_", "").replace("-", "").lower()


def find_key(mapping: Mapping[str, Any], name: str) -> str | None:
    """The key of a client's or a file's ``mapping`` that means ``name``, in any spelling."""
    wanted = normalise_key(name)
    return next((key for key in mapping if normalise_key(str(key)) == wanted), None)


class Node:
    """One value's rule. ``check`` raises ``Invalid`` or returns the cleaned value."""

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        raise NotImplementedError

    def validate(self, value: Any, path: str, ctx: Context) -> Any:
        """Check ``value`` and record a problem instead of raising; returns None on error."""
        if isinstance(value, RepeatedBlocks) and not isinstance(self, List | Obj | OneOrMany):
            ctx.problem(path, "set more than once in this file")
            return None
        try:
            return self.check(value, path, ctx)
        except Invalid as exc:
            ctx.problem(path, str(exc))
            return None


class Str(Node):
    def __init__(self, choices: tuple[str, ...] | None = None, *, casefold: bool = False) -> None:
        self.choices = choices
        self.casefold = casefold

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        if not isinstance(value, str):
            raise Invalid(f"expected a string, got {describe(value)}")
        if self.choices is not None:
            candidate = value.upper() if self.casefold else value
            if candidate not in self.choices:
                allowed = ", ".join(repr(choice) for choice in self.choices)
                raise Invalid(f"{value!r} is not one of {allowed}")
            return candidate
        return value


class Int(Node):
    """An integer; JSON/HCL floats with an integral value (20000.0) are accepted."""

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        number = as_int(value)
        if number is None:
            raise Invalid(f"expected an integer, got {describe(value)}")
        if self.minimum is not None and number < self.minimum:
            raise Invalid(f"{number} is below the minimum of {self.minimum}")
        if self.maximum is not None and number > self.maximum:
            raise Invalid(f"{number} is above the maximum of {self.maximum}")
        return number


def as_int(value: Any) -> int | None:
    """Return ``value`` as an int if it is an integer number, else None (booleans are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class Bool(Node):
    def check(self, value: Any, path: str, ctx: Context) -> Any:
        if not isinstance(value, bool):
            raise Invalid(f"expected true or false, got {describe(value)}")
        return value


class Duration(Node):
    """A Go duration string ("10s"); returns seconds as a float."""

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        if not isinstance(value, str):
            raise Invalid(f'expected a duration such as "10s", got {describe(value)}')
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None


class Opaque(Node):
    """Any JSON value, passed through untouched (proxy ``config`` maps, ``meta`` values)."""

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        return value


class Custom(Node):
    """Delegate to a function that raises ``Invalid`` (for one-off rules)."""

    def __init__(self, func: Callable[[Any, str, Context], Any]) -> None:
        self.func = func

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        return self.func(value, path, ctx)


class List(Node):
    def __init__(self, item: Node, *, allow_single: bool = False) -> None:
        self.item = item
        self.allow_single = allow_single

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        if isinstance(value, RepeatedBlocks):
            value = [element for part in value for element in (part if isinstance(part, list) else [part])]
        if not isinstance(value, list):
            if self.allow_single and not isinstance(value, dict):
                value = [value]
            else:
                raise Invalid(f"expected a list, got {describe(value)}")
        return [self.item.validate(element, f"{path}[{index}]", ctx) for index, element in enumerate(value)]


class Map(Node):
    """An object with user-chosen keys (``meta``); values checked by ``value``."""

    def __init__(self, value: Node) -> None:
        self.value = value

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        if not isinstance(value, dict):
            raise Invalid(f"expected an object, got {describe(value)}")
        return {str(key): self.value.validate(item, join(path, str(key)), ctx) for key, item in value.items()}


def merge_repeated(blocks: list[Any]) -> Any:
    """Deep-merge repeated HCL blocks in order (later keys win)."""
    merged: dict[str, Any] = {}
    for block in blocks:
        if not isinstance(block, dict):
            raise Invalid(f"expected an object, got {describe(block)}")
        for key, value in block.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_repeated([merged[key], value])
            else:
                merged[key] = value
    return merged


class Obj(Node):
    """An object with a fixed set of keys.

    ``fields`` are the keys this tool uses; ``ignored`` maps keys Consul knew but this tool
    does not use to the reason shown in the notice; any other key is an error.
    ``required`` keys must be present. ``rename`` maps legacy spellings to fields.
    """

    def __init__(
        self,
        fields: Mapping[str, Node],
        *,
        ignored: Mapping[str, str] | None = None,
        required: tuple[str, ...] = (),
        rename: Mapping[str, str] | None = None,
    ) -> None:
        self.fields = dict(fields)
        self.ignored = dict(ignored or {})
        self.required = required
        self.rename = dict(rename or {})
        self._lookup: dict[str, str] = {}
        for name in (*self.fields, *self.ignored, *self.rename):
            self._lookup[normalise_key(name)] = name

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        if isinstance(value, RepeatedBlocks):
            value = merge_repeated(list(value))
        if not isinstance(value, dict):
            raise Invalid(f"expected an object, got {describe(value)}")
        cleaned: dict[str, Any] = {}
        for raw_key, item in value.items():
            key = str(raw_key)
            name = key if key in self._lookup.values() else self._lookup.get(normalise_key(key))
            key_path = join(path, key)
            if ctx.from_client and (item is None or name is None):
                if name is None:
                    ctx.skipped.append(key_path)
                continue
            if name is None:
                ctx.problem(key_path, "unknown key" + self._hint(key))
                continue
            if name in self.ignored:
                ctx.notice(key_path, f"ignored: {self.ignored[name]}")
                continue
            name = self.rename.get(name, name)
            if name in cleaned:
                ctx.problem(key_path, f"given twice (also as {name!r})")
                continue
            cleaned[name] = self.fields[name].validate(item, key_path, ctx)
        camel_case = any(str(key)[:1].isupper() for key in value)
        for name in self.required:
            if name not in cleaned:
                shown = "".join(part.capitalize() for part in name.split("_")) if camel_case else name
                ctx.problem(join(path, shown), "required key is missing")
        return cleaned

    def _hint(self, key: str) -> str:
        """Suggest the nearest known key for a typo (comand -> command)."""
        import difflib

        matches = difflib.get_close_matches(key.lower(), list(self.fields), n=1, cutoff=0.75)
        return f" (did you mean {matches[0]!r}?)" if matches else ""


class OneOrMany(Node):
    """Consul's ``service``/``check`` keys: one object or a list of them; always a list."""

    def __init__(self, item: Node) -> None:
        self.item = item

    def check(self, value: Any, path: str, ctx: Context) -> Any:
        if isinstance(value, dict):
            return [self.item.validate(value, path, ctx)]
        if isinstance(value, list):
            return [
                self.item.validate(element, f"{path}[{index}]", ctx) for index, element in enumerate(value)
            ]
        raise Invalid(f"expected an object or a list of objects, got {describe(value)}")
