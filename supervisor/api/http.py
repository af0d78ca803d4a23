"""A small HTTP/1.1 server on asyncio, enough for Consul's agent API.

Why not a framework: the API is a few dozen JSON endpoints on loopback, but it must
hold thousands of long-poll (blocking) requests cheaply, which an asyncio server does in
one thread. Keep-alive, Content-Length and chunked request bodies are supported; sizes
and the time a client may take to send a request are bounded so a slow or hostile
client cannot pin resources.
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

log = logging.getLogger("supervisor.api")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
HEADER_TIMEOUT = 10.0  # seconds a client may take to send request line and headers
BODY_TIMEOUT = 30.0
IDLE_TIMEOUT = 120.0  # keep-alive connections idle longer than this are closed


class HttpError(Exception):
    """Raised by handlers: becomes a response with ``status`` and a plain-text body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class ClientWatchingReader(asyncio.StreamReader):
    """A stream reader that says when the client has gone (EOF or a broken connection).

    A held blocking query does not read from its connection, so without this a client
    that disconnects would keep its socket open on our side until the query's wait ran
    out (up to 10 minutes): proxies that restart or drop a watch would pile up fds.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self.gone = asyncio.Event()

    def feed_eof(self) -> None:
        super().feed_eof()
        self.gone.set()

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        self.gone.set()


def watching_protocol_factory(
    callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], limit: int
) -> Callable[[], asyncio.StreamReaderProtocol]:
    """For ``loop.create_server``: what ``asyncio.start_server`` builds, with our reader."""

    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(ClientWatchingReader(limit), callback)

    return factory


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

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def has_arg(self, name: str) -> bool:
        return name in self.query

    def json(self) -> Any:
        if not self.body.strip():
            raise HttpError(400, "Request body is empty: a JSON object was expected")
        try:
            return json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpServer:
    """Serves ``handler`` on an already-bound listening socket."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: set[asyncio.Task[None]] = set()

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            first = True
            while True:
                try:
                    request = await self._read_request(
                        reader, remote, HEADER_TIMEOUT if first else IDLE_TIMEOUT
                    )
                except _BadRequest as exc:
                    await self._write(writer, Response.text(str(exc), exc.status), keep_alive=False)
                    return
                if request is None:
                    return
                first = False
                response = await self._dispatch(request)
                keep_alive = request.headers.get("connection", "").lower() != "close"
                await self._write(writer, response, keep_alive=keep_alive, head=request.method == "HEAD")
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only the server's shutdown cancels a connection; this task is the outermost
            # frame, and asyncio's start_server callback would log a cancelled task as an error.
            return
        finally:
            writer.close()

    async def _dispatch(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except HttpError as exc:
            return Response.text(exc.message, exc.status, exc.headers)
        except asyncio.CancelledError:
            raise
        except Exception:  # the agent must keep serving; the bug is logged with its traceback
            log.exception("internal error handling %s %s", request.method, request.path)
            return Response.text("Internal error: see the agent log", 500)

    async def _read_request(
        self, reader: asyncio.StreamReader, remote: str, timeout: float
    ) -> Request | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except TimeoutError:
            return None
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _BadRequest(400, "Incomplete request") from None
            return None
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "Request headers too large") from None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(400, "Malformed request line") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, "Only HTTP/1.x is supported")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, "Malformed header line")
            headers[name.strip().lower()] = value.strip()
        body = await self._read_body(reader, headers)
        parts = urlsplit(target)
        return Request(
            method=method.upper(),
            path=unquote(parts.path),
            raw_path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers=headers,
            body=body,
            remote=remote,
            client_gone=reader.gone if isinstance(reader, ClientWatchingReader) else None,
        )

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return await asyncio.wait_for(self._read_chunked(reader), BODY_TIMEOUT)
        length_text = headers.get("content-length")
        if not length_text:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise _BadRequest(400, "Invalid Content-Length") from None
        if length < 0:
            raise _BadRequest(400, "Invalid Content-Length")
        if length > MAX_BODY_BYTES:
            raise _BadRequest(413, f"Request body larger than {MAX_BODY_BYTES} bytes")
        try:
            return await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT)
        except TimeoutError:
            raise _BadRequest(408, "Request body not received in time") from None

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "Malformed chunked body") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")).strip():
                    pass  # trailers
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise _BadRequest(413, f"Request body larger than {MAX_BODY_BYTES} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)

    async def _write(
        self, writer: asyncio.StreamWriter, response: Response, *, keep_alive: bool, head: bool = False
    ) -> None:
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = "Unknown"
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        if not keep_alive:
            headers["Connection"] = "close"
        lines = [f"HTTP/1.1 {response.status} {reason}"] + [
            f"{name}: {value}" for name, value in headers.items()
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(response.body)
        await writer.drain()
