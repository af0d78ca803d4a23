"""The API's HTTP layer in-process (h11 under an asyncio server on loopback): every
malformed request gets the right status and a closed connection, never a traceback;
connection limits answer 429. Raw sockets play the client, as a hostile one would."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import supervisor.api.http as http
from supervisor.api.http import HttpServer, Request, Response
from supervisor.api.limits import Caps, ConnectionBook, caps_for


@dataclass
class Served:
    port: int
    loop: asyncio.AbstractEventLoop
    book: ConnectionBook
    requests: list[Request]


async def handler(request: Request) -> Response:
    if request.path == "/hold":
        assert request.client_gone is not None
        await request.client_gone.wait()
        return Response.text("gone")
    return Response.json({"method": request.method, "body": request.body.decode(errors="replace")})


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setattr(http, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(http, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(http, "IDLE_TIMEOUT", 0.5)
    loop = asyncio.new_event_loop()
    requests: list[Request] = []
    caps = [Caps(per_client=5, total=50)]

    def principal(request: Request) -> str | None:
        token = request.headers.get("x-consul-token", "")
        if token == "master":
            return None
        return f"proxy:{token}" if token else f"addr:{request.remote_host}"

    book = ConnectionBook(lambda: caps[0])

    async def recording(request: Request) -> Response:
        requests.append(request)
        return await handler(request)

    ready = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            server = await loop.create_server(HttpServer(recording, book, principal).protocol, "127.0.0.1", 0)
            holder["port"] = server.sockets[0].getsockname()[1]
            holder["stop"] = stop = asyncio.Event()
            ready.set()
            async with server:
                await stop.wait()
                for connection in book.connections():
                    transport = getattr(connection, "transport", None)
                    if transport is not None:
                        transport.close()
                await asyncio.sleep(0.05)

        loop.run_until_complete(main())
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield Served(int(holder["port"]), loop, book, requests)  # type: ignore[call-overload]
    stop = holder["stop"]
    assert isinstance(stop, asyncio.Event)
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)


def exchange(port: int, raw: bytes, *, wait: float = 3.0) -> bytes:
    """Send ``raw``, then read until the server closes (or ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(raw)
        chunks = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


MALFORMED = {
    "negative chunk size": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    # lines still unterminated after 64 KiB (the old parser raised out of the connection)
    "chunk size line over 64 KiB": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"x" * 70_000,
        431,
    ),
    "trailer over 64 KiB": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"y" * 70_000,
        431,
    ),
    "conflicting Content-Length": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    "gzip, chunked": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "garbage request line": (b"GARBAGE\r\n\r\n", 400),
    "header without colon": (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
    "HTTP/2.0 request line": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "5,000-digit Content-Length": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        400,
    ),
    "body over the limit": (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n", 413),
    "HTTP/1.1 without Host": (b"GET / HTTP/1.1\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_their_status_and_a_closed_connection(
    served: Served, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw, expected = MALFORMED[case]
    began = time.monotonic()
    reply = exchange(served.port, raw)
    assert status_of(reply) == expected, reply[:200]
    assert b"Connection: close" in reply
    assert time.monotonic() - began < 2.0  # closed by the server, not by our read timeout
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert served.requests == []  # nothing malformed reached a handler


def test_a_slow_chunked_body_is_408(served: Served) -> None:
    reply = exchange(
        served.port, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
    )
    assert status_of(reply) == 408


def test_slow_headers_are_408_and_a_silent_client_is_dropped(served: Served) -> None:
    assert status_of(exchange(served.port, b"GET / HTTP/1.1\r\nHost: a\r\n")) == 408
    assert exchange(served.port, b"") == b""  # connected, said nothing: closed after the timeout


def test_expect_100_continue_is_answered_before_the_body(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=3) as sock:
        sock.sendall(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"ping")
        reply = sock.recv(4096)
    assert status_of(reply) == 200 and b'"body":"ping"' in reply


def test_http_1_0_without_keep_alive_is_closed_after_the_response(served: Served) -> None:
    began = time.monotonic()
    reply = exchange(served.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert status_of(reply) == 200 and time.monotonic() - began < 0.4  # not held until the idle timeout


def test_bare_lf_requests_are_served(served: Served) -> None:
    reply = exchange(served.port, b"GET /x HTTP/1.0\n\n")
    assert status_of(reply) == 200


def test_keep_alive_and_pipelining(served: Served) -> None:
    raw = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    reply = exchange(served.port, raw)
    assert reply.count(b"HTTP/1.1 200 ") == 2
    assert [request.path for request in served.requests] == ["/a", "/b"]


def test_a_held_request_ends_when_its_client_hangs_up(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=3) as sock:
        sock.sendall(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
        deadline = time.monotonic() + 3
        while not served.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.shutdown(socket.SHUT_WR)
        assert status_of(sock.recv(4096)) == 200
    deadline = time.monotonic() + 3
    while served.book.total and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.book.total == 0  # the connection is released, not kept until a timeout


def test_per_client_limit_answers_429_and_tokens_count_apart(served: Served) -> None:
    held = []
    try:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=3)
            sock.sendall(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
            held.append(sock)
        deadline = time.monotonic() + 3
        while len(served.requests) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = exchange(served.port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert status_of(refused) == 429 and b"too many concurrent connections" in refused
        # a proxy's token counts against that proxy, the master token is never refused
        ok = exchange(
            served.port, b"GET /x HTTP/1.1\r\nHost: a\r\nX-Consul-Token: p1\r\nConnection: close\r\n\r\n"
        )
        assert status_of(ok) == 429  # still refused at accept: 127.0.0.1 holds its 5
    finally:
        for sock in held:
            sock.close()


def test_the_book_moves_identified_connections_to_their_principal() -> None:
    caps = Caps(per_client=2, total=10)
    book = ConnectionBook(lambda: caps)

    def request(principal: str) -> str:
        return principal

    a, b, c, d = object(), object(), object(), object()
    assert book.opened(a, "127.0.0.1") is None and book.opened(b, "127.0.0.1") is None
    assert book.opened(c, "127.0.0.1") is not None  # two unidentified from one address
    book.closed(c)  # (a refused connection is counted until it is closed)
    assert book.identified(a, request("proxy:web")) is None
    assert book.identified(b, request("proxy:web")) is None
    assert book.held_by("addr:127.0.0.1") == 0 and book.held_by("proxy:web") == 2
    assert book.opened(c, "127.0.0.1") is None and book.opened(d, "127.0.0.1") is None
    assert book.identified(c, request("proxy:web")) is not None  # a third for one proxy
    for connection in (a, b, c, d):
        book.closed(connection)
    assert book.total == 0 and book.held_by("proxy:web") == 0


def test_anonymous_requests_leave_headroom_for_identified_callers() -> None:
    caps = Caps(per_client=0, total=100)
    book = ConnectionBook(lambda: caps)
    refused = []
    for number in range(100):
        connection = object()
        assert book.opened(connection, f"10.0.0.{number}") is None
        refused.append(book.identified(connection, f"addr:10.0.0.{number}") is not None)
    assert refused.count(False) == 75 and book.full  # a quarter (at most 64) is kept back


def test_the_total_cap_keeps_a_reserve_of_descriptors_for_supervision() -> None:
    assert caps_for(200, 0, proxies=100, file_limit=1024).total == 1024 - 256 - 400
    assert caps_for(200, 100, proxies=0, file_limit=1 << 20).total == 100
    assert caps_for(200, 0, proxies=500, file_limit=1024).total == 16  # never zero
