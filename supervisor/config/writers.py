"""Writing config documents back in the format they were read from (``convert``).

JSON and TOML have well-kept writers (``json``, ``tomli_w``). HCL 1, the format of
Consul's agent configs, has none in Python (pyhcl only reads), so ``to_hcl`` is written
here: objects become blocks, repeated blocks (``service { } service { }``) stay repeated,
scalars and lists are written as HCL literals; the output is read back by pyhcl in the
tests to the same document.
"""

from __future__ import annotations

import json
import re
from typing import Any

import tomli_w

from supervisor.config.formats import RepeatedBlocks

_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_KEYWORDS = {"true", "false"}  # bare, pyhcl reads them as booleans
INDENT = "  "


class WriteError(ValueError):
    """A value HCL cannot hold (null); the message names it."""


def dump(document: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    if fmt == "toml":
        return tomli_w.dumps(_plain(document))
    return to_hcl(document)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_hcl(document: dict[str, Any]) -> str:
    return "".join(_body(document, 0))


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) and key not in _KEYWORDS else _string(key)


def _string(text: str) -> str:
    """A quoted HCL string: only ``\\`` and ``"`` are escaped (pyhcl reads no other
    escape), everything else is written as it is, non-ASCII letters included."""
    if "\n" in text:
        raise WriteError("a string with a line break")  # a heredoc would not read back exactly
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _body(mapping: dict[str, Any], depth: int) -> list[str]:
    pad = INDENT * depth
    lines: list[str] = []
    for key, value in mapping.items():
        name = _key(str(key))
        if isinstance(value, dict):
            lines += [f"{pad}{name} {{\n", *_body(value, depth + 1), f"{pad}}}\n"]
        elif isinstance(value, RepeatedBlocks) and all(isinstance(v, dict) for v in value):
            for block in value:
                lines += [f"{pad}{name} {{\n", *_body(block, depth + 1), f"{pad}}}\n"]
        else:
            lines.append(f"{pad}{name} = {_literal(value, depth)}\n")
    return lines


def _literal(value: Any, depth: int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dict):
        pad = INDENT * (depth + 1)
        inner = "".join(f"{pad}{_key(str(k))} = {_literal(v, depth + 1)}\n" for k, v in value.items())
        return "{\n" + inner + INDENT * depth + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        pad = INDENT * (depth + 1)
        return "[\n" + "".join(f"{pad}{_literal(v, depth + 1)},\n" for v in value) + INDENT * depth + "]"
    raise WriteError(f"HCL has no {'null' if value is None else type(value).__name__} value")
