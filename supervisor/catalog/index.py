"""Consul-style modify indexes: one counter for the agent's state."""

from __future__ import annotations

import time


class Index:
    """A strictly increasing counter, bumped on every change of the agent's state.

    It starts from the wall clock (milliseconds), so an agent restart never hands out
    an index lower than one a client saw before -- blocking clients would otherwise
    wait for a change that already happened.
    """

    def __init__(self) -> None:
        self.value = int(time.time() * 1000)

    def next(self) -> int:
        self.value += 1
        return self.value
