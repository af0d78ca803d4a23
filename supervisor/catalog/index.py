"""Consul-style modify indexes: one counter for the agent's state."""

from __future__ import annotations

import enum
import time


class Family(enum.Enum):
    """What an answer is made of: the records whose deletion can change it (cluster mode
    moves an answer that lost an item to the latest deletion in its families only)."""

    CATALOG = "catalog"
    INTENTIONS = "intentions"
    QUERIES = "queries"


class Index:
    """A strictly increasing counter, bumped on every change of the agent's state.

    It starts from the wall clock (milliseconds), so after a restart the index is, in
    practice, above any a client saw before (it could only fall behind after more than
    one change per millisecond sustained until the restart). Blocking queries return as
    soon as the index *differs* from the client's, so even then none waits for a change
    that already happened.
    """

    def __init__(self) -> None:
        self.value = int(time.time() * 1000)

    def next(self) -> int:
        self.value += 1
        return self.value

    def advance(self, to: int) -> int:
        """Move to at least ``to`` (a cluster's index), and always forward."""
        self.value = max(self.value + 1, to)
        return self.value
