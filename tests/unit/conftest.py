"""Unit tests start no processes: skip the per-test scan of /proc for leaked ones (it
costs more than most of these tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers.inprocess_api import Agent, make_agents


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    yield


@pytest.fixture
def agents() -> Iterator[Callable[..., Any]]:
    """In-process agents (``tests/helpers/inprocess_api.py``), made with settings."""
    yield from make_agents()


@pytest.fixture
def agent(agents: Callable[..., Agent]) -> Agent:
    return agents()
