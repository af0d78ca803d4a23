"""Health check statuses and kinds, as Consul spells them on the wire."""

from __future__ import annotations

import enum


class CheckStatus(enum.StrEnum):
    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {CheckStatus.PASSING: 0, CheckStatus.WARNING: 1, CheckStatus.CRITICAL: 2}


class CheckKind(enum.StrEnum):
    TCP = "tcp"
    HTTP = "http"
    TTL = "ttl"


def worst(statuses: list[CheckStatus]) -> CheckStatus:
    """The status an instance has: its worst check's (passing when it has none)."""
    return max(statuses, key=lambda status: status.severity, default=CheckStatus.PASSING)
