"""Held blocking queries pin no agent view. A client long-polls for up to ten minutes; if
the waiting coroutine held the ``AgentView`` it authorized against, every reload during the
wait would keep one more whole configuration (and every proxy plan) alive per held query.
The 60-minute soak showed exactly that as agent RSS growth under config churn."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Callable

from supervisor.supervision.view import AgentView
from tests.helpers.inprocess_api import Agent


def _index(agent: Agent, target: str) -> str:
    return agent.call("GET", target).headers["X-Consul-Index"]


def _held_targets(agent: Agent) -> list[str]:
    created = agent.call("POST", "/v1/query", {"Name": "primary-db", "Service": {"Service": "db"}})
    assert created.status == 200
    service_hash = agent.get("/v1/agent/service/web")["ContentHash"]
    proxy_hash = agent.get("/v1/agent/connect/proxy/web-proxy")["ContentHash"]
    match = "/v1/connect/intentions/match?by=destination&name=web"
    targets = {
        "/v1/agent/service/web": f"hash={service_hash}",
        "/v1/agent/connect/proxy/web-proxy": f"hash={proxy_hash}",
        "/v1/agent/connect/ca/leaf/web": "",
        "/v1/connect/ca/roots": "",
        match: "",
        "/v1/query/primary-db/execute": "",
        "/v1/health/service/db": "",
        "/v1/catalog/services": "",
        "/v1/connect/intentions": "",
    }
    held = []
    for path, version in targets.items():
        version = version or f"index={_index(agent, path)}"
        separator = "&" if "?" in path else "?"
        held.append(f"{path}{separator}{version}&wait=60s")
    return held


def test_held_blocking_queries_let_replaced_views_go(agents: Callable[..., Agent]) -> None:
    agent = agents()
    targets = _held_targets(agent)
    tasks = [agent.begin(target) for target in targets]
    assert not any(task.done() for task in tasks), [t.result().body for t in tasks if t.done()]

    replaced: list[weakref.ref[AgentView]] = []
    for round_ in range(5):
        replaced.append(weakref.ref(agent.board.current))
        # A change no held answer depends on.
        agent.reload_config(log_level=("INFO", "DEBUG")[round_ % 2])
        agent.settle()
    answered = [target for target, task in zip(targets, tasks, strict=True) if task.done()]
    assert not answered, f"an unrelated reload answered {answered}"

    gc.collect()
    pinned = [ref for ref in replaced if ref() is not None]
    assert not pinned, f"{len(pinned)} of {len(replaced)} replaced views are still referenced"

    # The held queries still work: a change to the web service answers its own.
    for task in tasks:
        task.cancel()
    agent.settle()
    assert all(task.done() for task in tasks)
    assert json.loads(agent.call("GET", "/v1/agent/service/web").body)["Service"] == "web"
