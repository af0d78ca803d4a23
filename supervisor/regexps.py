"""Regular expressions from clients (prepared-query templates, ``?filter=`` ``matches``),
kept to what runs in linear time.

Consul runs these with Go's RE2, which has no backtracking. Python's ``re`` backtracks, so
``^re(a+)+$`` against 30 characters takes seconds on the event loop that serves every
request and DNS query. ``refuse_slow`` refuses what makes the time explode -- a repeat
inside a repeat -- and what RE2 refuses anyway (backreferences, lookaround); what remains
is matched in time proportional to the text times the pattern.
"""

from __future__ import annotations

import re
from re import _constants as _sre_constants  # the parser behind re.compile (Python 3.11+)
from re import _parser as _sre_parser
from typing import Any


def _ops(*names: str) -> set[Any]:
    return {getattr(_sre_constants, name) for name in names if hasattr(_sre_constants, name)}


_REPEATS = _ops("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
_LOOKAROUND = _ops("ASSERT", "ASSERT_NOT")
_BACKREFERENCE = _ops(
    "GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE"
)
_ATOMIC = _ops("ATOMIC_GROUP")


class SlowPattern(ValueError):
    """A pattern this agent will not run (its message says why)."""


def compile_client_regexp(pattern: str) -> re.Pattern[str]:
    """``re.compile`` for a pattern a client sent; raises SlowPattern (or re.error)."""
    compiled = re.compile(pattern)
    problem = _problem(_sre_parser.parse(pattern), inside_repeat=False)
    if problem:
        raise SlowPattern(
            f"{problem} is not accepted: this agent's regular expressions backtrack, and it could "
            "take exponential time (Consul's RE2 does not backtrack; rewrite the pattern without it)"
        )
    return compiled


def _problem(parsed: Any, *, inside_repeat: bool) -> str | None:
    for op, argument in parsed:
        if op in _BACKREFERENCE:
            return "a backreference"
        if op in _LOOKAROUND:
            return "a lookahead or lookbehind"
        if op in _REPEATS:
            _low, high, sub = argument
            repeats = high > 1
            if repeats and inside_repeat:
                return "a repetition inside a repetition (such as (a+)+)"
            found = _problem(sub, inside_repeat=inside_repeat or repeats)
        elif op is _sre_constants.SUBPATTERN:
            found = _problem(argument[-1], inside_repeat=inside_repeat)
        elif op is _sre_constants.BRANCH:
            found = next(filter(None, (_problem(b, inside_repeat=inside_repeat) for b in argument[1])), None)
        elif op in _ATOMIC:
            found = _problem(argument, inside_repeat=inside_repeat)
        else:
            found = None
        if found:
            return found
    return None
