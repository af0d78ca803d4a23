"""One streaming etcd watch over the JSON gateway (``POST /v3/watch``): one JSON object per
line, on a connection of its own -- the gateway cannot cancel a watch, closing its
connection does. ``Grpc-Metadata-hasleader`` makes etcd end the stream when its member
loses the leader, and TCP keepalive finds a dead member behind a silent watch."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

from supervisor.cluster.etcd import (
    RETRY_ELSEWHERE,
    EtcdClient,
    EtcdCompacted,
    EtcdRejected,
    EtcdUnavailable,
    Event,
    WatchMessage,
    b64,
    describe,
    error_of,
    kv_of,
    loads,
    prefix_end,
)


class Watch:
    """One streaming watch. Iterating blocks on the socket; ``close`` (from any thread)
    ends it. Raises ``EtcdCompacted`` when etcd cancels it for a compacted revision and
    ``EtcdUnavailable`` when the stream breaks (its member lost the leader, or died)."""

    def __init__(self, client: EtcdClient, prefix: str, start_revision: int) -> None:
        self.client = client
        self.prefix = prefix
        self.start_revision = start_revision
        self._connection: http.client.HTTPConnection | None = None
        self._closed = False

    def messages(self) -> Iterator[WatchMessage]:
        client = self.client
        failures = []
        for _ in range(len(client.endpoints)):
            endpoint = client.current
            try:
                response = self._open(endpoint)
            except (OSError, http.client.HTTPException, EtcdUnavailable) as exc:
                self._disconnect()
                failures.append(f"{endpoint}: {describe(exc)}")
                client.rotate()
                continue
            except BaseException:
                self._disconnect()
                raise
            try:
                yield from self._read(endpoint, response)
            finally:
                self._disconnect()
            return
        raise EtcdUnavailable(f"no etcd endpoint took the watch ({'; '.join(failures)})")

    def _open(self, endpoint: str) -> http.client.HTTPResponse:
        if self._closed:
            raise EtcdUnavailable("watch closed")
        client = self.client
        connection = client.connect(endpoint, client.timeout)
        self._connection = connection
        headers = {"Content-Type": "application/json", "Grpc-Metadata-hasleader": "true"}
        token = client.token()
        if token:
            headers["Authorization"] = token
        request = {
            "key": b64(self.prefix),
            "range_end": b64(prefix_end(self.prefix)),
            "start_revision": str(self.start_revision),
            "progress_notify": True,
        }
        connection.request("POST", "/v3/watch", json.dumps({"create_request": request}), headers)
        response = connection.getresponse()
        if response.status != 200:
            data = response.read()
            code, message = error_of(loads(data), response.status)
            raise EtcdUnavailable(message) if code in RETRY_ELSEWHERE else EtcdRejected(message, code)
        sock = connection.sock
        if sock is not None:
            keep_alive(sock)
            sock.settimeout(None)  # an idle watch is silent; TCP keepalive finds a dead peer
        return response

    def _read(self, endpoint: str, response: http.client.HTTPResponse) -> Iterator[WatchMessage]:
        while not self.is_closed():
            try:
                line = response.readline()
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
                # (http.client trips over its own state when close() cut the socket)
                if self.is_closed():
                    return
                raise EtcdUnavailable(f"watch on {endpoint} broke: {describe(exc)}") from None
            if not line:
                if self.is_closed():
                    return
                raise EtcdUnavailable(f"watch on {endpoint} ended")
            reply = loads(line)
            if "error" in reply and isinstance(reply["error"], dict):
                error = reply["error"]
                raise EtcdUnavailable(f"watch on {endpoint}: {error.get('message', error)}")
            result = reply.get("result", {})
            header = result.get("header", {})
            compact = int(result.get("compact_revision", 0))
            message = WatchMessage(
                revision=int(header.get("revision", 0)),
                events=tuple(
                    Event("delete" if event.get("type") == "DELETE" else "put", kv_of(event.get("kv", {})))
                    for event in result.get("events", ())
                ),
                created=bool(result.get("created", False)),
                canceled=bool(result.get("canceled", False)),
                compact_revision=compact,
            )
            if message.canceled:
                if compact:
                    raise EtcdCompacted(f"revision {self.start_revision} was compacted", compact)
                raise EtcdUnavailable(f"watch on {endpoint} cancelled: {result.get('cancel_reason', '')}")
            yield message

    def is_closed(self) -> bool:
        return self._closed  # (a call, read again each time: another thread sets it)

    def close(self) -> None:
        """End the watch (from any thread): the reading thread's iteration stops."""
        self._closed = True
        connection = self._connection
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def keep_alive(sock: socket.socket, idle: int = 5, interval: int = 2, count: int = 3) -> None:
    """TCP keepalive: a dead etcd member behind a silent watch is found in ~11 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
