"""What the supervision loop writes to data_dir: proxy tokens and ports, the record, pid files.

Both classes keep the truth in memory and write it through ``DataDir``; a write that
fails (disk full, data_dir gone) never stops supervision. The allocations are the one
write that must succeed before a proxy may start (a proxy must never run with a token
the next agent would not know), so ``Allocations.save`` reports its failure and the
supervisor blocks the affected proxies and retries; the record and pid files are best
effort, retried with the next change (proxies carry their marker, so the next agent
still finds them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from supervisor.errors import DataDirError, SupervisorError
from supervisor.state.datadir import Allocation, DataDir, ProxyRecord

log = logging.getLogger("supervisor.persistence")


class Allocations:
    """Proxy tokens and auto-assigned ports, kept so reloads and restarts change neither."""

    def __init__(self, data_dir: DataDir | None) -> None:
        self.data_dir = data_dir
        self.current: dict[str, Allocation] = {}
        self._on_disk = True  # false after a rebuild of data_dir failed to write them

    def load(self) -> None:
        if self.data_dir is None:
            return
        allocations, problem = self.data_dir.load_allocations()
        if problem:
            log.error("%s; proxies get new tokens and ports", problem)
        self.current = allocations

    def save(self, planned: Mapping[str, Allocation]) -> DataDirError | None:
        """Make ``planned`` the allocations, on disk first; on failure keep the old ones
        and return the error (the caller blocks proxies whose allocation is new)."""
        if dict(planned) == self.current and self._on_disk:
            return None
        if self.data_dir is not None:
            try:
                self.data_dir.save_allocations(planned)
            except DataDirError as exc:
                return exc
        self.current = dict(planned)
        self._on_disk = True
        return None

    def mark_unsaved(self) -> None:
        """data_dir was rebuilt without them: the next ``save`` writes them again."""
        self._on_disk = False


class RecordBook:
    """The supervision record (snapshot.json) and the informational pid files."""

    def __init__(self, data_dir: DataDir | None) -> None:
        self.data_dir = data_dir
        self._written: dict[str, ProxyRecord] | None = None

    def sync(self, records: Mapping[str, ProxyRecord]) -> bool:
        """Write the record if it differs from what was last written; False if it could
        not be written."""
        if self.data_dir is None or records == self._written:
            return True
        try:
            self.data_dir.save_records(records)
        except SupervisorError as exc:
            # Not fatal: proxies keep running and carry their marker, so the next agent
            # still finds them; say it loudly and retry on the next change.
            log.error("cannot save the supervision record: %s", exc)
            return False
        self._written = dict(records)
        return True

    def invalidate(self) -> None:
        """Rewrite the record on the next ``sync`` (data_dir was rebuilt)."""
        self._written = None

    def process_started(self, proxy_id: str, pid: int) -> None:
        if self.data_dir is None:
            return
        try:  # pid files are for humans; one left damaged or missing is put right
            self.data_dir.write_pid_file(proxy_id, pid)
        except (DataDirError, OSError) as exc:
            log.warning("proxy %s: cannot write pid file: %s", proxy_id, exc)

    def process_gone(self, proxy_id: str) -> None:
        if self.data_dir is None:
            return
        try:
            self.data_dir.remove_pid_file(proxy_id)
        except OSError as exc:
            log.warning("proxy %s: cannot remove pid file: %s", proxy_id, exc)
