"""Reading the configuration off the supervision loop.

Parsing a drop-in of a few MiB takes seconds (pyhcl is pure Python); on the loop it
would delay the restart of a crashed proxy by as much. ``ConfigLoader`` reads on a
worker (``run_in_background``) and hands the outcome back as a ``ConfigLoaded`` event.
A reload asked for while a read is under way is served by a fresh read started after
it: the read in progress may have seen the files before the change that prompted it.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from supervisor.config.model import AgentConfig
from supervisor.errors import ConfigError
from supervisor.supervision.events import ConfigLoaded
from supervisor.supervision.workers import Background

log = logging.getLogger("supervisor.loader")

Reply = concurrent.futures.Future[None]


@dataclass
class _Request:
    reasons: list[str] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)


class ConfigLoader:
    def __init__(
        self,
        load: Callable[[], AgentConfig],
        post: Callable[[ConfigLoaded], None],
        run_in_background: Background,
    ) -> None:
        self.load = load
        self.post = post
        self.run_in_background = run_in_background
        self._reading = False
        self._next: _Request | None = None

    @property
    def reading(self) -> bool:
        return self._reading

    def request(self, reason: str, reply: Reply | None = None) -> None:
        """Read the configuration again (now, or as soon as the read under way is done)."""
        pending = self._next or _Request()
        pending.reasons.append(reason)
        if reply is not None:
            pending.replies.append(reply)
        self._next = pending
        if not self._reading:
            self._start()

    def finished(self) -> None:
        """The supervisor handled a ``ConfigLoaded``: start the read that waited, if any."""
        self._reading = False
        if self._next is not None:
            self._start()

    def cancel(self, error: BaseException) -> None:
        """The agent is shutting down: nobody will apply a waiting read."""
        if self._next is not None:
            for reply in self._next.replies:
                reply.set_exception(error)
            self._next = None

    def _start(self) -> None:
        request, self._next = self._next, None
        assert request is not None
        self._reading = True
        reason = "; ".join(dict.fromkeys(request.reasons))

        def read() -> None:
            try:
                config = self.load()
            except ConfigError as exc:
                self.post(ConfigLoaded(reason, None, exc, tuple(request.replies)))
                return
            except Exception as exc:  # never lose the outcome, whatever load raised
                log.exception("reading the configuration failed")
                error = ConfigError.single("", "", f"the configuration cannot be read: {exc}")
                self.post(ConfigLoaded(reason, None, error, tuple(request.replies)))
                return
            self.post(ConfigLoaded(reason, config, None, tuple(request.replies)))

        self.run_in_background(read)
