"""Check output that changes while the status does not is written at most every
``check_update_interval`` (Consul's key and default, 5 minutes; 0 writes every change).

Why: many checks print something slightly different on every run (a timestamp, a
latency), and each write is a new etcd revision that every agent's watch receives. A
status change, a new check and anything else about a check are written at once; only the
output waits, and the latest output is written when the interval is up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from supervisor.cluster.records import BadRecord, decode


def _without_output(value: bytes) -> object:
    try:
        document = decode(value)
    except BadRecord:
        return None  # (not what an agent writes: written over at once)
    document.pop("Output", None)
    return document


def _only_output(before: bytes, after: bytes) -> bool:
    old, new = _without_output(before), _without_output(after)
    return old is not None and old == new


class OutputDeferral:
    def __init__(self, interval: float, is_check: Callable[[str], bool]) -> None:
        self.interval = interval
        self.is_check = is_check
        self._written_at: dict[str, float] = {}  # check key -> when its record was last written
        self._writing: dict[str, float] = {}  # chosen by the last ``select``, not yet written

    def select(
        self, desired: Mapping[str, bytes], written: Mapping[str, bytes], now: float
    ) -> tuple[dict[str, bytes], float | None]:
        """The records to have in etcd now: ``desired``, except a check whose only change
        since ``written`` is its output and that was written less than the interval ago
        (it keeps its written value). Also returns when the first held-back output is due
        (None: nothing held back)."""
        chosen = dict(desired)
        due: float | None = None
        for key, value in desired.items():
            if not self.is_check(key):
                continue
            before = written.get(key)
            if before == value:
                continue
            last = self._written_at.get(key)
            if (
                before is not None
                and last is not None
                and now < last + self.interval
                and _only_output(before, value)
            ):
                chosen[key] = before
                due = last + self.interval if due is None else min(due, last + self.interval)
                continue
            self._writing[key] = now
        for key in [key for key in self._written_at if key not in desired]:
            del self._written_at[key]
        return chosen, due

    def written(self) -> None:
        """What the last ``select`` chose is in etcd now (a failed write holds nothing back)."""
        self._written_at.update(self._writing)
        self._writing.clear()
