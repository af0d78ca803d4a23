"""A small client for the agent's HTTP API, used by the CLI commands."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from supervisor.errors import AgentRequestError
from supervisor.net import DEFAULT_ADDRESS


def resolve_address(flag: str | None) -> str:
    """``-http-addr``, else CONSUL_HTTP_ADDR (as Consul's CLI), else 127.0.0.1:8500."""
    address = flag or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDRESS
    if address.startswith("unix://"):
        raise AgentRequestError(f"unix socket addresses are not supported: {address}")
    return address if "://" in address else f"http://{address}"


class AgentClient:
    def __init__(self, address: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.base = resolve_address(address)
        self.token = token if token is not None else os.environ.get("CONSUL_HTTP_TOKEN", "")
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if self.token:
            request.add_header("X-Consul-Token", self.token)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            message = exc.read().decode("utf-8", "replace").strip() or exc.reason
            answer = f"the agent at {self.base} answered {exc.code}: {message}"
            raise AgentRequestError(answer, exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AgentRequestError(
                f"cannot reach the agent at {self.base} ({reason}); is it running? "
                "Set -http-addr or CONSUL_HTTP_ADDR if it listens elsewhere"
            ) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode("utf-8", "replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Any = None, timeout: float | None = None) -> Any:
        return self.request("PUT", path, body, timeout=timeout)
