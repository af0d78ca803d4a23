"""The API router in-process (``supervisor/api/router.py``): which handler a method and a
path reach, what ``:name`` segments put in ``request.params``, 404 and 405 for what no
route serves, and domain errors (``supervisor/catalog/errors.py``) turned into their
HTTP status. Last, the router behind a real ``HttpConnection`` fed bytes through a
stand-in transport (no socket): an unexpected exception in a handler becomes a bare 500
that reveals nothing of the exception, and the connection goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest

from supervisor.api.http import HttpConnection, HttpError, HttpServer, Request, Response, split_target
from supervisor.api.limits import Caps, ConnectionBook
from supervisor.api.router import READ_METHODS, WRITE_METHODS, Router, status_of
from supervisor.catalog.errors import CatalogError, Conflict, InvalidDefinition, NotFound


def make_request(method: str, target: str, headers: Mapping[str, str] | None = None) -> Request:
    """A request as ``http._request_from`` builds it from a request line."""
    path, query = split_target(target)
    return Request(
        method=method,
        path=unquote(path),
        raw_path=path,
        query=parse_qs(query, keep_blank_values=True),
        headers={name.lower(): value for name, value in (headers or {}).items()},
        body=b"",
        remote="127.0.0.1:50000",
    )


def route(router: Router, method: str, target: str) -> Response:
    return asyncio.run(router(make_request(method, target)))


def refusal(router: Router, method: str, target: str) -> HttpError:
    with pytest.raises(HttpError) as caught:
        route(router, method, target)
    return caught.value


class Recorder:
    """Handlers that answer with their own name and remember the params they got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def handler(self, name: str) -> Any:
        async def handle(request: Request) -> Response:
            self.calls.append((name, dict(request.params)))
            return Response.text(name)

        return handle


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def router(recorder: Recorder) -> Router:
    router = Router()
    router.add(READ_METHODS, "/v1/agent/services", recorder.handler("services"))
    router.add(READ_METHODS, "/v1/agent/service/:id", recorder.handler("service"))
    router.add(WRITE_METHODS, "/v1/agent/service/register", recorder.handler("register"))
    router.add(READ_METHODS, "/v1/query/:id/execute", recorder.handler("execute"))
    # A literal segment registered before a parameter at the same place, as the
    # intention routes are (``/intentions/exact`` before ``/intentions/:id``).
    router.add(READ_METHODS, "/v1/connect/intentions/exact", recorder.handler("exact"))
    router.add(("GET", "DELETE"), "/v1/connect/intentions/:id", recorder.handler("single"))
    return router


def test_get_and_head_read_while_put_and_post_both_write(router: Router, recorder: Recorder) -> None:
    for method in ("GET", "HEAD"):
        response = route(router, method, "/v1/agent/services")
        assert response.status == 200 and response.body == b"services"
    # Consul accepted PUT and POST interchangeably on its write endpoints.
    for method in ("PUT", "POST"):
        assert route(router, method, "/v1/agent/service/register").body == b"register"
    assert [name for name, _ in recorder.calls] == ["services", "services", "register", "register"]


def test_a_parameter_segment_is_handed_to_the_handler(router: Router, recorder: Recorder) -> None:
    route(router, "GET", "/v1/query/db-query/execute?limit=3")
    assert recorder.calls == [("execute", {"id": "db-query"})]


def test_an_encoded_slash_stays_inside_its_segment(router: Router, recorder: Recorder) -> None:
    route(router, "GET", "/v1/agent/service/team%2Fweb")
    assert recorder.calls == [("service", {"id": "team/web"})]
    # The same ID unencoded is two segments: no route has that many.
    assert refusal(router, "GET", "/v1/agent/service/team/web").status == 404


def test_empty_segments_are_ignored_as_consul_cleans_paths(router: Router, recorder: Recorder) -> None:
    route(router, "GET", "/v1/agent/services/")
    route(router, "GET", "//v1/agent//services")
    # Consul redirects to the cleaned path: an empty segment never becomes an empty ID.
    route(router, "GET", "/v1/agent/service//web")
    assert refusal(router, "GET", "/v1/agent/service//").status == 404
    assert recorder.calls == [("services", {}), ("services", {}), ("service", {"id": "web"})]


def test_routes_are_tried_in_order_and_a_refused_method_goes_on_to_the_next(
    router: Router, recorder: Recorder
) -> None:
    route(router, "GET", "/v1/connect/intentions/exact")
    route(router, "GET", "/v1/connect/intentions/1234")
    route(router, "DELETE", "/v1/connect/intentions/exact")  # the literal route reads only
    assert recorder.calls == [("exact", {}), ("single", {"id": "1234"}), ("single", {"id": "exact"})]


def test_options_names_the_methods_and_a_rest_segment_takes_the_rest(
    router: Router, recorder: Recorder
) -> None:
    assert route(router, "OPTIONS", "/v1/agent/services").headers == {"Allow": "OPTIONS,GET,HEAD"}
    router.add(READ_METHODS, "/v1/kv/*key", recorder.handler("kv"))
    route(router, "GET", "/v1/kv/app/config/db")
    route(router, "GET", "/v1/kv")
    assert recorder.calls == [("kv", {"key": "app/config/db"}), ("kv", {"key": ""})]


