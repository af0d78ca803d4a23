"""Shared fixtures. Every process a test starts inherits a per-session tag in its
environment; after each test anything still carrying the tag is killed, so a failing
test cannot leak an agent or a proxy into the next one (or into CI's machine)."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator

import pytest

from tests.helpers.etcd import EtcdCluster, etcd_binary, kill_leftover_etcd
from tests.helpers.ports import free_port, free_port_range
from tests.helpers.processes import TEST_TAG_ENV, kill_tagged
from tests.helpers.unprivileged import Unprivileged, find_unprivileged

__all__ = ["free_port", "free_port_range"]  # (where tests have always imported them from)

SESSION_TAG = uuid.uuid4().hex
os.environ[TEST_TAG_ENV] = SESSION_TAG


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    yield
    leaked = kill_tagged(SESSION_TAG)
    if leaked:
        # The test's own teardown should have stopped these; say so without failing
        # the next test for it.
        warnings.warn(f"killed {len(leaked)} process(es) left behind by the test: {leaked}", stacklevel=1)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="session")
def nobody() -> Iterator[Unprivileged]:
    """Our packages staged where the nobody user can run them (root only; skips otherwise)."""
    runtime = find_unprivileged()
    if isinstance(runtime, str):
        pytest.skip(runtime)
    yield runtime
    shutil.rmtree(runtime.pythonpath, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """One 3-member etcd cluster on loopback for the tests that do not kill or cut off
    members (those make their own); each test keeps to its own key prefix."""
    binary = etcd_binary()
    if binary is None:
        if os.environ.get("PROXY_SUPERVISOR_REQUIRE_ETCD") == "1":
            pytest.fail("etcd is required here (PROXY_SUPERVISOR_REQUIRE_ETCD=1) but was not found")
        pytest.skip("no etcd binary (apt-get download etcd-server; see .ci/run)")
    kill_leftover_etcd()
    cluster = EtcdCluster(binary)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_prefix() -> str:
    return f"/t/{uuid.uuid4().hex[:12]}/"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long soak variants run only when asked for with ``-m soak``."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long soak variant: run with -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
