"""Hostile input beyond the API fuzzing of test_api_fuzz: generated config files, path
traversal in every ID that becomes a file name, slow and oversized requests, and a proxy
token used against other services. Bounded: fixed example counts and deadlines."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config import load_config
from supervisor.errors import ConfigError
from tests.helpers.agent import AgentProcess, fake_proxy
from tests.helpers.processes import wait_until

# Keys a config file may use, at the places they may appear, mixed with junk keys.
AGENT_KEYS = [
    "data_dir",
    "log_level",
    "ports",
    "connect",
    "acl",
    "service",
    "services",
    "bind_addr",
    "client_addr",
    "node_name",
    "log_rotate_bytes",
    "server",
    "telemetry",
]
NESTED_KEYS = [
    "name",
    "id",
    "port",
    "proxy",
    "upstreams",
    "config",
    "command",
    "exec_mode",
    "destination_name",
    "local_bind_port",
    "destination_type",
    "http",
    "proxy_min_port",
    "proxy_max_port",
    "enabled",
    "allow_managed_root",
    "log_max_bytes",
    "log_max_files",
    "ca_config",
    "proxy_defaults",
    "check",
    "checks",
    "ttl",
    "tcp",
    "interval",
    "kind",
    "proxy_destination",
    "tokens",
    "master",
    "default_policy",
    "x",
]
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["../x", "daemon", "script", "10s", "64MiB", "-1", "", "a/b", "web"])
)
VALUES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(NESTED_KEYS) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
DOCUMENTS = st.dictionaries(st.sampled_from(AGENT_KEYS) | st.text(max_size=6), VALUES, max_size=5)


def _load_one(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates: invalid UTF-8
    try:
        load_config([str(path)], [], {"data_dir": str(tmp_path / "d")})
    except ConfigError as exc:
        assert exc.problems
        assert all(problem.source == str(path) or not problem.source for problem in exc.problems), exc
        assert str(exc).strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS)
def test_generated_json_configs_load_or_fail_with_a_clear_error(tmp_path: Path, document: Any) -> None:
    # Anything other than a loaded config or a ConfigError (a KeyError, a TypeError …) fails.
    _load_one(tmp_path, "fuzz.json", json.dumps(document, allow_nan=True))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(
        alphabet=st.sampled_from(list('abcdefgh_ =[]{}"#\n\t0123456789.,-/\\')) | st.characters(),
        max_size=120,
    ),
    suffix=st.sampled_from([".hcl", ".toml", ".json"]),
)
def test_generated_config_text_fails_cleanly_in_every_format(tmp_path: Path, text: str, suffix: str) -> None:
    _load_one(tmp_path, "fuzz" + suffix, text)


# -- a live agent -------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(
        tmp_path,
        extra={"connect": {"proxy": {"allow_managed_root": True, "allow_managed_api_registration": True}}},
    )
    process.write(
        "web.json",
        {
            "service": {
                "name": "web",
                "port": 8080,
                "check": {"id": "web-ttl", "ttl": "1h"},
                "connect": {"proxy": {"command": fake_proxy("run", tmp_path / "w.state")}},
            }
        },
    )
    process.start()
    yield process
    process.kill_everything()


def tree(root: Path) -> set[str]:
    return {str(path) for path in root.rglob("*")}


TRAVERSALS = ["../escape", "../../escape", "a/../../escape", "..", ".escape", "x\x00y", "%2e%2e%2fescape"]


def test_traversal_in_every_id_that_becomes_a_file_name(agent: AgentProcess, tmp_path: Path) -> None:
    before = tree(tmp_path)
    attempts: list[tuple[str, str, Any]] = []
    for bad in TRAVERSALS:
        quoted = urllib.parse.quote(bad, safe="")
        attempts += [
            ("PUT", "/v1/agent/service/register", {"ID": bad, "Name": "svc", "Port": 1}),
            ("PUT", "/v1/agent/service/register", {"Name": bad, "Port": 1}),
            (
                "PUT",
                "/v1/agent/service/register",
                {
                    "Name": "ok",
                    "Port": 1,
                    "Connect": {"Proxy": {"Command": ["true"], "Upstreams": []}},
                    "ID": bad,
                },
            ),
            ("PUT", f"/v1/agent/service/deregister/{quoted}", None),
            (
                "POST",
                "/v1/connect/intentions",
                {"SourceName": bad, "DestinationName": "web", "Action": "deny"},
            ),
            ("PUT", f"/v1/connect/intentions/{quoted}", {"SourceName": "a", "DestinationName": "b"}),
            ("DELETE", f"/v1/connect/intentions/{quoted}", None),
            ("POST", "/v1/query", {"Name": bad, "Service": {"Service": "web"}}),
            ("DELETE", f"/v1/query/{quoted}", None),
            ("PUT", f"/v1/agent/connect/proxies/{quoted}/restart?timeout=1s", None),
            ("PUT", f"/v1/agent/check/pass/{quoted}", None),
            ("GET", f"/v1/agent/connect/ca/leaf/{quoted}", None),
        ]
    for method, path, body in attempts:
        status, _, answer = agent.http(method, path, body, timeout=10)
        assert 400 <= status < 500, (method, path, body, status, answer)
    after = tree(tmp_path)
    created = {
        path for path in after - before if "/data/" not in path and not path.endswith((".log", ".state"))
    }
    assert not created, created  # nothing written outside data_dir …
    escaped = [path for path in after if os.path.basename(path).startswith("escape")]
    assert not escaped, escaped  # … and nothing named by the attacker anywhere
    assert agent.proxies()["web-proxy"]["State"] in ("starting", "running")


def test_cli_refuses_traversal_in_log_names(agent: AgentProcess, tmp_path: Path) -> None:
    secret = tmp_path / "secret-stdout.log"
    secret.write_text("not a proxy log\n")
    for name in ["../../../secret", "../secret", "/etc/passwd"]:
        by_dir = agent.cli("logs", name, "-data-dir", str(agent.data_dir))
        assert by_dir.returncode == 2 and "not a proxy" not in by_dir.stdout, by_dir
        through_api = agent.cli("logs", name)
        assert through_api.returncode == 2 and "is not a proxy or service name" in through_api.stderr


def test_slow_and_oversized_requests_cost_the_agent_nothing(agent: AgentProcess) -> None:
    slow_clients = []
    try:
        for _ in range(50):  # half-sent requests, held open (slowloris)
            sock = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
            sock.sendall(
                b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
            slow_clients.append(sock)
        began = time.monotonic()
        assert agent.http("GET", "/v1/agent/self")[0] == 200
        assert time.monotonic() - began < 2.0
        # Bodies and headers past the limits are refused without being read whole.
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
            sock.sendall(
                b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{"
            )
            assert sock.recv(200).startswith(b"HTTP/1.1 413")  # answered before a GiB arrives
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
            sock.sendall(b"GET /v1/agent/self HTTP/1.1\r\n" + b"X-Junk: " + b"y" * 200_000 + b"\r\n\r\n")
            answer = sock.recv(200)
        assert answer.startswith(b"HTTP/1.1 4"), answer
    finally:
        for sock in slow_clients:
            sock.close()
    assert agent.http("GET", "/v1/agent/self")[0] == 200


def test_a_proxy_token_cannot_reach_other_services(agent: AgentProcess, tmp_path: Path) -> None:
    agent.write(
        "db.json",
        {
            "service": {
                "name": "db",
                "port": 5432,
                "connect": {"proxy": {"command": fake_proxy("run", tmp_path / "d.state")}},
            }
        },
    )
    agent.wait_state("db-proxy", "running")
    from tests.helpers.statefile import starts

    token = starts(tmp_path / "w.state")[-1]["env"]["CONNECT_PROXY_TOKEN"]
    assert token
    own: list[tuple[str, str, Any]] = [
        ("GET", "/v1/agent/connect/proxy/web-proxy", None),
        ("GET", "/v1/agent/connect/ca/leaf/web", None),
        (
            "POST",
            "/v1/agent/connect/authorize",
            {"Target": "web", "ClientCertURI": "spiffe://x/ns/default/dc/dc1/svc/a"},
        ),
        ("GET", "/v1/health/connect/db", None),
    ]
    for method, path, body in own:
        assert agent.http(method, path, body, token=token)[0] == 200, path
    foreign: list[tuple[str, str, Any]] = [
        ("GET", "/v1/agent/connect/proxy/db-proxy", None),
        ("GET", "/v1/agent/connect/ca/leaf/db", None),
        (
            "POST",
            "/v1/agent/connect/authorize",
            {"Target": "db", "ClientCertURI": "spiffe://x/ns/default/dc/dc1/svc/a"},
        ),
        ("PUT", "/v1/agent/service/register", {"Name": "evil", "Port": 1}),
        ("POST", "/v1/connect/intentions", {"SourceName": "*", "DestinationName": "db", "Action": "allow"}),
        ("PUT", "/v1/agent/connect/proxies/db-proxy/restart", None),
        ("PUT", "/v1/agent/leave", None),
        ("GET", "/v1/agent/self", None),
    ]
    for method, path, body in foreign:
        assert agent.http(method, path, body, token=token)[0] == 403, path
    assert agent.proxies()["db-proxy"]["State"] == "running"


def _exchange(port: int, raw: bytes, wait: float = 5.0) -> bytes:
    """Send ``raw`` and read until the agent closes the connection (or ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(raw)
        chunks = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


HTTP_HOLES = {
    # what the hand-written parser did with each: no answer and a traceback, or a wrong one
    "negative chunk size": (
        b"PUT /v1/agent/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"400",
    ),
    "chunk line over 64 KiB": (
        b"PUT /v1/agent/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"x" * 70_000,
        b"431",
    ),
    "gzip, chunked": (
        b"PUT /v1/agent/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        b"501",
    ),
    "conflicting Content-Length": (
        b"PUT /v1/agent/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\n",
        b"400",
    ),
}


@pytest.mark.parametrize("case", sorted(HTTP_HOLES))
def test_malformed_http_is_answered_and_logs_no_traceback(agent: AgentProcess, case: str) -> None:
    raw, status = HTTP_HOLES[case]
    reply = _exchange(agent.port, raw)
    assert reply.split(b" ", 2)[1] == status, reply[:120]
    assert "Traceback" not in agent.current_log()
    assert agent.http("GET", "/v1/agent/self")[0] == 200


def test_expect_continue_http_1_0_and_bare_lf_are_served(agent: AgentProcess) -> None:
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /v1/agent/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 ")  # the old parser never said it
        sock.sendall(b"{}")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    began = time.monotonic()
    reply = _exchange(agent.port, b"GET /v1/agent/self HTTP/1.0\r\n\r\n", wait=10)
    assert reply.startswith(b"HTTP/1.1 200 ") and time.monotonic() - began < 5  # not held 120 s
    assert _exchange(agent.port, b"GET /v1/agent/self HTTP/1.0\n\n").startswith(b"HTTP/1.1 200 ")


def test_hostile_numbers_and_depth_in_requests_are_400s(agent: AgentProcess) -> None:
    deep = "[" * 800 + "]" * 800
    bodies = {
        "deep JSON": deep,
        "5,000-digit integer": '{"Name": "x", "Port": ' + "9" * 5000 + "}",
        "deep Proxy.Config": json.dumps({"Name": "p", "Kind": "connect-proxy", "Port": 1})[:-1]
        + ', "Proxy": {"DestinationServiceName": "web", "Config": '
        + '{"a": ' * 800
        + "1"
        + "}" * 800
        + "}}",
    }
    for what, body in bodies.items():
        status, _, message = agent.http_raw("PUT", "/v1/agent/service/register", body.encode())
        assert status == 400, (what, status, message)
        assert "decode failed" in str(message) or "nested" in str(message), (what, message)
    for query in ("index=%C2%B2", "index=" + "9" * 5000, "wait=" + "9" * 5000 + "s"):
        status, _, message = agent.http("GET", f"/v1/catalog/services?{query}")
        assert status == 400 or (query.startswith("wait") and status == 200), (query, status, message)
    assert agent.http("POST", "/v1/query", {"Name": "q", "Service": {"Service": "web"}})[0] == 200
    for query in ("limit=%C2%B2", "limit=" + "9" * 5000):
        assert agent.http("GET", f"/v1/query/q/execute?{query}")[0] == 400, query
    assert "Traceback" not in agent.current_log()


def test_an_api_flood_cannot_take_the_descriptors_supervision_needs(tmp_path: Path) -> None:
    """Regression (issue 9): ~1,100 held blocking queries on an endpoint that needs no
    token exhausted the agent's descriptors: proxies could not be restarted and operator
    calls timed out. Now the API keeps a reserve for supervision and answers 429."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 and hard >= 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    agent = AgentProcess(
        tmp_path,
        extra={"connect": {"proxy": {"allow_managed_root": True}}, "acl": {"tokens": {"master": "ops"}}},
        command_prefix=["prlimit", "--nofile=1024:1024", "--"],
    )
    flood: list[socket.socket] = []
    try:
        agent.write(
            "web.json",
            {
                "service": {
                    "name": "web",
                    "port": 1,
                    "connect": {"proxy": {"command": fake_proxy("run", tmp_path / "w.state")}},
                }
            },
        )
        agent.start()
        pid = agent.wait_state("web-proxy", "running")["Pid"]
        index = agent.http("GET", "/v1/agent/connect/ca/roots")[1]["X-Consul-Index"]
        query = f"GET /v1/agent/connect/ca/roots?index={index}&wait=5m HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for number in range(1100):  # from six addresses, so the per-client limit alone would not stop it
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + number % 6}", 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", agent.port))
            sock.sendall(query)
            flood.append(sock)
        refused: set[int] = set()

        def some_refused() -> bool:
            for number, sock in enumerate(flood):
                if number not in refused:
                    sock.setblocking(False)
                    try:
                        if sock.recv(64).startswith(b"HTTP/1.1 429"):
                            refused.add(number)
                    except (BlockingIOError, ConnectionResetError):
                        pass
            return len(refused) > 0

        wait_until(some_refused, timeout=10, interval=0.2, message="429s")  # not descriptors running out
        os.kill(pid, 9)
        agent.wait_proxy(
            "web-proxy", lambda e: e["Pid"] not in (None, pid) and e["State"] == "running", timeout=15
        )
        status, _, _ = agent.http("GET", "/v1/agent/self", token="ops", timeout=5)
        assert status == 200  # the operator gets in: identified callers have headroom
        log = agent.current_log()
        assert "Too many open files" not in log and "Traceback" not in log
    finally:
        for sock in flood:
            sock.close()
        agent.kill_everything()
