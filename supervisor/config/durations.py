"""Go-style duration strings ("10s", "1m30s", "250ms"), as Consul config files use them."""

from __future__ import annotations

import re

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ValueError naming the bad text.

    Accepts what Go's time.ParseDuration accepts (an optional sign is refused: a
    negative interval or TTL is never meaningful here). A bare "0" is zero.
    """
    stripped = text.strip()
    if stripped == "0":
        return 0.0
    if not stripped:
        raise ValueError("empty duration")
    position = 0
    total = 0.0
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None:
            raise ValueError(
                f"invalid duration {text!r}: use a number and a unit, such as 10s, 250ms or 1m30s"
            )
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total


def format_duration(seconds: float) -> str:
    """Render seconds the way Go prints a time.Duration (used in API output)."""
    if seconds == 0:
        return "0s"
    if seconds < 1e-3:
        return f"{seconds * 1e6:g}µs"
    if seconds < 1:
        return f"{seconds * 1e3:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if hours or minutes:
        parts.append(f"{int(minutes)}m")
    parts.append(f"{secs:g}s")
    return "".join(parts)
