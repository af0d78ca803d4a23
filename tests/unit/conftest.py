"""Unit tests start no processes: skip the per-test scan of /proc for leaked ones (it
costs more than most of these tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    yield
