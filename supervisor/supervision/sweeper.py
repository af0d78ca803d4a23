"""Killing what exited proxies leave behind (a double-forked daemon, say).

Finding leftovers means reading the environment of every process in /proc, which takes
milliseconds: the scan runs off the loop (``run_in_background``) and its result comes
back as a ``SweepScanned`` event. What to kill is decided on the loop, against the
proxy sessions that exist *then*, and ``kill_marked`` re-checks each process's identity
through a pidfd before signalling it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from supervisor.process.marker import MarkedProcess, kill_marked
from supervisor.supervision.events import SweepScanned
from supervisor.supervision.workers import Background

log = logging.getLogger("supervisor.sweeper")


class LeftoverSweeper:
    def __init__(
        self,
        node_id: str,
        scan: Callable[[str, Collection[int]], list[MarkedProcess]],
        post: Callable[[SweepScanned], None],
        run_in_background: Background,
        kill: Callable[[MarkedProcess], bool] = kill_marked,
    ) -> None:
        self.node_id = node_id
        self.scan = scan
        self.post = post
        self.run_in_background = run_in_background
        self.kill = kill
        self._needed: set[str] = set()
        self._scanning = False

    def exited(self, proxy_id: str) -> None:
        """A process of ``proxy_id`` is gone: look for what it left once the loop is free."""
        self._needed.add(proxy_id)

    def start_if_needed(self, live_sessions: Collection[int] = ()) -> None:
        """Scan now, skipping the sessions of proxies alive now (what is in them is theirs)."""
        if not self._needed or self._scanning:
            return
        proxy_ids, self._needed = frozenset(self._needed), set()
        self._scanning = True
        skip = frozenset(live_sessions)

        def scan() -> None:
            try:
                found = tuple(self.scan(self.node_id, skip))
            except OSError as exc:
                log.warning("cannot scan /proc for leftover proxy processes: %s", exc)
                found = ()
            self.post(SweepScanned(proxy_ids, found))

        self.run_in_background(scan)

    def scanned(self, event: SweepScanned, current_sessions: Collection[int]) -> None:
        """Kill marked processes of these proxies outside the sessions of live proxies."""
        self._scanning = False
        for process in event.found:
            if process.marker.proxy_id in event.proxy_ids and process.stat.session not in current_sessions:
                if self.kill(process):
                    log.warning(
                        "proxy %s: killed leftover process %d (%s) of an exited generation",
                        process.marker.proxy_id,
                        process.pid,
                        process.stat.comm,
                    )

    @property
    def pending(self) -> bool:
        """Exits wait for a sweep that has not started yet."""
        return bool(self._needed)

    def kill_all_marked(self) -> None:
        """After ``leave`` stopped every proxy: anything still carrying our marker is a
        leftover that no later agent would know to clean up."""
        for process in self.scan(self.node_id, ()):
            if self.kill(process):
                log.warning(
                    "killed leftover process %d (%s) of proxy %s",
                    process.pid,
                    process.stat.comm,
                    process.marker.proxy_id,
                )
