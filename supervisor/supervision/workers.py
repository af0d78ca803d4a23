"""Long-lived worker threads for what must not run on the supervision loop."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("supervisor.workers")

Background = Callable[[Callable[[], None]], None]


class Workers:
    """Two worker threads for the supervisor's slow jobs (reading the config, scanning
    /proc): a thread per job would churn the allocator's per-thread arenas, which is
    where a long-running agent's memory went."""

    def __init__(self, count: int = 2) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"supervisor-worker-{number}", daemon=True)
            for number in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def __call__(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job reports its own outcome; a surprise must not end the worker
                log.exception("a background job of the supervisor failed")

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
