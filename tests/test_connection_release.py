"""Connections to the agent are released as soon as either side is done with them.

Found by the soak (``python -m bench soak``): proxies that drop a watch (an upstream
removed) or exit (a service removed) left blocking queries, and so sockets, held on both
sides until the query's wait ran out, up to 10 minutes. Under config churn the agent's
and the proxies' fd counts grew without bound.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from builtin_proxy.agent import AgentConnection, Watch
from tests.helpers.agent import AgentProcess
from tests.helpers.processes import wait_until


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path)
    process.write("web.json", {"service": {"name": "web", "port": 8080}})
    process.start()
    yield process
    process.kill_everything()


def test_agent_releases_a_blocking_query_whose_client_hung_up(agent: AgentProcess) -> None:
    assert agent.process is not None
    server = psutil.Process(agent.process.pid)
    index = agent.http("GET", "/v1/health/service/web")[1]["X-Consul-Index"]
    clients: list[socket.socket] = []

    def held() -> set[int]:
        """Our clients' ports that the agent still has a connection from."""
        ours = {sock.getsockname()[1] for sock in clients}
        return {c.raddr.port for c in server.net_connections("tcp") if c.raddr and c.raddr.port in ours}

    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
            clients.append(sock)
            query = f"GET /v1/health/service/web?index={index}&wait=5m HTTP/1.1\r\nHost: x\r\n\r\n"
            sock.sendall(query.encode())
        wait_until(lambda: len(held()) == 20, timeout=5, message="20 held queries")
        for sock in clients:
            sock.shutdown(socket.SHUT_RDWR)  # hang up, keeping the port numbers to look for
        # Released within moments, not after the 5 minute wait.
        wait_until(lambda: not held(), timeout=5, message="the agent to close them")
    finally:
        for sock in clients:
            sock.close()
    assert agent.http("GET", "/v1/agent/self")[0] == 200


def test_a_stopped_watch_ends_its_held_query_at_once(agent: AgentProcess) -> None:
    delivered: list[object] = []
    watch = Watch(
        "test",
        AgentConnection(agent.address, ""),
        "/v1/health/connect/web?passing",
        lambda function, data: delivered.append(data),
        lambda data: None,
    )
    watch.start()
    try:
        wait_until(lambda: delivered, timeout=5)  # first answer in, now held in a blocking query
        time.sleep(0.2)
        began = time.monotonic()
        watch.stop()
        watch.join(5)
        assert not watch.is_alive() and time.monotonic() - began < 1.0
    finally:
        watch.stop()
