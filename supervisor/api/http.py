"""HTTP/1.1 for the agent API: h11 for the protocol, an asyncio Protocol per connection.

Why h11: parsing HTTP by hand had holes (negative chunk sizes, conflicting
Content-Length headers, ``Transfer-Encoding: gzip, chunked``, ``Expect: 100-continue``,
bare-LF requests); h11 is a small, well-kept, sans-IO implementation of RFC 7230 that
gets framing right and leaves I/O to us, so the server stays one asyncio thread that
holds thousands of long-poll (blocking) requests cheaply. Why not a framework: the API
is a few dozen JSON endpoints on loopback; a framework would add a dependency tree and a
second event model for no gain.

Every connection is bounded: request head size (431), body size (413, answered before
the body is read), the time a client may take to send its head (10 s, 120 s between
keep-alive requests) and its body (30 s, then 408). A malformed request gets the status
h11 suggests (400, 431, 501 ...) and the connection is closed. Nothing a client sends
can raise out of a connection: every failure ends that connection only, with a log line.
How many connections a client may hold is decided by ``ConnectionBook`` (``limits.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11

from supervisor.api.limits import ConnectionBook, Refusal
from supervisor.config.limits import LimitExceeded, loads_json
from supervisor.net import join_host_port, split_host_port

log = logging.getLogger("supervisor.api")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
HEADER_TIMEOUT = 10.0  # seconds a client may take to send request line and headers
BODY_TIMEOUT = 30.0
IDLE_TIMEOUT = 120.0  # keep-alive connections idle longer than this are closed
LINGER = 2.0  # after an error response: how long to drain what the client still sends
LINGER_REFUSED = 0.25  # the same after a 429 (a flood must not hold descriptors for long)
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listening socket
SERVER_NAME = b"proxy-supervisor"


class HttpError(Exception):
    """Raised by handlers: becomes a response with ``status`` and a plain-text body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Request:
    method: str
    path: str  # percent-decoded
    raw_path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    remote: str
    params: dict[str, str] = field(default_factory=dict)  # filled in by the router
    # Set once the client has closed its side: a blocking query for it can end at once.
    client_gone: asyncio.Event | None = None
    memo: dict[str, Any] = field(default_factory=dict)  # per-request results (who is calling)

    @property
    def remote_host(self) -> str:
        try:
            return split_host_port(self.remote)[0]
        except ValueError:
            return self.remote

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def has_arg(self, name: str) -> bool:
        return name in self.query

    def json(self) -> Any:
        if not self.body.strip():
            raise HttpError(400, "Request body is empty: a JSON object was expected")
        try:
            return loads_json(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"Request decode failed: {exc}") from None
        except LimitExceeded as exc:
            raise HttpError(400, f"Request decode failed: {exc}") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        body = json.dumps(data, indent=None, separators=(",", ":")).encode()
        return cls(status, body, {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def text(cls, text: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, text.encode(), {"Content-Type": "text/plain; charset=utf-8", **(headers or {})})


Handler = Callable[[Request], Awaitable[Response]]


def raw_response(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` response, for refusing a connection before any
    request was read (h11 only answers requests it has seen)."""
    body = message.encode()
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class HttpServer:
    """Serves ``handler`` on a listening socket, accepting only while under the book's cap.

    At the cap the listening socket is not read: further clients wait in the kernel's
    backlog, costing the agent no descriptor, until a connection closes. (An asyncio
    server would accept each one only to refuse it, and run out of descriptors first.)
    """

    def __init__(
        self, handler: Handler, book: ConnectionBook, principal_of: Callable[[Request], str | None]
    ) -> None:
        self.handler = handler
        self.book = book
        self.principal_of = principal_of  # whom a request's connection counts against
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def protocol(self) -> HttpConnection:
        return HttpConnection(self)

    def serve(self, listener: socket.socket) -> None:
        """Start accepting on ``listener`` (non-blocking, listening) from the running loop."""
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._resume()

    def close(self) -> None:
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        for connection in self.book.connections():
            if isinstance(connection, HttpConnection) and connection.transport is not None:
                connection.transport.close()

    def connection_closed(self) -> None:
        if not self._accepting and self._listener is not None and self._retry is None:
            self._resume()

    def _resume(self) -> None:
        if self._loop is not None and self._listener is not None and not self._accepting:
            self._accepting = True
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _pause(self) -> None:
        if self._accepting and self._loop is not None and self._listener is not None:
            self._accepting = False
            self._loop.remove_reader(self._listener.fileno())

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        for _ in range(ACCEPT_BATCH):
            if self.book.full:
                self._pause()  # resumed by the next connection that closes
                return
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors after all (another part of the agent)
                log.warning("cannot accept API connections: %s; trying again in 1s", exc.strerror or exc)
                self._pause()
                self._retry = self._loop.call_later(1.0, self._retry_accept)
                return
            client.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self.protocol, client))
            self._tasks.add(task)
            task.add_done_callback(self._accepted)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cannot set up an API connection: %s", task.exception())

    def _retry_accept(self) -> None:
        self._retry = None
        self._resume()


class HttpConnection(asyncio.Protocol):
    """One client connection: h11 parses, ``_serve`` runs the handler for one request
    at a time (a pipelined request waits in h11's buffer), timers bound every wait."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.remote = "?"
        self.remote_host = "?"
        self.gone = asyncio.Event()
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # armed at or before _deadline
        self._deadline: float | None = None
        self._on_deadline: Callable[[], None] | None = None
        self._closed = False
        self._eof_pending = False  # the client closed its side while a request was served

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.remote_host = str(peer[0])
            self.remote = join_host_port(str(peer[0]), int(peer[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        refusal = self.server.book.opened(self, self.remote_host)
        if refusal is not None:
            transport.write(raw_response(refusal.status, refusal.message))
            self._linger(LINGER_REFUSED)
            return
        self._expect_request(HEADER_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # lingering after an error response: what the client still sends is dropped
        try:
            self.conn.receive_data(data)
        except h11.RemoteProtocolError:
            self._close()  # data after the client said it was done
            return
        if self._task is not None:
            # A request is being served; a client may pipeline, but not without bound.
            if len(self.conn.trailing_data[0]) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                self._close()
            return
        self._advance()

    def eof_received(self) -> bool:
        self.gone.set()
        if self._closed:
            return False  # lingering: the client is done too, close now
        if self._task is not None:
            self._eof_pending = True  # told to h11 once the response is out
        elif not self._closed:
            self._feed_eof()
            self._advance()
        return True  # keep our side open: a response may still be on its way

    def _feed_eof(self) -> None:
        self._eof_pending = False
        try:
            self.conn.receive_data(b"")
        except h11.RemoteProtocolError:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()
        self._closed = True
        self._cancel_timer()
        if self._timer is not None:  # a linger timer too: the transport is gone
            self._timer.cancel()
            self._timer = None
        self.server.book.closed(self)
        self.server.connection_closed()
        if self._task is not None:
            self._task.cancel()

    # -- reading a request -----------------------------------------------------------

    def _advance(self) -> None:
        """Feed h11's events until it needs more data or a request is complete."""
        while not self._closed and self._task is None:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, f"Malformed request: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - h11 failing on hostile input (a 5,000-digit length)
                log.debug("cannot parse a request from %s: %r", self.remote, exc)
                self._fail(400, "Malformed request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if not self._on_head(event):
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_BODY_BYTES:
                    self._fail(413, f"Request body larger than {MAX_BODY_BYTES} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._start_serving()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _on_head(self, head: h11.Request) -> bool:
        if head.http_version not in (b"1.0", b"1.1"):
            self._fail(505, f"HTTP/{head.http_version.decode()} is not supported: use HTTP/1.1")
            return False
        self._request = head
        self._body = bytearray()
        length = _content_length(head.headers)
        if length is not None and length > MAX_BODY_BYTES:
            self._fail(413, f"Request body larger than {MAX_BODY_BYTES} bytes")
            return False
        if self.conn.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
        self._set_timer(BODY_TIMEOUT, self._body_too_slow)
        return True

    def _start_serving(self) -> None:
        self._cancel_timer()
        head, self._request = self._request, None
        assert head is not None
        request = _request_from(head, bytes(self._body), self.remote, self.gone)
        self._body = bytearray()
        refusal = self.server.book.identified(self, self.server.principal_of(request))
        if refusal is not None:
            self._fail(refusal.status, refusal.message, LINGER_REFUSED)
            return
        self._task = asyncio.get_running_loop().create_task(self._serve(request), name=f"http {self.remote}")

    async def _serve(self, request: Request) -> None:
        try:
            response = await self._dispatch(request)
            if not self._closed:
                self._write_response(response, head=request.method == "HEAD")
        except asyncio.CancelledError:
            self._close()  # the connection went, or the server is stopping
            return
        except Exception:  # what a handler raises ends this connection only, logged once
            log.exception("internal error writing the response to %s %s", request.method, request.path)
            self._close()
            return
        finally:
            self._task = None
        self._next_cycle()

    async def _dispatch(self, request: Request) -> Response:
        try:
            return await self.server.handler(request)
        except HttpError as exc:
            return Response.text(exc.message, exc.status, exc.headers)
        except asyncio.CancelledError:
            raise
        except Exception:  # the agent must keep serving; the bug is logged with its traceback
            log.exception("internal error handling %s %s", request.method, request.path)
            return Response.text("Internal error: see the agent log", 500)

    def _next_cycle(self) -> None:
        if self._closed:
            return
        if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
            self._close()
            return
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            self._close()
            return
        self._expect_request(IDLE_TIMEOUT)
        if self._eof_pending:
            self._feed_eof()
        self._advance()  # a pipelined request may already be buffered

    # -- writing ------------------------------------------------------------------------

    def _write_response(self, response: Response, *, head: bool = False, close: bool = False) -> None:
        headers: list[tuple[bytes, bytes]] = [
            (b"Server", SERVER_NAME),
            (b"Content-Length", str(len(response.body)).encode()),
        ]
        headers += [
            (name.encode("latin-1"), _header_value(value)) for name, value in response.headers.items()
        ]
        if close:
            headers.append((b"Connection", b"close"))
        data = self.conn.send(h11.Response(status_code=response.status, headers=headers))
        if response.body and not head:
            data += self.conn.send(h11.Data(data=response.body))
        data += self.conn.send(h11.EndOfMessage())
        if self.transport is not None:
            self.transport.write(data)

    def _send(self, event: h11.InformationalResponse) -> None:
        data = self.conn.send(event)
        if self.transport is not None and data:
            self.transport.write(data)

    def _fail(self, status: int, message: str, linger: float = LINGER) -> None:
        """Answer a request that cannot be served (malformed, too big, too slow), then close."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self._write_response(Response.text(message, status), close=True)
            except h11.LocalProtocolError:
                pass
        self._linger(linger)

    # -- timers and closing ---------------------------------------------------------------

    def _expect_request(self, timeout: float) -> None:
        self._set_timer(timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        if self.conn.trailing_data[0]:  # part of a request arrived, the rest did not
            self._fail(408, "Request headers not received in time")
        else:
            self._close()  # an idle keep-alive connection, or one that never spoke

    def _body_too_slow(self) -> None:
        self._fail(408, "Request body not received in time")

    # One timer per connection, moved lazily: every request passes several deadlines
    # (head, body, idle), and creating and cancelling a loop timer for each was a tenth of
    # the API's time per request. Setting a deadline is an assignment; the armed timer,
    # when it fires early, re-arms itself for the deadline that stands then.

    def _set_timer(self, seconds: float, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        self._on_deadline = callback
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        self._timer = None
        deadline, callback = self._deadline, self._on_deadline
        if deadline is None or callback is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:  # moved on since this timer was armed
            self._timer = loop.call_at(deadline, self._deadline_reached)
            return
        self._deadline = self._on_deadline = None
        callback()

    def _cancel_timer(self) -> None:
        self._deadline = self._on_deadline = None

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _linger(self, seconds: float) -> None:
        """Close after an error response without resetting it away: closing a socket
        that still holds unread data sends a RST, which can destroy the response before
        the client reads it. So send our FIN, drop what still arrives, close at the
        client's FIN or after ``LINGER``."""
        if self._closed or self.transport is None:
            return
        self._closed = True
        self._cancel_timer()
        if self._timer is not None:
            self._timer.cancel()
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(seconds, transport.close)


def _content_length(headers: h11._headers.Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is one well-formed number
    return None


def _header_value(value: str) -> bytes:
    """A header value as printable ASCII: a value that carries client input (a service
    name in ``X-Consul-Reason``) may hold any character, and a CR, LF or non-ASCII one
    would break the response; those are escaped (``\\u0100``)."""
    if value.isascii() and value.isprintable():
        return value.encode("ascii")
    return value.encode("unicode_escape")


def split_target(target: str) -> tuple[str, str]:
    """Path and query of a request target. The usual origin form (``/v1/...?index=1``) is
    split at the ``?`` -- urlsplit would read ``//v1/agent/self`` as a host named v1 --
    and the absolute form (``http://host/v1/...``) by urlsplit."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query.partition("#")[0]
    parts = urlsplit(target)
    return parts.path or "/", parts.query


def _request_from(head: h11.Request, body: bytes, remote: str, gone: asyncio.Event) -> Request:
    path, query = split_target(head.target.decode("latin-1"))
    headers: dict[str, str] = {}
    for name, value in head.headers:
        headers[name.decode("latin-1")] = value.decode("latin-1")
    return Request(
        method=head.method.decode("latin-1").upper(),
        path=unquote(path),
        raw_path=path,
        query=parse_qs(query, keep_blank_values=True),
        headers=headers,
        body=body,
        remote=remote,
        client_gone=gone,
    )


__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "HttpConnection",
    "HttpError",
    "HttpServer",
    "Refusal",
    "Request",
    "Response",
]
