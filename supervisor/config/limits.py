"""Bounds on every document the agent reads: config files and API request bodies.

Parsers and the recursive validators behind them are only safe on documents of sane
shape: a drop-in nested 700 levels deep, or a number of 5,000 digits, would otherwise
end in a RecursionError or a ValueError deep inside a parser, far from any message a
user can act on. Every document is therefore checked against these limits right after
parsing (and JSON numbers before they are even converted), and a breach is reported as
an ordinary problem naming the file (or request) and the key.

The limits are generous for real configurations (Consul agent configs nest about ten
levels deep and carry PEM strings of a few KiB) and small enough that nothing past
them can hurt the agent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_FILE_BYTES = 4 * 1024 * 1024
"""Largest config file read (a config with thousands of services is well below 1 MiB)."""

MAX_DEPTH = 64
"""Deepest nesting of objects and lists, counted from the document's top level."""

MAX_STRING_CHARS = 64 * 1024
"""Longest string (key or value); PEM certificates and keys are a few KiB."""

MAX_NUMBER_DIGITS = 64
"""Longest number literal, in characters; ports, sizes and timeouts need far fewer."""


_NUMBER_BOUND = 10**MAX_NUMBER_DIGITS


class LimitExceeded(ValueError):
    """A document breaks one of the limits above; ``path`` is the key path, if known."""

    def __init__(self, path: str, message: str) -> None:
        if len(path) > 120:  # a path 700 levels deep says nothing more than its start
            path = path[:100] + "..."
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def _number_literal(text: str) -> None:
    if len(text) > MAX_NUMBER_DIGITS:
        raise LimitExceeded(
            "", f"a number has {len(text)} characters; at most {MAX_NUMBER_DIGITS} are allowed"
        )


def _bounded_int(text: str) -> int:
    _number_literal(text)
    return int(text)


def bounded_float(text: str) -> float:
    """A float parser hook (json, tomllib) that refuses over-long literals."""
    _number_literal(text)
    return float(text)


def no_constant(text: str) -> Any:
    """A ``parse_constant`` hook for ``json``: NaN and Infinity are no JSON numbers."""
    raise LimitExceeded("", f"{text} is not a JSON number")


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` that enforces the limits; raises ``json.JSONDecodeError`` for bad
    syntax and ``LimitExceeded`` for a document past a limit (never another error)."""
    try:
        data = json.loads(text, parse_int=_bounded_int, parse_float=bounded_float, parse_constant=no_constant)
    except RecursionError:
        raise LimitExceeded("", f"nested more than {MAX_DEPTH} levels deep") from None
    check_document(data)
    return data


def parse_uint(text: str, max_digits: int = 19) -> int | None:
    """``text`` as a non-negative integer if it is plain ASCII digits, at most
    ``max_digits`` of them (19 fit an int64), else None. ``str.isdigit`` alone is not
    enough: it accepts "²", which ``int`` refuses, and any number of digits."""
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def number_too_large(exc: BaseException) -> bool:
    """Whether a parser's ValueError comes from CPython's cap on integer digits."""
    return isinstance(exc, ValueError) and "integer string conversion" in str(exc)


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


@dataclass(frozen=True)
class _Frame:
    value: Any
    path: str
    depth: int


def check_document(data: Any) -> None:
    """Walk ``data`` without recursion; raise ``LimitExceeded`` at the first value past a limit."""
    stack = [_Frame(data, "", 0)]
    while stack:
        frame = stack.pop()
        value, path = frame.value, frame.path
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise LimitExceeded(
                    path, f"a string of {len(value)} characters; at most {MAX_STRING_CHARS} are allowed"
                )
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if abs(value) >= _NUMBER_BOUND:
                raise LimitExceeded(path, f"a number of more than {MAX_NUMBER_DIGITS} digits")
        elif isinstance(value, dict | list | tuple):
            depth = frame.depth + 1
            if depth > MAX_DEPTH:
                raise LimitExceeded(path, f"nested more than {MAX_DEPTH} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and len(key) > MAX_STRING_CHARS:
                    raise LimitExceeded(path, f"a key of {len(key)} characters")
                stack.append(_Frame(item, _join(path, key), depth))


def key_encryption_key(data: bytes) -> bytes | None:
    """A cluster CA's key-encryption key as its file holds it: 32 random bytes, raw or as
    64 hex digits (``openssl rand -hex 32``); None when it is neither."""
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    return data if len(data) == 32 else None
