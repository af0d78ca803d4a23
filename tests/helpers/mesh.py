"""A two-service mesh on one real agent: ``web`` (upstream ``db`` on a local port) and
``db`` (an echo app), both with default (built-in) managed proxies."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.helpers.agent import AgentProcess
from tests.helpers.apps import EchoApp
from tests.helpers.processes import wait_until

ALLOW = {"connect": {"proxy": {"allow_managed_root": True}}}


def talk(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    """Send ``payload``, end the stream, and read everything until the peer closes."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
            return b"".join(chunks)
    except OSError:
        return b""


class Mesh:
    def __init__(
        self, root: Path, *, db_config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ):
        self.app = EchoApp(trailer=b"|db")
        self.upstream_port = free_port()
        self.agent = AgentProcess(root, extra={**ALLOW, "bind_addr": "127.0.0.1", **(extra or {})})
        self.db_config = db_config or {}
        self.write_web([{"destination_name": "db", "local_bind_port": self.upstream_port}])
        self.write_db(self.db_config)

    def write_web(self, upstreams: list[dict[str, Any]], **config: Any) -> None:
        self.agent.write(
            "web.json",
            {
                "service": {
                    "name": "web",
                    "port": 8080,
                    "connect": {"proxy": {"upstreams": upstreams, "config": config}},
                }
            },
        )

    def write_db(self, config: dict[str, Any], app_port: int | None = None) -> None:
        self.agent.write(
            "db.json",
            {
                "service": {
                    "name": "db",
                    "port": app_port or self.app.port,
                    "connect": {"proxy": {"config": config}},
                }
            },
        )

    def start(self) -> None:
        self.agent.start()
        self.agent.wait_state("web-proxy", "running")
        self.agent.wait_state("db-proxy", "running")
        wait_until(
            lambda: talk(self.upstream_port) == b"ping|db", timeout=20, message="the mesh to carry traffic"
        )

    def public_port(self, proxy_id: str = "db-proxy") -> int:
        return int(self.agent.proxies()[proxy_id]["Port"])

    def proxy_log(self, proxy_id: str) -> str:
        assert self.agent.data_dir is not None
        return (self.agent.data_dir / "proxy" / "logs" / f"{proxy_id}-stderr.log").read_text()

    def close(self) -> None:
        self.agent.kill_everything()
        self.app.close()
