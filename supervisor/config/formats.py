"""Turn the text of one config file into plain Python data (dicts, lists, scalars).

JSON, HCL (version 1, the format of Consul agent configs) and TOML are accepted; the
format follows the file extension. Syntax errors become a ConfigError naming the file
and, where the parser knows it, the line and column.
"""

from __future__ import annotations

import json
import re
import threading
import tomllib
import types
from typing import Any

from supervisor.errors import ConfigError

FORMATS = ("json", "hcl", "toml")


class RepeatedBlocks(list[Any]):
    """Values of a key that an HCL file sets more than once (``service { } service { }``).

    Go's HCL decoder yields a list of objects for repeated blocks; the validator turns
    this marker into a list (list-valued keys), a merge (object-valued keys) or a
    "set more than once" error (scalars).
    """


def format_for(path: str) -> str | None:
    """Return the format of a config file from its extension, or None if not a config file."""
    for name in FORMATS:
        if path.endswith("." + name):
            return name
    return None


def parse_text(text: str, fmt: str, source: str) -> Any:
    """Parse ``text`` in format ``fmt``; ``source`` names the file in error messages."""
    if fmt == "json":
        return _parse_json(text, source)
    if fmt == "hcl":
        return _parse_hcl(text, source)
    if fmt == "toml":
        return _parse_toml(text, source)
    raise ConfigError.single(source, "", f"unknown config format {fmt!r}: use .json, .hcl or .toml")


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError.single(
            source, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


def _parse_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.single(source, "", f"invalid TOML: {exc}") from exc


_hcl_lock = threading.Lock()
_hcl_parser: Any = None


def _keep_repeated_blocks(_self: Any, items: list[tuple[Any, Any]], _replace: bool) -> dict[Any, Any]:
    """Build an object from (key, value) items without losing repeated keys.

    pyhcl's own version shallow-merges a repeated block into the previous one, so two
    ``service`` blocks that both contain ``connect`` lose data silently; this keeps every
    occurrence and lets the validator decide what repetition means for each key.
    """
    result: dict[Any, Any] = {}
    for key, value in items:
        if key not in result:
            result[key] = value
            continue
        previous = result[key]
        if isinstance(previous, RepeatedBlocks):
            previous.append(value)
        elif isinstance(previous, list) and isinstance(value, list):
            result[key] = previous + value
        else:
            result[key] = RepeatedBlocks([previous, value])
    return result


def _parser() -> Any:
    global _hcl_parser
    if _hcl_parser is None:
        from hcl.parser import HclParser  # imported lazily: building the tables costs ~50 ms

        parser = HclParser()
        # Replaced on the instance (not by subclassing) so ply reuses pyhcl's own tables.
        parser.objectlist_flat = types.MethodType(_keep_repeated_blocks, parser)
        _hcl_parser = parser
    return _hcl_parser


_HCL_POSITION = re.compile(r"Line (\d+), column (\d+)")


def _parse_hcl(text: str, source: str) -> Any:
    if text.lstrip().startswith("{"):
        # Consul accepted JSON in .hcl files (HCL is a superset of JSON).
        return _parse_json(text, source)
    with _hcl_lock:
        try:
            return _parser().parse(text)
        except Exception as exc:  # pyhcl raises ValueError, TypeError or its LexError
            message = str(exc).strip() or type(exc).__name__
            match = _HCL_POSITION.search(message)
            if match:
                message = _HCL_POSITION.sub("", message).strip(" :")
                message = f"at line {match.group(1)}, column {match.group(2)}: {message}"
            raise ConfigError.single(source, "", f"invalid HCL {message}") from exc
