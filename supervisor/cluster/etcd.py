"""A small etcd v3 client on etcd's JSON gateway (``/v3/...``), with the standard library only.

Why not a gRPC client: of the Python ones, the maintained one has no TLS and the others are
abandoned (see the README's cluster section); grpcio would also bring fork and protobuf
pinning hazards to an agent that daemonizes. The gateway is part of every etcd since 3.3,
speaks JSON over HTTP/1.1, and needs about this much code. Its quirks, handled here: keys
and values are base64, 64-bit integers are strings, proto3 defaults are left out (a PUT
event has no ``type``, a failed txn no ``succeeded``, an empty range no ``kvs``).

Blocking calls, for worker threads: every call tries the endpoints in turn (the one that
answered last first) and raises ``EtcdUnavailable`` only when none answers.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from supervisor.errors import SupervisorError

log = logging.getLogger("supervisor.cluster.etcd")

# gRPC status codes the gateway reports (google.golang.org/grpc/codes)
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
OUT_OF_RANGE = 11
UNAVAILABLE = 14
UNAUTHENTICATED = 16
RETRY_ELSEWHERE = (UNAVAILABLE, DEADLINE_EXCEEDED)
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


class EtcdError(SupervisorError):
    """An etcd call failed."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered (down, cut off from its cluster's leader, or unreachable)."""


class EtcdRejected(EtcdError):
    """etcd answered and refused the request."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class EtcdNoSpace(EtcdRejected):
    """etcd's space quota is exhausted (its NOSPACE alarm): it takes no writes until an
    operator compacts, defragments and disarms it."""


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted away: list again."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def prefix_end(prefix: str) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix`` (bytes:
    the increment is of the key's last UTF-8 byte)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True)
class WatchMessage:
    revision: int  # the store's revision when etcd sent this
    events: tuple[Event, ...] = ()
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[dict[str, Any], ...]

    def ranged(self, position: int) -> list[KeyValue]:
        """The keys a ``request_range`` of the branch that ran returned."""
        response = self.responses[position].get("response_range", {})
        return [kv_of(item) for item in response.get("kvs", ())]


def kv_of(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(item.get("key", "")).decode("utf-8", "replace"),
        value=base64.b64decode(item.get("value", "")),
        create_revision=int(item.get("create_revision", 0)),
        mod_revision=int(item.get("mod_revision", 0)),
        lease=int(item.get("lease", 0)),
    )


# -- transaction operations (the gateway's JSON shapes) ---------------------------------------


def op_put(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def op_delete(key: str, *, prefix: bool = False) -> dict[str, Any]:
    body = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return {"request_delete_range": body}


def op_range(key: str, *, prefix: bool = False) -> dict[str, Any]:
    body = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return {"request_range": body}


def created_at(key: str, revision: int) -> dict[str, Any]:
    """Compare: ``key`` was created at ``revision`` (0: it does not exist)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}


def holds(key: str, value: str | bytes) -> dict[str, Any]:
    """Compare: ``key`` holds exactly ``value``."""
    return {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(value)}


