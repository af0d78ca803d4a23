"""Log levels as Consul spells them, for the agent and the built-in proxy alike."""

from __future__ import annotations

import logging

TRACE = 5
NUMBERS = {
    "TRACE": TRACE,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERR": logging.ERROR,
}
SPELLINGS = {**{name: name for name in NUMBERS}, "WARNING": "WARN", "ERROR": "ERR"}
NAMES = {number: name for name, number in NUMBERS.items()} | {logging.ERROR: "ERROR"}


def canonical(name: str) -> str | None:
    """``warning`` -> ``WARN``; None for a name that is no level."""
    return SPELLINGS.get(name.upper())


def numeric(name: str, default: int = logging.INFO) -> int:
    spelled = canonical(name)
    return NUMBERS[spelled] if spelled else default