def test_pretty_indents_json_as_consul_does(router: Router) -> None:
    async def answer(_request: Request) -> Response:
        return Response.json({"a": [1]})

    router.add(READ_METHODS, "/v1/pretty", answer)
    assert route(router, "GET", "/v1/pretty?pretty").body == b'{\n    "a": [\n        1\n    ]\n}\n'
    assert route(router, "GET", "/v1/pretty").body == b'{"a":[1]}'


def test_an_unknown_path_is_404_naming_the_path(router: Router) -> None:
    error = refusal(router, "GET", "/v1/agent/nonsense")
    assert error.status == 404
    assert "/v1/agent/nonsense" in error.message


def test_a_known_path_with_a_wrong_method_is_405_with_every_allowed_method(
    router: Router, recorder: Recorder
) -> None:
    error = refusal(router, "DELETE", "/v1/agent/services")
    assert error.status == 405
    assert error.headers == {"Allow": "OPTIONS,GET,HEAD"}  # Consul's spelling
    # Two routes match this path: the Allow header is the union of both, once each.
    error = refusal(router, "PUT", "/v1/connect/intentions/exact")
    assert error.headers == {"Allow": "OPTIONS,DELETE,GET,HEAD"}
    assert recorder.calls == []


class NameTaken(Conflict):
    """A more specific conflict: it keeps the status of its kind."""


def raising(error: Exception) -> Any:
    async def handle(request: Request) -> Response:
        raise error

    return handle


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFound("Intention not found: 42"), 404),
        (Conflict("duplicate intention found: a => b"), 409),
        (InvalidDefinition("unknown template expression ${x}"), 400),
        (CatalogError("a catalog error without a status of its own"), 400),
        (NameTaken("name 'q' aliases an existing query name"), 409),
    ],
    ids=["not-found", "conflict", "invalid-definition", "other-catalog-error", "conflict-subclass"],
)
def test_domain_errors_become_their_status_with_their_message(error: CatalogError, status: int) -> None:
    router = Router()
    router.add(READ_METHODS, "/v1/x", raising(error))
    caught = refusal(router, "GET", "/v1/x")
    assert (caught.status, caught.message) == (status, str(error))
    assert status_of(error) == status


def test_an_unexpected_exception_is_not_disguised_as_a_client_error() -> None:
    # The router must let a bug through: the connection layer logs it and answers 500.
    router = Router()
    router.add(READ_METHODS, "/v1/x", raising(KeyError("internal")))
    with pytest.raises(KeyError):
        route(router, "GET", "/v1/x")


# -- the router behind a real connection ----------------------------------------------------


class CapturingTransport(asyncio.Transport):
    """Collects what the connection writes; ``wrote`` is set on every write."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.wrote = asyncio.Event()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data
        self.wrote.set()

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def exchange(router: Router, requests: list[bytes]) -> list[bytes]:
    """Send each raw request in turn on one connection; the raw response to each."""
    server = HttpServer(router, ConnectionBook(lambda: Caps(per_client=0, total=100)), lambda request: None)
    connection = HttpConnection(server)
    transport = CapturingTransport()
    connection.connection_made(transport)
    responses = []
    for raw in requests:
        transport.data.clear()
        transport.wrote.clear()
        connection.data_received(raw)
        await asyncio.wait_for(transport.wrote.wait(), 5)
        responses.append(bytes(transport.data))
    connection.connection_lost(None)
    return responses


def test_a_handler_bug_is_a_bare_500_that_leaks_nothing_and_the_connection_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = Router()
    router.add(READ_METHODS, "/v1/boom", raising(RuntimeError("secret-token-abc in a stack frame")))
    router.add(READ_METHODS, "/v1/missing", raising(NotFound("Query not found: q1")))
    router.add(READ_METHODS, "/v1/ok", Recorder().handler("fine"))
    get = b"GET %s HTTP/1.1\r\nHost: agent\r\n\r\n"
    with caplog.at_level(logging.ERROR, logger="supervisor.api"):
        boom, missing, ok = asyncio.run(
            exchange(router, [get % path for path in (b"/v1/boom", b"/v1/missing", b"/v1/ok")])
        )
    assert boom.startswith(b"HTTP/1.1 500 ")
    head, _, body = boom.partition(b"\r\n\r\n")
    assert body == b"Internal error: see the agent log"
    assert b"secret-token-abc" not in boom and b"Traceback" not in boom and b"RuntimeError" not in boom
    # The operator finds the traceback in the log instead.
    assert any(record.exc_info is not None for record in caplog.records)
    # Domain errors still get their status on the same connection, and so does the next request.
    assert missing.startswith(b"HTTP/1.1 404 ") and missing.endswith(b"Query not found: q1")
    assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"fine")
