"""The agent's HTTP API: binds its address, then serves on its own thread and event loop."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from supervisor.api import unsupported
from supervisor.api.agent_endpoints import AgentEndpoints
from supervisor.api.auth import principal_of
from supervisor.api.catalog_endpoints import CatalogEndpoints
from supervisor.api.check_endpoints import CheckEndpoints
from supervisor.api.connect_endpoints import ConnectEndpoints
from supervisor.api.http import Handler, HttpError, HttpServer, Request, Response
from supervisor.api.intention_endpoints import IntentionEndpoints
from supervisor.api.limits import Caps, ConnectionBook, caps_for, open_file_limit
from supervisor.api.metrics_endpoints import ApiStats, MetricsEndpoints, counting
from supervisor.api.query_endpoints import QueryEndpoints
from supervisor.api.results import Results
from supervisor.api.router import Router
from supervisor.config.model import AgentConfig
from supervisor.controlplane import ControlPlane
from supervisor.errors import ListenError
from supervisor.net import BindFailed, listen_socket
from supervisor.supervision.manager import Supervisor
from supervisor.supervision.view import AgentView, ViewBoard

log = logging.getLogger("supervisor.api")


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a taken port stops the agent before any proxy starts."""
    try:
        return listen_socket(host, port, backlog=1024)
    except BindFailed as exc:
        hint = (
            "another process (another agent, or Consul) is listening there; stop it or set ports.http"
            if exc.in_use
            else "set addresses.http / client_addr to an address of this host"
        )
        raise ListenError(f"cannot listen on {exc.address} for the HTTP API: {exc.strerror}; {hint}") from exc


# Endpoints that Consul forwards to a datacenter's servers and so take ``?dc=``; the
# agent's own endpoints (/v1/agent/...) ignore it, as in Consul.
DATACENTER_SCOPED = ("/v1/catalog/", "/v1/health/", "/v1/query", "/v1/connect/", "/v1/coordinate/")


def datacenter_guard(handler: Handler, datacenter: Callable[[], str]) -> Handler:
    """``?dc=`` naming another datacenter: Consul's "No path to datacenter", as a 503
    rather than Consul's 500 -- this agent answers no client input with a 500, and a 503
    reads the same to every client (an error carrying that text)."""

    async def guarded(request: Request) -> Response:
        dc = request.arg("dc")
        if dc and request.path.startswith(DATACENTER_SCOPED) and dc != datacenter():
            raise HttpError(503, "No path to datacenter", {"X-Consul-Index": "1"})
        return await handler(request)

    return guarded


def compose(
    board: ViewBoard, supervisor: Supervisor, plane: ControlPlane, stats: ApiStats | None = None
) -> Handler:
    """Every endpoint behind one handler: what the HTTP server serves (and unit tests call)."""
    stats = stats if stats is not None else ApiStats()
    router = Router()
    # Blocking queries' answers, and when each last changed (in cluster mode: by their content).
    content_index = plane.cluster.storage.content_index if plane.cluster is not None else None
    results = Results(plane.index, content_index=content_index)
    AgentEndpoints(board, supervisor, plane).register(router)
    CheckEndpoints(plane).register(router)
    ConnectEndpoints(plane).register(router)
    CatalogEndpoints(plane, results).register(router)
    IntentionEndpoints(plane, results).register(router)
    QueryEndpoints(plane, results).register(router)
    MetricsEndpoints(board, plane.changes, stats).register(router)
    unsupported.register(router)
    return counting(datacenter_guard(router, lambda: board.current.config.datacenter), stats)


if TYPE_CHECKING:
    from supervisor.dns.server import DnsServer


class ApiServer:
    def __init__(
        self, sock: socket.socket, board: ViewBoard, supervisor: Supervisor, plane: ControlPlane
    ) -> None:
        self.sock = sock
        self.board = board
        self.supervisor = supervisor
        self.plane = plane
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.dns: DnsServer | None = None  # made when the config first asks for DNS
        self._dns_applied: asyncio.Future[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Start serving; raises what the control plane's start-up raised (a bad CA file)."""
        self._thread = threading.Thread(target=self._run, name="http-api", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            self._thread.join(5)
            raise self._error
        self.board.subscribe(self._on_view)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the API's event loop (where the control plane lives)."""
        if not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(callback)
            except RuntimeError:
                pass  # the loop is shutting down

    def _on_view(self, view: AgentView) -> None:
        # Called on the supervision thread: only hand the news to the API's loop.
        if not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._apply_view, view)
            except RuntimeError:
                pass  # the loop is shutting down

    def _apply_view(self, view: AgentView) -> None:
        if self.board.current is not view:
            return  # a newer view is already queued behind this one
        self.plane.on_view(view)
        self.plane.changes.fire()
        self._dns_applied = asyncio.ensure_future(self._apply_dns(view.config))  # (rebinds on a move)

    async def _apply_dns(self, config: AgentConfig) -> None:
        if self.dns is None:
            if config.dns_port < 0:
                return  # dnspython (~12 MiB) is imported only by agents that serve DNS
            from supervisor.dns.resolver import Resolver
            from supervisor.dns.server import DnsServer

            resolver = Resolver(self.plane.catalog, self.plane.queries, lambda: self.board.current.config)
            self.dns = DnsServer(resolver)
        await self.dns.apply(config)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start() on the main thread
            self._error = exc
            self._ready.set()
        finally:
            self.plane.close()
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.plane.start(self.board.current)
        await self._apply_dns(self.board.current.config)
        stats = ApiStats()
        handler = compose(self.board, self.supervisor, self.plane, stats)
        file_limit = open_file_limit()

        def caps() -> Caps:
            view = self.board.current
            config = view.config
            return caps_for(
                config.http_max_conns_per_client, config.http_max_conns, len(view.proxies), file_limit
            )

        book = ConnectionBook(caps)
        stats.book = book
        http = HttpServer(handler, book, lambda request: principal_of(request, self.board.current))
        http.serve(self.sock)
        self._ready.set()
        await self._stop.wait()
        # Held blocking queries are cut off; let each connection finish closing.
        http.close()
        if self.dns is not None:
            self.dns.close()
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
