"""The proxy's configuration, from either source the agent offers.

* a managed proxy reads ``/v1/agent/connect/proxy/<id>`` (``Config`` + ``Upstreams``);
* a proxy registered by hand (``kind: connect-proxy``) reads ``/v1/agent/service/<id>``.

Numbers are accepted as JSON ints, floats or numeric strings (Consul 1.3-1.5 silently
ignored a float ``connect_timeout_ms``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisor.net import split_host_port

DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000
DEFAULT_LOCAL_CONNECT_TIMEOUT_MS = 1_000
DEFAULT_CONNECT_TIMEOUT_MS = 10_000


def _number(value: Any, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name}: {value!r} is negative")
    return int(number)


def split_address(text: str, name: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(str(text))
    except ValueError:
        raise ValueError(f"{name}: expected host:port, got {text!r}") from None
    return host or "127.0.0.1", port


@dataclass(frozen=True)
class UpstreamConfig:
    destination_type: str
    destination_name: str
    datacenter: str
    local_bind_address: str
    local_bind_port: int
    connect_timeout_ms: int

    @property
    def listen(self) -> tuple[str, int]:
        return self.local_bind_address, self.local_bind_port

    def __str__(self) -> str:
        listen = f"{self.local_bind_address}:{self.local_bind_port}"
        return f"{listen}->{self.destination_type}:{self.destination_name}"


@dataclass(frozen=True)
class ProxyConfig:
    proxy_id: str
    service: str  # the proxied service's name: its identity (leaf CN, authorize Target)
    bind_address: str
    bind_port: int  # 0: no public listener
    local_service: tuple[str, int] | None
    local_connect_timeout_ms: int
    handshake_timeout_ms: int
    upstreams: tuple[UpstreamConfig, ...]
    telemetry: tuple[str, int] | None = None  # where Prometheus scrapes this proxy (None: nowhere)
    tunnels: bool = True  # offer reusable tunnels to other built-in proxies (config "tunnels")

    @property
    def listen(self) -> tuple[str, int]:
        return self.bind_address, self.bind_port


def _field(entry: dict[str, Any], name: str, legacy: str) -> Any:
    """A field of an upstream: Consul 1.3+'s CamelCase, or 1.2's snake_case (``Config.upstreams``)."""
    value = entry.get(name)
    return entry.get(legacy) if value is None else value


def _upstreams(raw: Any) -> tuple[UpstreamConfig, ...]:
    result = []
    for index, entry in enumerate(raw or []):
        if not isinstance(entry, dict):
            raise ValueError(f"Upstreams[{index}]: expected an object")
        config = _field(entry, "Config", "config") or {}
        if not isinstance(config, dict):
            raise ValueError(f"Upstreams[{index}].Config: expected an object")
        destination_type = _field(entry, "DestinationType", "destination_type") or "service"
        result.append(
            UpstreamConfig(
                destination_type="prepared_query" if destination_type == "prepared_query" else "service",
                destination_name=str(_field(entry, "DestinationName", "destination_name") or ""),
                datacenter=str(_field(entry, "Datacenter", "datacenter") or ""),
                local_bind_address=str(
                    _field(entry, "LocalBindAddress", "local_bind_address") or "127.0.0.1"
                ),
                local_bind_port=_number(
                    _field(entry, "LocalBindPort", "local_bind_port"), f"Upstreams[{index}].LocalBindPort", 0
                ),
                connect_timeout_ms=_number(
                    config.get("connect_timeout_ms"), "connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS
                ),
            )
        )
    return tuple(
        upstream for upstream in result if upstream.destination_name and upstream.local_bind_port > 0
    )


def _telemetry(config: dict[str, Any]) -> tuple[str, int] | None:
    """``telemetry``: ``"host:port"`` or ``{"prometheus_bind_addr": "host:port"}``."""
    value = config.get("telemetry")
    if isinstance(value, dict):
        value = value.get("prometheus_bind_addr")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"telemetry: expected host:port, got {value!r}")
    return split_address(value, "telemetry")


def from_managed(data: dict[str, Any]) -> ProxyConfig:
    """``GET /v1/agent/connect/proxy/<id>`` of a managed proxy."""
    config = data.get("Config") or {}
    local = config.get("local_service_address")
    return ProxyConfig(
        proxy_id=str(data["ProxyServiceID"]),
        service=str(data["TargetServiceName"]),
        bind_address=str(config.get("bind_address") or "0.0.0.0"),
        bind_port=_number(config.get("bind_port"), "bind_port", 0),
        local_service=split_address(local, "local_service_address") if local else None,
        local_connect_timeout_ms=_number(
            config.get("local_connect_timeout_ms"),
            "local_connect_timeout_ms",
            DEFAULT_LOCAL_CONNECT_TIMEOUT_MS,
        ),
        handshake_timeout_ms=_number(
            config.get("handshake_timeout_ms"), "handshake_timeout_ms", DEFAULT_HANDSHAKE_TIMEOUT_MS
        ),
        upstreams=_upstreams(data.get("Upstreams") or config.get("upstreams")),
        telemetry=_telemetry(config),
        tunnels=config.get("tunnels") is not False,
    )


def from_service(data: dict[str, Any]) -> ProxyConfig:
    """``GET /v1/agent/service/<id>`` of a hand-registered ``kind: connect-proxy`` service."""
    if data.get("Kind") != "connect-proxy":
        raise ValueError(f"service {data.get('ID')!r} is not a connect-proxy (Kind {data.get('Kind')!r})")
    proxy = data.get("Proxy") or {}
    config = proxy.get("Config") or {}
    destination = proxy.get("DestinationServiceName") or data.get("ProxyDestination") or ""
    if not destination:
        raise ValueError(f"service {data.get('ID')!r} names no destination service")
    local_port = _number(proxy.get("LocalServicePort"), "LocalServicePort", 0)
    local = (str(proxy.get("LocalServiceAddress") or "127.0.0.1"), local_port) if local_port else None
    return ProxyConfig(
        proxy_id=str(data["ID"]),
        service=str(destination),
        bind_address=str(data.get("Address") or "0.0.0.0"),
        bind_port=_number(data.get("Port"), "Port", 0),
        local_service=local,
        local_connect_timeout_ms=_number(
            config.get("local_connect_timeout_ms"),
            "local_connect_timeout_ms",
            DEFAULT_LOCAL_CONNECT_TIMEOUT_MS,
        ),
        handshake_timeout_ms=_number(
            config.get("handshake_timeout_ms"), "handshake_timeout_ms", DEFAULT_HANDSHAKE_TIMEOUT_MS
        ),
        upstreams=_upstreams(proxy.get("Upstreams")),
        telemetry=_telemetry(config),
        tunnels=config.get("tunnels") is not False,
    )
