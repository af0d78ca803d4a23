"""builtin_proxy.config: the agent's JSON (managed-proxy config or a hand-registered
``connect-proxy`` service) turned into a ProxyConfig, in-process.

The inputs are the shapes the agent serves (``supervisor/api/shapes.py`` and Consul
1.3-1.5): a bad value must raise ``ValueError`` naming the field, because the proxy logs
that message and keeps its previous configuration.
"""

from __future__ import annotations

from typing import Any

import pytest

from builtin_proxy.config import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    DEFAULT_HANDSHAKE_TIMEOUT_MS,
    DEFAULT_LOCAL_CONNECT_TIMEOUT_MS,
    UpstreamConfig,
    from_managed,
    from_service,
    split_address,
)


def managed(config: dict[str, Any] | None = None, upstreams: Any = None) -> dict[str, Any]:
    """``GET /v1/agent/connect/proxy/web-proxy`` as the agent serves it."""
    data: dict[str, Any] = {
        "ProxyServiceID": "web-proxy",
        "TargetServiceID": "web-1",  # the name, not the ID, is the identity
        "TargetServiceName": "web",
        "ContentHash": "4f2a",
        "ExecMode": "daemon",
        "Command": ["proxy-supervisor", "connect", "proxy"],
        "Config": config if config is not None else {},
    }
    if upstreams is not None:
        data["Upstreams"] = upstreams
    return data


def upstream(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "DestinationType": "service",
        "DestinationNamespace": "",
        "DestinationName": "db",
        "Datacenter": "",
        "LocalBindAddress": "127.0.0.1",
        "LocalBindPort": 9191,
        "Config": {},
    }
    entry.update(overrides)
    return entry


# -- managed proxies ----------------------------------------------------------------------------


def test_managed_config_of_the_agent_is_read_field_by_field() -> None:
    config = from_managed(
        managed(
            {
                "bind_address": "10.0.0.5",
                "bind_port": 21000,
                "local_service_address": "127.0.0.1:8080",
                "local_connect_timeout_ms": 250,
                "handshake_timeout_ms": 3000,
            },
            [
                upstream(Datacenter="east", Config={"connect_timeout_ms": 700.0}),  # Consul ignored floats
                upstream(DestinationType="prepared_query", DestinationName="nearest", LocalBindPort=9192),
            ],
        )
    )
    assert config.proxy_id == "web-proxy"
    assert config.service == "web"
    assert config.listen == ("10.0.0.5", 21000)
    assert config.local_service == ("127.0.0.1", 8080)
    assert config.local_connect_timeout_ms == 250
    assert config.handshake_timeout_ms == 3000
    assert config.upstreams == (
        UpstreamConfig("service", "db", "east", "127.0.0.1", 9191, 700),
        UpstreamConfig("prepared_query", "nearest", "", "127.0.0.1", 9192, DEFAULT_CONNECT_TIMEOUT_MS),
    )


def test_managed_config_without_options_gets_the_documented_defaults() -> None:
    config = from_managed({"ProxyServiceID": "web-proxy", "TargetServiceName": "web", "Config": None})
    assert config.listen == ("0.0.0.0", 0)  # port 0: no public listener
    assert config.local_service is None
    assert config.local_connect_timeout_ms == DEFAULT_LOCAL_CONNECT_TIMEOUT_MS
    assert config.handshake_timeout_ms == DEFAULT_HANDSHAKE_TIMEOUT_MS
    assert config.upstreams == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("21000", 21000), (21000.0, 21000), ("2500.7", 2500), ("", 0), (None, 0)],
)
def test_numbers_are_accepted_as_ints_floats_or_numeric_strings(raw: Any, expected: int) -> None:
    assert from_managed(managed({"bind_port": raw})).bind_port == expected


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"bind_port": "abc"}, "bind_port"),
        ({"bind_port": True}, "bind_port"),  # a JSON bool is not a number, though Python says 1
        ({"bind_port": -1}, "bind_port"),
        ({"handshake_timeout_ms": [5]}, "handshake_timeout_ms"),
        ({"local_connect_timeout_ms": {"ms": 5}}, "local_connect_timeout_ms"),
        ({"local_service_address": "127.0.0.1"}, "local_service_address"),  # no port
        ({"local_service_address": "127.0.0.1:99999"}, "local_service_address"),
    ],
)
def test_a_bad_value_raises_value_error_naming_its_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        from_managed(managed(config))


def test_a_missing_proxy_id_raises_key_error_naming_it() -> None:
    # proxy.py catches KeyError along with ValueError and keeps the previous config.
    with pytest.raises(KeyError, match="ProxyServiceID"):
        from_managed({"TargetServiceName": "web"})


# -- upstreams ------------------------------------------------------------------------------------


