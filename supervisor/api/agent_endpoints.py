"""``/v1/agent/...`` endpoints: the agent itself, its services, and managed proxies.

Handlers only translate: identify the caller, pick data from the current view, shape
it (``shapes``), or post a request to the supervision loop and await its answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import identify, may_read_service, require_operator, require_service_read
from supervisor.api.blocking import MAX_WAIT, block_until_changed
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.router import READ_METHODS, WRITE_METHODS, Router
from supervisor.api.selection import Selection
from supervisor.api.shapes import (
    agent_self_json,
    agent_services,
    member_json,
    proxy_config_json,
    proxy_status_json,
    remote_member_json,
)
from supervisor.cluster.etcd import EtcdError
from supervisor.config.durations import parse_duration
from supervisor.config.limits import parse_uint
from supervisor.config.model import ServiceDef
from supervisor.config.registrations import build_registration
from supervisor.controlplane import ControlPlane
from supervisor.errors import ConfigError, SupervisorError
from supervisor.supervision.events import ReloadRequested, RestartRequested, ShutdownRequested
from supervisor.supervision.machine import State
from supervisor.supervision.manager import Supervisor
from supervisor.supervision.view import AgentView, ProxyStatus, ViewBoard

log = logging.getLogger("supervisor.api")

MANAGED_API_DISALLOWED = "Managed proxy registration via the API is disallowed."

RELOAD_TIMEOUT = 60.0
LEAVE_TIMEOUT = 120.0
RESTART_TIMEOUT = 60.0


def restart_problem(proxy_id: str, status: ProxyStatus | None, replaced: int) -> str | None:
    """Why a restart of ``proxy_id`` (replacing generation ``replaced``) has failed, if it has."""
    if status is None:
        return f"proxy {proxy_id} was removed from the configuration during its restart"
    if status.state is State.BLOCKED:
        return f"proxy {proxy_id} cannot be started: {status.blocked_reason}"
    # The first new process died if a later generation exists or it waits to be retried.
    if status.generation > replaced + 1 or (status.generation > replaced and status.state is State.BACKOFF):
        return (
            f"proxy {proxy_id} did not stay up after its restart: {status.last_exit or 'it exited'}; "
            f"see its log with: proxy-supervisor logs {proxy_id} -stderr"
        )
    return None


def _timeout_arg(request: Request, default: float) -> float:
    text = request.arg("timeout")
    if not text:
        return default
    whole = parse_uint(text)
    try:
        seconds = float(whole) if whole is not None else parse_duration(text)
    except ValueError:
        raise HttpError(400, f"Invalid timeout {text[:40]!r}: use a duration such as 30s or 2m") from None
    return min(seconds, MAX_WAIT)


@dataclass
class AgentEndpoints:
    board: ViewBoard
    supervisor: Supervisor
    plane: ControlPlane

    @property
    def changes(self) -> Any:
        return self.plane.changes

    def _services(self, view: AgentView) -> dict[str, dict[str, Any]]:
        return agent_services(view, self.plane.registry.services, self.plane.hidden)

    def register(self, router: Router) -> None:
        router.add(READ_METHODS, "/v1/agent/self", self.agent_self)
        router.add(READ_METHODS, "/v1/agent/members", self.members)
        router.add(READ_METHODS, "/v1/agent/services", self.services)
        router.add(READ_METHODS, "/v1/agent/service/:id", self.service)
        router.add(READ_METHODS, "/v1/agent/connect/proxy/:id", self.proxy_config)
        router.add(READ_METHODS, "/v1/agent/connect/proxies", self.proxies)
        router.add(WRITE_METHODS, "/v1/agent/reload", self.reload)
        router.add(WRITE_METHODS, "/v1/agent/leave", self.leave)
        router.add(WRITE_METHODS, "/v1/agent/connect/proxies/:id/restart", self.restart_proxy)
        router.add(WRITE_METHODS, "/v1/agent/service/register", self.register_service)
        router.add(WRITE_METHODS, "/v1/agent/service/deregister/:id", self.deregister_service)

    async def members(self, request: Request) -> Response:
        """The LAN members: this agent (a single-host agent is its own cluster). ``?wan``
        lists the WAN pool, which this agent is not in; a segment with it is an error."""
        view = self.board.current
        require_operator(identify(request, view), view)
        if request.arg("wan"):
            if request.arg("segment") not in (None, "", "_all"):
                raise HttpError(400, "Cannot provide a segment with wan=true")
            return Response.json([])
        members = [member_json(view)]
        cluster = self.plane.cluster
        if cluster is not None:
            storage = cluster.storage
            for name, node in sorted(storage.remote_nodes().items()):
                members.append(remote_member_json(node, alive=storage.alive(name)))
        return Response.json(members)

    async def agent_self(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        data = agent_self_json(view)
        if self.plane.cluster is not None:
            data["Cluster"] = self.plane.cluster.status()
        return Response.json(data)

    async def services(self, request: Request) -> Response:
        view = self.board.current
        caller = identify(request, view)
        selection = Selection.of(request)
        services = self._services(view)
        if caller.is_proxy:  # a proxy sees its own service and its own proxy registration
            services = {
                service_id: data
                for service_id, data in services.items()
                if may_read_service(caller, view, service_id, data["Service"])
            }
        else:
            require_operator(caller, view)
        return Response.json(selection.apply_values(services))

    async def service(self, request: Request) -> Response:
        service_id = request.params["id"]
        self._authorize_service_read(request, service_id)

        def compute() -> dict[str, Any]:
            data = self._services(self.board.current).get(service_id)
            if data is None:
                raise HttpError(404, f"unknown service ID: {service_id}")
            return data

        data = await block_until_changed(
            request, self.changes, compute, lambda d: d["ContentHash"], param="hash"
        )
        return Response.json(data, headers={"X-Consul-ContentHash": data["ContentHash"]})

    # A blocking query can be held for minutes. The checks before it run in plain functions
    # so that the waiting coroutine holds no AgentView: a pinned view keeps a whole config
    # (and every proxy plan) alive, and under config churn held queries pinned one each.
    def _authorize_service_read(self, request: Request, service_id: str) -> None:
        view = self.board.current
        require_service_read(identify(request, view), view, service_id, self._service_name(service_id))

    def _authorize_proxy_config(self, request: Request, proxy_id: str) -> None:
        view = self.board.current
        planned = view.proxies.get(proxy_id)
        if planned is None:
            raise HttpError(404, f"unknown proxy service ID: {proxy_id}")
        require_service_read(identify(request, view), view, proxy_id, planned.service.name)

    async def proxy_config(self, request: Request) -> Response:
        proxy_id = request.params["id"]
        self._authorize_proxy_config(request, proxy_id)

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
        catalog = self.plane.catalog
        return Response.json(
            {
                proxy_id: proxy_status_json(status, now, catalog.check(f"service:{proxy_id}"))
                for proxy_id, status in view.statuses.items()
            }
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
        await self._leave_cluster()
        self.supervisor.post(
            ShutdownRequested(stop_proxies=True, reason="leave requested through the API", reply=reply)
        )
        await asyncio.wait_for(asyncio.wrap_future(reply), LEAVE_TIMEOUT)
        return Response.json(None)

    async def _leave_cluster(self) -> None:
        """Consul's "left => deregistered": this host's records go from etcd at once."""
        cluster = self.plane.cluster
        if cluster is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, cluster.leave)
        except EtcdError as exc:
            log.warning("cluster: could not deregister this host (%s); other hosts reap it later", exc)

    async def restart_proxy(self, request: Request) -> Response:
        """Restart one proxy and answer once its new process is ``running`` (up for the
        startup grace period), so that a rolling restart can go on to the next one."""
        view = self.board.current
        require_operator(identify(request, view), view)
        proxy_id = request.params["id"]
        timeout = _timeout_arg(request, RESTART_TIMEOUT)
        reply: concurrent.futures.Future[int] = concurrent.futures.Future()
        self.supervisor.post(RestartRequested(proxy_id, reply))
        try:
            replaced = await asyncio.wait_for(asyncio.wrap_future(reply), RELOAD_TIMEOUT)
        except SupervisorError as exc:
            raise HttpError(404, str(exc)) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self.changes.current()  # taken before reading, so no change is missed
            status = self.board.current.statuses.get(proxy_id)
            problem = restart_problem(proxy_id, status, replaced)
            if problem is not None:
                raise HttpError(409, problem)
            if status is not None and status.state is State.RUNNING and status.generation > replaced:
                return Response.json(proxy_status_json(status, time.monotonic()))
            remaining = deadline - loop.time()
            if remaining <= 0:
                state = status.state if status is not None else "gone"
                raise HttpError(
                    504, f"proxy {proxy_id} is not running {timeout:.0f}s after its restart (state: {state})"
                )
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def _service_name(self, service_id: str) -> str:
        data = self._services(self.board.current).get(service_id)
        if data is None:
            raise HttpError(404, f"unknown service ID: {service_id}")
        return str(data["Service"])

    # -- registration ---------------------------------------------------------------------

    async def register_service(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        body = request.json()
        try:
            services, kept = build_registration(
                body, "request body", view.config, (*view.config.services, *self.plane.registry.services)
            )
        except ConfigError as exc:
            raise HttpError(
                400, "Invalid service registration: " + "; ".join(str(p) for p in exc.problems)
            ) from None
        service = services[0]
        if service.managed_proxy is not None and not service.supervises_sidecar:
            if not view.config.allow_managed_api_registration:
                raise HttpError(400, MANAGED_API_DISALLOWED)
            if not view.config.connect_enabled:
                raise HttpError(400, "Managed proxies need connect.enabled = true")
        for each in services:
            self._check_clashes(view, each, services[0].id)
        self.plane.register_service(services, kept)
        return Response()

    def _check_clashes(self, view: AgentView, service: ServiceDef, registering: str) -> None:
        owned: dict[str, str] = {}
        for configured in view.config.services:
            owned[configured.id] = f"in {configured.source}"
            if configured.managed_proxy is not None:
                owned[configured.proxy_id] = f"as the managed proxy of {configured.id} ({configured.source})"
        for registered in self.plane.registry.services:
            if registered.sidecar_for == registering or (
                registered.id == registering and not registered.sidecar_for
            ):
                continue  # re-registering a service replaces it (and its sidecar)
            owner = (
                f"as the sidecar of {registered.sidecar_for}"
                if registered.sidecar_for
                else "by an API registration"
            )
            owned[registered.id] = owner
            if registered.managed_proxy is not None:
                owned[registered.proxy_id] = f"as the managed proxy of registered service {registered.id}"
        proxy = service.managed_proxy is not None and not service.supervises_sidecar
        ids = [service.id] + ([service.proxy_id] if proxy else [])
        for service_id in ids:
            if service_id in owned:
                raise HttpError(
                    409, f"service ID {service_id!r} is already defined {owned[service_id]}; use another ID"
                )

    async def deregister_service(self, request: Request) -> Response:
        view = self.board.current
        require_operator(identify(request, view), view)
        self.plane.deregister_service(request.params["id"])
        return Response()
