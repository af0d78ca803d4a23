"""The agent's HTTP API: binds its address, then serves on its own thread and event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading

from supervisor.api.agent_endpoints import AgentEndpoints
from supervisor.api.blocking import ChangeSignal
from supervisor.api.http import MAX_HEADER_BYTES, HttpServer
from supervisor.api.router import Router
from supervisor.errors import ListenError
from supervisor.supervision.manager import Supervisor
from supervisor.supervision.view import AgentView, ViewBoard

log = logging.getLogger("supervisor.api")


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a taken port stops the agent before any proxy starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        hint = (
            "another process (another agent, or Consul) is listening there; stop it or set ports.http"
            if exc.errno == errno.EADDRINUSE
            else "set addresses.http / client_addr to an address of this host"
        )
        raise ListenError(f"cannot listen on {address} for the HTTP API: {exc.strerror}; {hint}") from exc
    sock.setblocking(False)
    return sock


class ApiServer:
    def __init__(self, sock: socket.socket, board: ViewBoard, supervisor: Supervisor) -> None:
        self.sock = sock
        self.board = board
        self.supervisor = supervisor
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._changes: ChangeSignal | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http-api", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.board.subscribe(self._on_view)

    def _on_view(self, _view: AgentView) -> None:
        # Called on the supervision thread: only hand the news to the API's loop.
        changes = self._changes
        if changes is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(changes.fire)
            except RuntimeError:
                pass  # the loop is shutting down

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._changes = ChangeSignal()
        router = Router()
        AgentEndpoints(self.board, self.supervisor, self._changes).register(router)
        http = HttpServer(router)
        server = await asyncio.start_server(http.serve_connection, sock=self.sock, limit=MAX_HEADER_BYTES)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            # Held blocking queries are cut off; let each connection task finish closing.
            pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def stop(self) -> None:
        if self._thread is None:
            return
        stop = self._stop
        if stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        self._thread.join(timeout=10)
        self._thread = None
