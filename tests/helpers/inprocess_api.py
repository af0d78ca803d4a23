"""The API endpoints in-process, composed as the HTTP server composes them (``compose``): a
real ``ControlPlane`` (no data_dir: in memory, with its CA, catalog, intentions and
prepared queries) and a ``ViewBoard`` holding a view built from a parsed configuration and
planned proxies. Requests are ``Request`` objects handed to the composed handler on an
event loop of the test's own; no socket is opened.

The supervision loop is the one thing stood in for: ``RecordingSupervisor.post`` records
what the API asks of it and answers the request's reply future as the test says.
An ``HttpError`` becomes a response as ``HttpConnection._dispatch`` makes it; any other
exception fails the test, since on a real connection it would be a 500.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast
from urllib.parse import parse_qs, unquote

from supervisor.api.http import HttpError, Request, Response, split_target
from supervisor.api.server import compose
from supervisor.catalog.index import Index
from supervisor.catalog.registry import Registry
from supervisor.config.build import build_config
from supervisor.config.sources import Source
from supervisor.controlplane import ControlPlane
from supervisor.supervision.desired import plan_proxies
from supervisor.supervision.manager import Supervisor
from supervisor.supervision.view import AgentView, ViewBoard

API_ADDRESS = "127.0.0.1:8500"
NODE_ID = "0c4f7a52-9d0e-4d5b-8f61-2f1d6c3b9a10"
MASTER = "master-token-7f3a"
ACL_DENY = {"acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": MASTER}}}
ACL_ALLOW = {"acl": {"enabled": True, "default_policy": "allow", "tokens": {"master": MASTER}}}
ALLOW_MANAGED = {"connect": {"proxy": {"allow_managed_api_registration": True}}}
SERVICES = [
    # No listening check for the proxy: it would probe a port on loopback.
    {
        "name": "web",
        "port": 8080,
        "connect": {"proxy": {"command": ["/bin/true"], "config": {"disable_tcp_check": True}}},
    },
    # A TTL check runs no probe: it turns critical only when its TTL passes without an update.
    {"name": "db", "port": 5432, "tags": ["primary"], "check": {"id": "db-ttl", "ttl": "300s"}},
]


class RecordingSupervisor:
    """Stands in for ``Supervisor.post``: records events and answers their reply future
    with ``failure`` (or success), as the supervision loop would from its own thread."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.failure: BaseException | None = None

    def post(self, event: Any) -> None:
        self.events.append(event)
        reply = getattr(event, "reply", None)
        if reply is None:
            return
        if self.failure is not None:
            reply.set_exception(self.failure)
        else:
            reply.set_result(None)


class Agent:
    """The API of one agent, on an event loop that runs only while a request is served."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.document = {"node_name": "node-1", "services": SERVICES, **settings}
        config = build_config([Source("agent.json", "json", json.dumps(self.document))], dev=True)
        tokens = itertools.count(1)
        plan = plan_proxies(
            config,
            API_ADDRESS,
            {},
            lambda host, port: True,
            new_token=lambda: f"proxy-token-{next(tokens)}",
            rng=random.Random(7),
        )
        self.board = ViewBoard(AgentView(config, NODE_ID, API_ADDRESS, proxies=plan.proxies))
        self.services_changed = 0
        # Consul's one-minute floor for DeregisterCriticalServiceAfter, shortened for tests.
        self.plane = ControlPlane(
            None, Registry(None), Index(), self._services_changed, deregister_minimum=0.05
        )
        self.supervisor = RecordingSupervisor()
        supervisor = cast(Supervisor, self.supervisor)  # only its post() is used by the endpoints
        self.handler = compose(self.board, supervisor, self.plane)  # what the HTTP server serves
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        self.plane.start(self.board.current)  # on the loop: the catalog starts its check tasks

    def _services_changed(self) -> None:
        self.services_changed += 1

    def reload_config(self, **changes: Any) -> None:
        """A configuration reload as the supervision loop publishes it: a new config
        object in a new view, handed to the control plane on its loop."""
        self.document = {**self.document, **changes}
        config = build_config([Source("agent.json", "json", json.dumps(self.document))], dev=True)
        current = self.board.current
        view = AgentView(config, current.node_id, current.api_address, proxies=current.proxies)
        self.board.publish(view)

        async def apply() -> None:
            self.plane.on_view(view)
            self.plane.changes.fire()

        self.loop.run_until_complete(apply())

    def token(self, proxy_id: str) -> str:
        return self.board.current.proxies[proxy_id].spec.token

    def request(self, method: str, target: str, body: Any = None, token: str | None = None) -> Request:
        path, query = split_target(target)
        raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        return Request(
            method=method,
            path=unquote(path),
            raw_path=path,
            query=parse_qs(query, keep_blank_values=True),
            headers={"x-consul-token": token} if token else {},
            body=raw,
            remote="127.0.0.1:50000",
        )

    async def _serve(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except HttpError as exc:
            return Response.text(exc.message, exc.status, exc.headers)

    def call(self, method: str, target: str, body: Any = None, token: str | None = None) -> Response:
        request = self.request(method, target, body, token)
        return self.loop.run_until_complete(asyncio.wait_for(self._serve(request), 5))

    def get(self, target: str, token: str | None = None) -> Any:
        """GET that must succeed; the decoded JSON body."""
        response = self.call("GET", target, token=token)
        assert response.status == 200, (target, response.status, response.body)
        return json.loads(response.body)

    def begin(self, target: str) -> asyncio.Task[Response]:
        """Start a (blocking) GET and let it run until it waits."""
        task = self.loop.create_task(self._serve(self.request("GET", target)))
        self.settle()
        return task

    def finish(self, task: asyncio.Task[Response]) -> Response:
        return self.loop.run_until_complete(asyncio.wait_for(task, 5))

    def settle(self) -> None:
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Run the loop (check tasks, timers) until ``condition`` holds; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            self.loop.run_until_complete(asyncio.sleep(0.01))

    def close(self) -> None:
        self.plane.close()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:  # (gather() of nothing would make a future on another loop)
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()


def make_agents() -> Iterator[Callable[..., Agent]]:
    """Agents made on demand, all closed at the end (a fixture's body)."""
    made: list[Agent] = []

    def make(**settings: Any) -> Agent:
        agent = Agent(settings)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


def text(response: Response) -> str:
    return response.body.decode()
