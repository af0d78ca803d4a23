"""Hostile input to a live agent: generated bodies and IDs never produce a 500 or a
traceback, and the agent keeps serving. Bounded: a fixed number of examples per test."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.agent import AgentProcess, fake_proxy

WRITE_ENDPOINTS = [
    ("PUT", "/v1/agent/service/register"),
    ("POST", "/v1/connect/intentions"),
    ("POST", "/v1/agent/connect/authorize"),
    ("POST", "/v1/query"),
    ("PUT", "/v1/agent/check/update/web-ttl"),
    ("PUT", "/v1/agent/check/register"),
    ("PUT", "/v1/connect/intentions/exact?source=a&destination=b"),
]
READ_TEMPLATES = [
    "/v1/agent/service/{}",
    "/v1/agent/connect/proxy/{}",
    "/v1/agent/connect/ca/leaf/{}",
    "/v1/health/service/{}",
    "/v1/health/connect/{}",
    "/v1/catalog/connect/{}",
    "/v1/connect/intentions/{}",
    "/v1/query/{}",
    "/v1/query/{}/execute",
    "/v1/health/state/{}",
    "/v1/health/node/{}",
    "/v1/catalog/node/{}",
    "/v1/agent/health/service/id/{}",
    "/v1/agent/health/service/name/{}",
    "/v1/agent/metrics?format={}",
]
FILTERED = [
    "/v1/agent/services",
    "/v1/agent/checks",
    "/v1/catalog/nodes",
    "/v1/catalog/service/web",
    "/v1/health/service/web",
    "/v1/health/state/any",
    "/v1/connect/intentions",
]
FILTER_WORDS = st.sampled_from(
    ["and", "or", "not", "in", "is", "empty", "contains", "matches", "==", "!=", "(", ")", "[", "]", ".", "`"]
    + [
        '"x"',
        '"',
        "Service",
        "Tags",
        "Meta",
        "Meta.env",
        "Checks.Status",
        "Port",
        "Connect.Native",
        "1",
        "-1",
    ]
    + ["true", "ServiceTags", "Node.Meta", "Weights", "\\", "é", "\x00"]
)
FILTERS = st.lists(FILTER_WORDS, max_size=12).map(" ".join) | st.text(max_size=40)
KEYS = st.sampled_from(
    [
        "Name",
        "ID",
        "Port",
        "Tags",
        "Check",
        "Connect",
        "Proxy",
        "SourceName",
        "DestinationName",
        "Action",
        "Target",
        "ClientCertURI",
        "Service",
        "Status",
        "Output",
        "Meta",
        "Kind",
        "Weights",
        "Template",
        "x",
    ]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(KEYS | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=12,
)
IDS = st.one_of(
    st.sampled_from(["..", "../etc/passwd", "a/b", "%2e%2e", "web", "web-proxy", "", " ", "*", "\x00", "é"]),
    st.text(max_size=30),
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    # One agent per test (shared by that test's generated examples): the leak check
    # after each test would otherwise flag a longer-lived one.
    root = tmp_path
    process = AgentProcess(
        root,
        extra={"connect": {"proxy": {"allow_managed_root": True, "allow_managed_api_registration": True}}},
    )
    process.write(
        "web.json",
        {
            "service": {
                "name": "web",
                "port": 8080,
                "check": {"id": "web-ttl", "ttl": "1h"},
                "connect": {"proxy": {"command": fake_proxy("run", Path(root) / "w")}},
            }
        },
    )
    process.start()
    try:
        yield process
        # after all of the test's generated examples: still serving, proxy untouched, no traceback
        assert process.http("GET", "/v1/agent/self")[0] == 200
        assert process.proxies()["web-proxy"]["State"] in ("running", "starting")
        assert "Traceback" not in process.log()
    finally:
        process.kill_everything()


def raw(agent: AgentProcess, method: str, path: str, body: bytes) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{agent.address}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(WRITE_ENDPOINTS), body=JSON)
def test_generated_bodies_never_cause_a_500(
    agent: AgentProcess, endpoint: tuple[str, str], body: Any
) -> None:
    method, path = endpoint
    status, text = raw(agent, method, path, json.dumps(body).encode())
    assert status < 500, (path, body, text)
    assert "Traceback" not in text


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(WRITE_ENDPOINTS), body=st.binary(max_size=64))
def test_garbage_bytes_never_cause_a_500(agent: AgentProcess, endpoint: tuple[str, str], body: bytes) -> None:
    method, path = endpoint
    status, text = raw(agent, method, path, body)
    assert status < 500, (path, body, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    template=st.sampled_from(READ_TEMPLATES),
    name=IDS,
    wait=st.sampled_from(["", "1ms", "x", "-1s", "99999h"]),
)
def test_generated_ids_and_parameters(agent: AgentProcess, template: str, name: str, wait: str) -> None:
    path = template.format(urllib.parse.quote(name, safe=""))
    query = f"?index=1&wait={urllib.parse.quote(wait)}" if wait else ""
    status, text = raw(agent, "GET", path + query, b"")
    # A service's local health is 503 while it is critical: Consul's code, not an error.
    assert status < 500 or (status == 503 and path.startswith("/v1/agent/health/")), (path, text)
    assert "Traceback" not in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(FILTERED), expression=FILTERS)
def test_generated_filters_never_cause_a_500(agent: AgentProcess, path: str, expression: str) -> None:
    query = urllib.parse.urlencode({"filter": expression})
    status, text = raw(agent, "GET", f"{path}?{query}", b"")
    assert status in (200, 400), (path, expression, status, text)
    assert "Traceback" not in text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/agent/maintenance", "/v1/agent/service/maintenance/web"]),
    enable=st.one_of(
        st.none(), st.sampled_from(["true", "false", "1", "0", "", "yes", "T"]), st.text(max_size=6)
    ),
    reason=st.text(max_size=30),
)
def test_generated_maintenance_calls(agent: AgentProcess, path: str, enable: str | None, reason: str) -> None:
    params = {"reason": reason, **({"enable": enable} if enable is not None else {})}
    status, text = raw(agent, "PUT", f"{path}?{urllib.parse.urlencode(params)}", b"")
    assert status in (200, 400), (path, params, status, text)
