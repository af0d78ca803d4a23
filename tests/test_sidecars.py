"""Sidecars on a real agent with real proxies: ``sidecar_service`` supervised by the agent
(``connect.proxy.supervise_sidecars``: the built-in proxy on the sidecar's port, adopted
across an agent ``kill -9``, refused as root without ``allow_managed_root``), and the
Consul way -- the agent only registers, ``proxy-supervisor connect proxy -sidecar-for``
runs the proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers.agent import AgentProcess
from tests.helpers.apps import EchoApp
from tests.helpers.mesh import talk
from tests.helpers.processes import wait_until


def sidecar_mesh(agent: AgentProcess, app: EchoApp, upstream_port: int) -> None:
    # Ports the kernel just handed out, one per sidecar: a run of 16 around one (the
    # automatic assignment's range) can hold a port another test's process is using.
    # The assignment itself is tested in tests/unit/test_sidecars.py.
    db_sidecar = {"port": free_port()}
    agent.write(
        "db.json",
        {"service": {"name": "db", "port": app.port, "connect": {"sidecar_service": db_sidecar}}},
    )
    upstreams = [{"destination_name": "db", "local_bind_port": upstream_port}]
    web_sidecar = {"port": free_port(), "proxy": {"upstreams": upstreams}}
    agent.write(
        "web.json",
        {"service": {"name": "web", "port": 8080, "connect": {"sidecar_service": web_sidecar}}},
    )


@pytest.fixture
def app() -> Iterator[EchoApp]:
    echo = EchoApp(trailer=b"|db")
    yield echo
    echo.close()


def settings(**proxy: Any) -> dict[str, Any]:
    return {"bind_addr": "127.0.0.1", "connect": {"proxy": proxy}}


def test_supervised_sidecars_carry_traffic_and_are_adopted(tmp_path: Path, app: EchoApp) -> None:
    agent = AgentProcess(tmp_path, extra=settings(supervise_sidecars=True, allow_managed_root=True))
    upstream_port = free_port()
    sidecar_mesh(agent, app, upstream_port)
    try:
        agent.start()
        db = agent.wait_state("db-sidecar-proxy", "running")
        agent.wait_state("web-sidecar-proxy", "running")
        sidecar = agent.get("/v1/agent/services")["db-sidecar-proxy"]
        assert db["Port"] == sidecar["Port"]  # the proxy listens on the sidecar's port
        assert "db-proxy" not in agent.get("/v1/agent/services")
        # (db's sidecar check ran before its proxy listened, and runs again an interval, 10 s, later)
        wait_until(lambda: talk(upstream_port) == b"ping|db", timeout=45, message="traffic through sidecars")
        # Listening (TCP on the sidecar port) and aliasing (db has no checks) both pass.
        wait_until(lambda: len(agent.get("/v1/health/connect/db?passing")) == 1, timeout=20)
        assert agent.data_dir is not None
        assert (agent.data_dir / "proxy" / "logs" / "db-sidecar-proxy-stderr.log").exists()

        agent.kill9()
        agent.start()
        again = agent.wait_state("db-sidecar-proxy", "running")
        assert again["Pid"] == db["Pid"], "the sidecar was not adopted"
        assert talk(upstream_port) == b"ping|db"

        # Operator commands take the service's name, as for managed proxies.
        restarted = agent.cli("restart", "db")
        assert restarted.returncode == 0, restarted.stderr
        after = agent.wait_state("db-sidecar-proxy", "running")
        assert after["Pid"] != db["Pid"]
        logs = agent.cli("logs", "db", "-stderr", "-data-dir", str(agent.data_dir))
        assert logs.returncode == 0 and "db-sidecar-proxy" in logs.stdout
        wait_until(lambda: talk(upstream_port) == b"ping|db", timeout=20, message="traffic after the restart")
    finally:
        agent.kill_everything()


@pytest.mark.skipif(os.geteuid() != 0, reason="the root refusal needs root")
def test_a_supervised_sidecar_is_refused_as_root_without_allow_managed_root(
    tmp_path: Path, app: EchoApp
) -> None:
    agent = AgentProcess(tmp_path, extra=settings(supervise_sidecars=True))
    sidecar_mesh(agent, app, free_port())
    try:
        agent.start()
        blocked = agent.wait_state("db-sidecar-proxy", "blocked")
        assert "root" in blocked["BlockedReason"]
    finally:
        agent.kill_everything()


def test_sidecar_for_runs_the_registered_sidecar(tmp_path: Path, app: EchoApp) -> None:
    agent = AgentProcess(tmp_path, extra=settings())
    upstream_port = free_port()
    sidecar_mesh(agent, app, upstream_port)
    proxies: list[subprocess.Popen[bytes]] = []
    try:
        agent.start()
        assert agent.proxies() == {}  # registered, not supervised: Consul's semantics
        env = dict(os.environ, CONSUL_HTTP_ADDR=agent.address)
        command = [sys.executable, "-m", "supervisor", "connect", "proxy"]
        missing = subprocess.run(
            [*command, "-sidecar-for", "nope"], env=env, capture_output=True, text=True, timeout=30
        )
        assert missing.returncode != 0 and "No sidecar proxy registered for nope" in missing.stderr
        for service in ("db", "web"):
            with open(tmp_path / f"{service}-sidecar.log", "wb") as log:
                proxies.append(
                    subprocess.Popen(
                        [*command, "-sidecar-for", service],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        # (db's sidecar check ran before its proxy listened, and runs again an interval, 10 s, later)
        try:
            wait_until(
                lambda: talk(upstream_port) == b"ping|db", timeout=45, message="traffic through sidecars"
            )
        except AssertionError as exc:  # (what the sidecars said, for whoever reads a failure)
            said = {s: (tmp_path / f"{s}-sidecar.log").read_text()[-2000:] for s in ("db", "web")}
            raise AssertionError(f"{exc}; {said}") from None
        wait_until(lambda: len(agent.get("/v1/health/connect/db?passing")) == 1, timeout=20)
        assert "Proxy ID: db-sidecar-proxy" in (tmp_path / "db-sidecar.log").read_text()
    finally:
        for proxy in proxies:
            if proxy.poll() is None:
                os.killpg(proxy.pid, signal.SIGKILL)
            proxy.wait()
        agent.kill_everything()
