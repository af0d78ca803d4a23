"""Talking to the local agent: blocking-query watches on threads, and one-off requests.

Each watch owns one keep-alive HTTP connection and long-polls one endpoint (``?index=``
or ``?hash=``); every changed answer is handed to the event loop. Failures back off
(0.2 s doubling to 30 s) and are logged once per outage, not per attempt.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from supervisor.net import DEFAULT_PORT, split_host_port

log = logging.getLogger("builtin_proxy.agent")

WAIT = "5m"
REQUEST_TIMEOUT = 340.0  # longer than WAIT plus the agent's jitter


class AgentError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class AgentConnection:
    """One keep-alive connection to the agent (not thread-safe: one per thread)."""

    def __init__(self, address: str, token: str) -> None:
        host, self.port = split_host_port(address.removeprefix("http://"), DEFAULT_PORT)
        self.host = host or "127.0.0.1"
        self.token = token
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 30.0
    ) -> tuple[dict[str, str], Any]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"X-Consul-Token": self.token} if self.token else {}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):  # once more on a stale keep-alive connection
            if self._aborted:
                raise ConnectionAbortedError("the request was aborted")
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self._conn.timeout = timeout
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
                continue
            if response.status != 200:
                raise AgentError(response.status, data.decode(errors="replace").strip())
            answer_headers = {name.lower(): value for name, value in response.getheaders()}
            return answer_headers, json.loads(data) if data else None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def abort(self) -> None:
        """From another thread: cut short a request in progress (a held blocking query),
        so that its thread returns now and the agent can release the connection. The
        client makes no further requests."""
        self._aborted = True
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


class Watch(threading.Thread):
    """Long-poll ``path`` and call ``deliver(data)`` (through ``post``) when it changes."""

    def __init__(
        self,
        name: str,
        client: AgentConnection,
        path: str,
        post: Callable[[Callable[..., None], Any], None],
        deliver: Callable[[Any], None],
        *,
        mode: str = "index",
        on_error: Callable[[AgentError], None] | None = None,
    ) -> None:
        super().__init__(name=f"watch {name}", daemon=True)
        self.label = name
        self.client = client
        self.path = path
        self.post = post
        self.deliver = deliver
        self.mode = mode
        self.on_error = on_error
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        self.client.abort()

    def run(self) -> None:
        key = ""
        failures = 0
        header = "x-consul-index" if self.mode == "index" else "x-consul-contenthash"
        while not self._stopped.is_set():
            query = f"{self.mode}={urllib.parse.quote(key)}&wait={WAIT}" if key else ""
            separator = "&" if "?" in self.path else "?"
            try:
                headers, data = self.client.request(
                    "GET", self.path + (separator + query if query else ""), timeout=REQUEST_TIMEOUT
                )
            except AgentError as exc:
                if self._stopped.is_set():
                    break
                if self.on_error is not None:
                    self.post(self.on_error, exc)
                failures = self._back_off(failures, exc)
                continue
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if self._stopped.is_set():
                    break  # stop() cut the request short
                failures = self._back_off(failures, exc)
                continue
            if failures:
                log.info("%s: agent reachable again", self.label)
                failures = 0
            new_key = headers.get(header, "")
            if new_key != key or not key:
                key = new_key
                if not self._stopped.is_set():
                    self.post(self.deliver, data)
        self.client.close()

    def _back_off(self, failures: int, exc: Exception) -> int:
        if failures == 0:
            log.warning("%s: cannot query the agent (%s); retrying", self.label, exc)
        delay = min(30.0, 0.2 * (2**failures))
        self._stopped.wait(delay)
        return failures + 1


class Requests:
    """Runs one-off agent requests (authorize) on a few worker threads."""

    def __init__(self, address: str, token: str, post: Callable[..., None], workers: int = 4) -> None:
        import queue

        self._queue: queue.SimpleQueue[tuple[str, str, Any, Callable[[Any, Exception | None], None]] | None]
        self._queue = queue.SimpleQueue()
        self.post = post
        self._threads = [
            threading.Thread(
                target=self._work, args=(AgentConnection(address, token),), daemon=True, name="agent request"
            )
            for _ in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, method: str, path: str, body: Any, done: Callable[[Any, Exception | None], None]
    ) -> None:
        self._queue.put((method, path, body, done))

    def _work(self, client: AgentConnection) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            method, path, body, done = item
            started = time.monotonic()
            try:
                _, data = client.request(method, path, body, timeout=10.0)
            except (AgentError, OSError, http.client.HTTPException, ValueError) as exc:
                self.post(done, None, exc)
                continue
            log.debug("%s %s took %.1f ms", method, path, (time.monotonic() - started) * 1000)
            self.post(done, data, None)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
