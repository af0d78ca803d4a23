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
    SCRIPT = "script"  # runs ``args``; exit 0 passing, 1 warning, else critical
    ALIAS = "alias"  # the health of another service (of this node)
    MAINTENANCE = "maintenance"  # Consul's maintenance-mode checks: critical while set

    @property
    def probed(self) -> bool:
        """Run on an interval (the others change by updates or by other checks)."""
        return self in (CheckKind.TCP, CheckKind.HTTP, CheckKind.SCRIPT)


def worst(statuses: list[CheckStatus]) -> CheckStatus:
    """The status an instance has: its worst check's (passing when it has none)."""
    return max(statuses, key=lambda status: status.severity, default=CheckStatus.PASSING)
