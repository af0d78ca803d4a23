"""Turn the text of one config file into plain Python data (dicts, lists, scalars).

JSON, HCL (version 1, the format of Consul agent configs) and TOML are accepted; the
format follows the file extension. Syntax errors become a ConfigError naming the file
and, where the parser knows it, the line and column; so does a document past the limits
of ``supervisor.config.limits`` (nested too deep, a string too long, a number too large).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import tomllib
from typing import Any

from hcl.parser import HclParser

from supervisor.config.limits import (
    MAX_DEPTH,
    MAX_NUMBER_DIGITS,
    LimitExceeded,
    bounded_float,
    check_document,
    loads_json,
    number_too_large,
)
from supervisor.errors import ConfigError

log = logging.getLogger("supervisor.config")

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
    """Parse ``text`` in format ``fmt`` and check it against the limits of
    ``supervisor.config.limits``; ``source`` names the file in error messages.

    Raises ConfigError and nothing else, whatever the text: a parser's surprise is a
    problem of that file, not a crash of the agent.
    """
    parse = {"json": _parse_json, "hcl": _parse_hcl, "toml": _parse_toml}.get(fmt)
    if parse is None:
        raise ConfigError.single(source, "", f"unknown config format {fmt!r}: use .json, .hcl or .toml")
    try:
        data = parse(text, source)
        check_document(data)
    except LimitExceeded as exc:
        raise ConfigError.single(source, exc.path, exc.message) from None
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError.single(source, "", f"nested more than {MAX_DEPTH} levels deep") from None
    except Exception as exc:  # third-party parsers raise whatever they like
        if number_too_large(exc):
            raise ConfigError.single(
                source, "", f"a number of more than {MAX_NUMBER_DIGITS} digits"
            ) from None
        log.debug("parsing %s failed", source, exc_info=True)
        raise ConfigError.single(source, "", f"cannot be parsed as {fmt.upper()}: {exc}") from None
    return data


def _parse_json(text: str, source: str) -> Any:
    try:
        return loads_json(text)
    except json.JSONDecodeError as exc:
        raise ConfigError.single(
            source, "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


def _parse_toml(text: str, source: str) -> Any:
    try:
        return tomllib.loads(text, parse_float=bounded_float)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.single(source, "", f"invalid TOML: {exc}") from exc


class _ConsulHclParser(HclParser):  # type: ignore[misc]  # pyhcl has no type hints
    """pyhcl's HCL1 parser, with two behaviours Consul configs need.

    * Repeated keys are kept (``objectlist_flat``): pyhcl shallow-merges a repeated block
      into the previous one, so two ``service`` blocks that both contain ``connect`` lose
      data silently; here every occurrence is kept and the validator decides what
      repetition means for each key.
    * Lists and object lists are built in place: pyhcl's productions copy the list on
      every element (``p[1] + [p[3]]``), so a list of 300,000 tags took minutes.

    Overriding parser methods is pyhcl's extension point (its vendored ply builds the
    tables from the instance's ``p_*`` methods, whose docstrings are the grammar); the
    grammar itself is unchanged, which ``tests/test_config.py`` checks against stock
    pyhcl. pyhcl is pinned below 0.5 in pyproject.toml for that reason.
    """

    start = "top"  # ply takes the first rule by line number otherwise, and ours come first

    def objectlist_flat(self, lt: list[tuple[Any, Any]], replace: bool) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for key, value in lt:
            if key not in result:
                result[key] = value
                continue
            previous = result[key]
            if isinstance(previous, RepeatedBlocks):
                previous.append(value)
            elif isinstance(previous, list) and isinstance(value, list):
                previous.extend(value)
            else:
                result[key] = RepeatedBlocks([previous, value])
        return result

    def p_objectlist_1(self, p: Any) -> None:
        "objectlist : objectlist objectitem"
        p[1].append(p[2])
        p[0] = p[1]

    def p_objectlist_2(self, p: Any) -> None:
        "objectlist : objectlist COMMA objectitem"
        p[1].append(p[3])
        p[0] = p[1]

    def p_listitems_1(self, p: Any) -> None:
        """
        listitems : listitems COMMA listitem
                  | listitems COMMA function
                  | listitems COMMA objectkey
        """
        p[1].append(p[3])
        p[0] = p[1]


_hcl_lock = threading.Lock()
_hcl_parser: _ConsulHclParser | None = None


def hcl_parser() -> _ConsulHclParser:
    """The shared parser (building its tables costs ~20 ms, so it is built once)."""
    global _hcl_parser
    if _hcl_parser is None:
        _hcl_parser = _ConsulHclParser()
    return _hcl_parser


_HCL_POSITION = re.compile(r"Line (\d+), column (\d+)")


def _parse_hcl(text: str, source: str) -> Any:
    if text.lstrip().startswith("{"):
        # Consul accepted JSON in .hcl files (HCL is a superset of JSON).
        return _parse_json(text, source)
    with _hcl_lock:
        try:
            return hcl_parser().parse(text)
        except RecursionError:
            raise
        except Exception as exc:  # pyhcl raises ValueError, TypeError or its LexError
            if number_too_large(exc):
                raise  # reported by parse_text like any parser's
            message = str(exc).strip() or type(exc).__name__
            match = _HCL_POSITION.search(message)
            if match:
                message = _HCL_POSITION.sub("", message).strip(" :")
                message = f"at line {match.group(1)}, column {match.group(2)}: {message}"
            raise ConfigError.single(source, "", f"invalid HCL {message}") from exc
