"""Change notification for everything that blocking queries wait on.

One neutral piece, owned by the API's event loop: the catalog, the intention and query
stores and the CA bump it when their state changes; blocking queries (``api/blocking``)
wait on it. Thousands of waiters cost one ``set()`` per change.
"""

from __future__ import annotations

import asyncio


class ChangeSignal:
    """Wakes waiters when the agent's state changes. Lives on the API's event loop."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.count = 0
        self.held = 0  # blocking queries waiting for a change right now

    def fire(self) -> None:
        """Must run on the event loop (use ``loop.call_soon_threadsafe`` from elsewhere)."""
        self.count += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    def current(self) -> asyncio.Event:
        """The event the *next* change will set; take it before reading state."""
        return self._event
