"""``/v1/agent/...`` endpoints: the agent itself, its services, and managed proxies.

Handlers only translate: identify the caller, pick data from the current view, shape
it (``shapes``), or post a request to the supervision loop and await its answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import identify, may_read_service, require_operator, require_service_read
from supervisor.api.blocking import ChangeSignal, block_until_changed
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.router import READ, WRITE, Router
from supervisor.api.shapes import (
    agent_self_json,
    agent_services,
    proxy_config_json,
    proxy_status_json,
)
from supervisor.errors import ConfigError, SupervisorError
from supervisor.supervision.manager import ReloadRequested, ShutdownRequested, Supervisor
from supervisor.supervision.view import ViewBoard

RELOAD_TIMEOUT = 60.0
LEAVE_TIMEOUT = 120.0


@dataclass
class AgentEndpoints:
    board: ViewBoard
    supervisor: Supervisor
    changes: ChangeSignal

    def register(self, router: Router) -> None:
        router.add(READ, "/v1/agent/self", self.agent_self)
        router.add(READ, "/v1/agent/services", self.services)
        router.add(READ, "/v1/agent/service/:id", self.service)
        router.add(READ, "/v1/agent/connect/proxy/:id", self.proxy_config)
        router.add(READ, "/v1/agent/connect/proxies", self.proxies)
        router.add(WRITE, "/v1/agent/reload", self.reload)
        router.add(WRITE, "/v1/agent/leave", self.leave)

    async def agent_self(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        return Response.json(agent_self_json(view))

    async def services(self, request: Request) -> Response:
        view = self.board.current
        caller = identify(request, view)
        services = agent_services(view)
        if caller.is_proxy:  # a proxy sees its own service and its own proxy registration
            services = {
                service_id: data
                for service_id, data in services.items()
                if may_read_service(caller, view, service_id, data["Service"])
            }
        else:
            require_operator(caller, view)
        return Response.json(services)

    async def service(self, request: Request) -> Response:
        service_id = request.params["id"]
        view = self.board.current
        caller = identify(request, view)
        service_name = self._service_name(service_id)
        require_service_read(caller, view, service_id, service_name)

        def compute() -> dict[str, Any]:
            data = agent_services(self.board.current).get(service_id)
            if data is None:
                raise HttpError(404, f"unknown service ID: {service_id}")
            return data

        data = await block_until_changed(
            request, self.changes, compute, lambda d: d["ContentHash"], param="hash"
        )
        return Response.json(data, headers={"X-Consul-ContentHash": data["ContentHash"]})

    async def proxy_config(self, request: Request) -> Response:
        proxy_id = request.params["id"]
        view = self.board.current
        planned = view.proxies.get(proxy_id)
        if planned is None:
            raise HttpError(404, f"unknown proxy service ID: {proxy_id}")
        require_service_read(identify(request, view), view, proxy_id, planned.service.name)

        def compute() -> dict[str, Any]:
            current = self.board.current.proxies.get(proxy_id)
            if current is None:
                raise HttpError(404, f"unknown proxy service ID: {proxy_id}")
            return proxy_config_json(current)

        data = await block_until_changed(
            request, self.changes, compute, lambda d: d["ContentHash"], param="hash"
        )
        return Response.json(data, headers={"X-Consul-ContentHash": data["ContentHash"]})

    async def proxies(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        now = time.monotonic()
        return Response.json(
            {proxy_id: proxy_status_json(status, now) for proxy_id, status in view.statuses.items()}
        )

    async def reload(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        reply: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.supervisor.post(ReloadRequested("requested through the API", reply))
        try:
            await asyncio.wait_for(asyncio.wrap_future(reply), RELOAD_TIMEOUT)
        except ConfigError as exc:
            raise HttpError(400, f"Reload failed, the running configuration is kept:\n{exc}") from None
        except SupervisorError as exc:
            raise HttpError(503, str(exc)) from None
        return Response.json(None)

    async def leave(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        reply: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.supervisor.post(
            ShutdownRequested(stop_proxies=True, reason="leave requested through the API", reply=reply)
        )
        await asyncio.wait_for(asyncio.wrap_future(reply), LEAVE_TIMEOUT)
        return Response.json(None)

    def _service_name(self, service_id: str) -> str:
        data = agent_services(self.board.current).get(service_id)
        if data is None:
            raise HttpError(404, f"unknown service ID: {service_id}")
        return str(data["Service"])