def test_upstream_defaults_when_the_agent_leaves_fields_out() -> None:
    (only,) = from_managed(managed(upstreams=[{"DestinationName": "db", "LocalBindPort": "9191"}])).upstreams
    assert only == UpstreamConfig("service", "db", "", "127.0.0.1", 9191, DEFAULT_CONNECT_TIMEOUT_MS)
    assert only.listen == ("127.0.0.1", 9191)
    assert str(only) == "127.0.0.1:9191->service:db"


def test_upstreams_without_a_destination_or_a_port_are_dropped() -> None:
    config = from_managed(
        managed(
            upstreams=[
                upstream(DestinationName=""),
                upstream(LocalBindPort=0),
                upstream(LocalBindPort=None),
                upstream(DestinationName="cache", LocalBindPort=9300),
            ]
        )
    )
    assert [entry.destination_name for entry in config.upstreams] == ["cache"]


@pytest.mark.parametrize(
    ("upstreams", "message"),
    [
        ([upstream(), upstream(LocalBindPort="ninety")], r"Upstreams\[1\]\.LocalBindPort"),
        (["db:9191"], r"Upstreams\[0\]: expected an object"),
        ([upstream(Config={"connect_timeout_ms": "soon"})], "connect_timeout_ms"),
    ],
)
def test_a_bad_upstream_raises_value_error_saying_which_and_what(upstreams: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_managed(managed(upstreams=upstreams))


def test_top_level_upstreams_win_over_the_legacy_config_place() -> None:
    config = from_managed(
        managed(
            {"upstreams": [upstream(DestinationName="legacy", LocalBindPort=9400)]},
            [upstream(DestinationName="current", LocalBindPort=9500)],
        )
    )
    assert [entry.destination_name for entry in config.upstreams] == ["current"]


def test_legacy_snake_case_upstreams_in_config_are_not_dropped() -> None:
    # The Consul 1.2 shape, as in tests/fixtures/consul/consul-1.2-agent.json.
    config = from_managed(managed({"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]}))
    assert [entry.listen for entry in config.upstreams] == [("127.0.0.1", 9191)]


# -- hand-registered connect-proxy services ---------------------------------------------------------


def registered(**overrides: Any) -> dict[str, Any]:
    """``GET /v1/agent/service/db-proxy`` of a ``kind: connect-proxy`` registration (1.3+)."""
    data: dict[str, Any] = {
        "Kind": "connect-proxy",
        "ID": "db-proxy",
        "Service": "db-proxy",
        "Address": "10.0.0.7",
        "Port": 21005,
        "Proxy": {
            "DestinationServiceName": "db",
            "DestinationServiceID": "db",
            "LocalServiceAddress": "127.0.0.2",
            "LocalServicePort": 5432,
            "Config": {"handshake_timeout_ms": "1500"},
            "Upstreams": [upstream(DestinationName="cache", LocalBindPort=9300)],
        },
    }
    data.update(overrides)
    return data


def test_a_registered_connect_proxy_service_is_read_field_by_field() -> None:
    config = from_service(registered())
    assert config.proxy_id == "db-proxy"
    assert config.service == "db"
    assert config.listen == ("10.0.0.7", 21005)
    assert config.local_service == ("127.0.0.2", 5432)
    assert config.handshake_timeout_ms == 1500
    assert config.local_connect_timeout_ms == DEFAULT_LOCAL_CONNECT_TIMEOUT_MS
    assert [entry.destination_name for entry in config.upstreams] == ["cache"]


def test_a_registered_proxy_in_the_1_3_shape_names_its_destination_with_proxy_destination() -> None:
    config = from_service(registered(Proxy={"LocalServicePort": 5432}, ProxyDestination="db"))
    assert config.service == "db"
    assert config.local_service == ("127.0.0.1", 5432)  # address defaults to loopback


def test_a_registered_proxy_without_a_local_port_has_no_local_service() -> None:
    config = from_service(registered(Proxy={"DestinationServiceName": "db"}, Address="", Port=None))
    assert config.local_service is None
    assert config.listen == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    ("service", "message"),
    [
        (registered(Kind=""), "not a connect-proxy"),
        (registered(Proxy={"LocalServicePort": 5432}), "names no destination"),
    ],
)
def test_a_service_that_cannot_be_proxied_is_refused(service: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_service(service)


# -- split_address ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("app.internal:80", ("app.internal", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("[fe80::1%eth0]:443", ("fe80::1%eth0", 443)),
        (":8080", ("127.0.0.1", 8080)),  # no host: the loopback, never every interface
        ("[]:8080", ("127.0.0.1", 8080)),
    ],
)
def test_split_address_accepts_ipv4_names_and_bracketed_ipv6(text: str, expected: tuple[str, int]) -> None:
    assert split_address(text, "local_service_address") == expected


@pytest.mark.parametrize("text", ["::1", "[::1]", "[::1]8080", "host:", "host:http", "host:65536", ""])
def test_split_address_rejects_what_has_no_valid_port_naming_the_field(text: str) -> None:
    with pytest.raises(ValueError, match=r"local_service_address: expected host:port"):
        split_address(text, "local_service_address")