def modified_at(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


@dataclass(frozen=True)
class Credentials:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""


class EtcdClient:
    """Unary calls over one kept-alive connection (a lock makes it safe to share)."""

    def __init__(
        self, endpoints: Sequence[str], credentials: Credentials = Credentials(), *, timeout: float = 5.0
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = tuple(endpoints)
        self.credentials = credentials
        self.timeout = timeout
        self._current = 0
        self._connection: http.client.HTTPConnection | None = None
        self._token = ""
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        if any(url.startswith("https://") for url in self.endpoints):
            self._tls = tls_context(credentials)

    # -- the calls --------------------------------------------------------------------------

    def range(
        self, key: str, *, prefix: bool = False, revision: int = 0, limit: int = 0
    ) -> tuple[list[KeyValue], int, bool]:
        """Keys (linearizable read); returns them, the store's revision, and whether more
        keys were left out by ``limit``."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        reply = self.call("/v3/kv/range", body)
        kvs = [kv_of(item) for item in reply.get("kvs", ())]
        return kvs, int(reply.get("header", {}).get("revision", 0)), bool(reply.get("more", False))

    def range_all(self, prefix: str, page: int = 1000) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` as of one revision, read in pages."""
        kvs, revision, more = self.range(prefix, prefix=True, limit=page)
        end = prefix_end(prefix)
        while more and kvs:
            start = kvs[-1].key.encode() + b"\0"
            body = {"key": b64(start), "range_end": b64(end), "revision": str(revision), "limit": str(page)}
            reply = self.call("/v3/kv/range", body)
            batch = [kv_of(item) for item in reply.get("kvs", ())]
            kvs += batch
            more = bool(reply.get("more", False)) and bool(batch)
        return kvs, revision

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        reply = self.call("/v3/kv/put", op_put(key, value, lease)["request_put"])
        return int(reply.get("header", {}).get("revision", 0))

    def delete(self, key: str, *, prefix: bool = False) -> int:
        reply = self.call("/v3/kv/deleterange", op_delete(key, prefix=prefix)["request_delete_range"])
        return int(reply.get("header", {}).get("revision", 0))

    def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> TxnResult:
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        reply = self.call("/v3/kv/txn", body)
        return TxnResult(
            bool(reply.get("succeeded", False)),
            int(reply.get("header", {}).get("revision", 0)),
            tuple(reply.get("responses", ())),
        )

    def grant(self, ttl: int) -> tuple[int, int]:
        reply = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(reply["ID"]), int(reply.get("TTL", ttl))

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; returns its TTL, 0 when it has expired (etcd then leaves TTL out)."""
        reply = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        # A streaming call: an error comes as {"error": ...} with HTTP 200, which must not be
        # read as "expired" (that would make the host join again and blink).
        result = reply.get("result")
        if not isinstance(result, dict):
            _code, message = error_of(reply, 200)
            raise EtcdUnavailable(f"lease keepalive failed: {message}")
        return int(result.get("TTL", 0))

    @property
    def current(self) -> str:
        return self.endpoints[self._current]

    def rotate(self) -> None:
        """Use the next endpoint from now on (to ask another member)."""
        with self._lock:
            self._drop_connection()
            self._current = (self._current + 1) % len(self.endpoints)

    def revoke(self, lease: int) -> None:
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdRejected as exc:
            if "not found" not in str(exc):
                raise

    def status(self) -> dict[str, Any]:
        return self.call("/v3/maintenance/status", {})

    def alarms(self) -> list[str]:
        reply = self.call("/v3/maintenance/alarm", {"action": "GET"})
        return [str(alarm.get("alarm", "")) for alarm in reply.get("alarms", ())]

    # -- the transport --------------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return self._call(path, body)

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        failures = []
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self._current]
            try:
                return self._call_once(endpoint, path, body)
            except (OSError, http.client.HTTPException, EtcdUnavailable) as exc:
                failures.append(f"{endpoint}: {describe(exc)}")
                self._drop_connection()
                self._current = (self._current + 1) % len(self.endpoints)
        raise EtcdUnavailable(f"no etcd endpoint answered ({'; '.join(failures)})")

    def _call_once(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in (1, 2):
            status, reply = self._post(endpoint, path, body)
            if status == 200:
                return reply
            code, message = error_of(reply, status)
            if code == UNAUTHENTICATED and self.credentials.username and attempt == 1:
                self._token = ""  # expired: authenticate again, once
                continue
            if code in RETRY_ELSEWHERE or status in (502, 503, 504):
                raise EtcdUnavailable(message)
            if code == OUT_OF_RANGE or "compacted" in message:
                raise EtcdCompacted(message, 0)
            if code == RESOURCE_EXHAUSTED or "space exceeded" in message:
                raise EtcdNoSpace(f"etcd at {endpoint}: {message}", code)
            raise EtcdRejected(f"etcd at {endpoint} refused {path}: {message}", code)
        raise EtcdRejected(f"etcd at {endpoint}: authentication failed", UNAUTHENTICATED)

    def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if self.credentials.username and path != "/v3/auth/authenticate":
            if not self._token:
                self._token = self._authenticate(endpoint)
            headers["Authorization"] = self._token
        connection = self._connection
        if connection is None:
            connection = self._connection = self.connect(endpoint, self.timeout)
        connection.request("POST", path, json.dumps(body), headers)
        response = connection.getresponse()
        data = response.read()
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            raise EtcdUnavailable(f"not an etcd gateway answer (HTTP {response.status})") from None
        return response.status, reply if isinstance(reply, dict) else {}

    def _authenticate(self, endpoint: str) -> str:
        credentials = self.credentials
        body = {"name": credentials.username, "password": credentials.password}
        status, reply = self._post(endpoint, "/v3/auth/authenticate", body)
        if status != 200 or "token" not in reply:
            code, message = error_of(reply, status)
            if code in RETRY_ELSEWHERE:
                raise EtcdUnavailable(message)
            raise EtcdRejected(
                f"etcd at {endpoint} refused user {credentials.username!r}: {message}; "
                "check cluster.username and cluster.password_file",
                code,
            )
        return str(reply["token"])

    def connect(self, endpoint: str, timeout: float | None) -> http.client.HTTPConnection:
        parts = urlsplit(endpoint)
        host, port = parts.hostname or "", parts.port or 2379
        if parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def token(self) -> str:
        """The etcd auth token to send (authenticating first when there is none)."""
        with self._lock:
            if self.credentials.username and not self._token:
                self._token = self._authenticate_any()
            return self._token

    def _authenticate_any(self) -> str:
        endpoint = self.endpoints[self._current]
        try:
            return self._authenticate(endpoint)
        finally:
            self._drop_connection()


def tls_context(credentials: Credentials) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=credentials.ca_file or None)
        if credentials.cert_file:
            context.load_cert_chain(credentials.cert_file, credentials.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise EtcdError(
            f"cannot load the etcd TLS files ({credentials.ca_file}, {credentials.cert_file}): {exc}"
        ) from exc
    return context


def loads(data: bytes) -> dict[str, Any]:
    """A JSON object, or {} for anything else (an answer, or a value, not worth an error)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def error_of(reply: dict[str, Any], status: int) -> tuple[int, str]:
    error = reply.get("error")
    if isinstance(error, dict):  # (inside a stream)
        reply = error
    message = reply.get("message") or (error if isinstance(error, str) else "") or f"HTTP {status}"
    code = reply.get("code", reply.get("grpc_code", 0))
    try:
        return int(code), str(message)
    except (TypeError, ValueError):
        return 0, str(message)


def describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message}"
    return str(exc) or type(exc).__name__
