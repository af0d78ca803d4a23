"""Who is calling and what they may do (``supervisor/api/auth.py``), on real views: the
configuration is parsed by ``supervisor.config`` and the managed proxies planned by
``plan_proxies``, so the proxy tokens are the ones the agent would hand its proxies
(in CONNECT_PROXY_TOKEN).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from supervisor.api.auth import (
    Caller,
    CallerKind,
    identify,
    may_read_service,
    principal_of,
    require_operator,
    require_service_read,
    token_of,
)
from supervisor.api.http import HttpError, Request
from supervisor.config.build import build_config
from supervisor.config.sources import Source
from supervisor.supervision.desired import ENV_PROXY_TOKEN, plan_proxies
from supervisor.supervision.view import AgentView

MASTER = "3f1c-master-token"
API_ADDRESS = "127.0.0.1:8500"
_tokens = itertools.count(1)


def make_request(
    target: str = "/v1/agent/services",
    headers: Mapping[str, str] | None = None,
    remote: str = "127.0.0.1:50000",
) -> Request:
    parts = urlsplit(target)
    return Request(
        method="GET",
        path=unquote(parts.path),
        raw_path=parts.path,
        query=parse_qs(parts.query, keep_blank_values=True),
        headers={name.lower(): value for name, value in (headers or {}).items()},
        body=b"",
        remote=remote,
    )


def managed(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "port": port, "connect": {"proxy": {"command": ["/bin/true"]}}}


def make_view(acl: Mapping[str, Any] | None = None) -> AgentView:
    """A view of an agent with managed proxies for ``web`` and ``api`` and a plain ``db``."""
    document: dict[str, Any] = {
        "node_name": "node-1",
        "services": [managed("web", 8080), managed("api", 9090), {"name": "db", "port": 5432}],
    }
    if acl is not None:
        document["acl"] = dict(acl)
    config = build_config([Source("agent.json", "json", json.dumps(document))], dev=True)
    plan = plan_proxies(
        config, API_ADDRESS, {}, lambda host, port: True, new_token=lambda: f"proxy-token-{next(_tokens)}"
    )
    return AgentView(config=config, node_id="node-id", api_address=API_ADDRESS, proxies=plan.proxies)


def proxy_token(view: AgentView, proxy_id: str) -> str:
    """The token exactly as the proxy finds it in its environment."""
    return dict(view.proxies[proxy_id].spec.env)[ENV_PROXY_TOKEN]


ACL_DENY = {"enabled": True, "default_policy": "deny", "tokens": {"master": MASTER}}
ACL_ALLOW = {"enabled": True, "default_policy": "allow", "tokens": {"master": MASTER}}
# A deny policy without acl.enabled: ACLs are off, the policy does not apply.
ACL_OFF = {"enabled": False, "default_policy": "deny", "tokens": {"master": MASTER}}


# -- where the token comes from -------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/v1/agent/services?token=t0k", {}),
        ("/v1/agent/services", {"X-Consul-Token": "t0k"}),
        ("/v1/agent/services", {"Authorization": "bearer   t0k  "}),
    ],
    ids=["query", "x-consul-token", "bearer"],
)
def test_the_token_is_read_from_each_of_consuls_three_places(target: str, headers: dict[str, str]) -> None:
    assert token_of(make_request(target, headers)) == "t0k"


def test_the_query_token_wins_over_the_header_which_wins_over_bearer() -> None:
    both = {"X-Consul-Token": "header", "Authorization": "Bearer bearer"}
    assert token_of(make_request("/v1/x?token=query", both)) == "query"
    assert token_of(make_request("/v1/x", both)) == "header"
    # Another scheme carries no token.
    assert token_of(make_request(headers={"Authorization": "Basic dXNlcjpwYXNz"})) == ""


# -- who is calling ----------------------------------------------------------------------------


def test_callers_are_told_apart_by_their_token() -> None:
    view = make_view(ACL_DENY)
    assert identify(make_request(), view).kind is CallerKind.ANONYMOUS
    assert identify(make_request(headers={"X-Consul-Token": MASTER}), view).kind is CallerKind.MASTER
    assert identify(make_request(headers={"X-Consul-Token": "made-up"}), view).kind is CallerKind.UNKNOWN
    # Close to the master token is not the master token.
    assert identify(make_request(headers={"X-Consul-Token": MASTER[:-1]}), view).kind is CallerKind.UNKNOWN


def test_a_proxy_token_identifies_that_proxy_and_the_service_it_fronts() -> None:
    view = make_view()
    caller = identify(
        make_request(headers={"Authorization": f"Bearer {proxy_token(view, 'api-proxy')}"}), view
    )
    assert caller == Caller(CallerKind.PROXY, proxy_id="api-proxy", service_id="api", service_name="api")


def test_proxy_tokens_follow_the_current_view() -> None:
    """A reload that replans the proxies hands out new tokens: the old ones stop working."""
    before = make_view()
    old = proxy_token(before, "web-proxy")
    assert identify(make_request(headers={"X-Consul-Token": old}), before).is_proxy
    after = make_view()
    new = proxy_token(after, "web-proxy")
    assert new != old
    assert identify(make_request(headers={"X-Consul-Token": old}), after).kind is CallerKind.UNKNOWN
    assert identify(make_request(headers={"X-Consul-Token": new}), after).proxy_id == "web-proxy"


# -- what they may do --------------------------------------------------------------------------


def caller_of(kind: CallerKind, view: AgentView) -> Caller:
    headers = {
        CallerKind.ANONYMOUS: {},
        CallerKind.MASTER: {"X-Consul-Token": MASTER},
        CallerKind.PROXY: {"X-Consul-Token": proxy_token(view, "web-proxy")},
        CallerKind.UNKNOWN: {"X-Consul-Token": "not-a-token-of-this-agent"},
    }[kind]
    caller = identify(make_request(headers=headers), view)
    assert caller.kind is kind
    return caller


def allowed(check: Any, *args: Any) -> bool:
    """Whether ``check(*args)`` lets the call through; a refusal is always a plain 403."""
    try:
        check(*args)
    except HttpError as exc:
        assert (exc.status, exc.message) == (403, "Permission denied")
        return False
    return True


@pytest.mark.parametrize(
    ("acl", "expected"),
    [
        (None, {CallerKind.ANONYMOUS: True, CallerKind.UNKNOWN: True, CallerKind.PROXY: False}),
        (ACL_OFF, {CallerKind.ANONYMOUS: True, CallerKind.MASTER: True, CallerKind.UNKNOWN: True}),
        (ACL_ALLOW, {CallerKind.ANONYMOUS: True, CallerKind.MASTER: True, CallerKind.UNKNOWN: True}),
        (ACL_DENY, {CallerKind.ANONYMOUS: False, CallerKind.MASTER: True, CallerKind.UNKNOWN: False}),
    ],
    ids=["no-acl-block", "acl-disabled-deny", "acl-enabled-allow", "acl-enabled-deny"],
)
def test_operator_calls_by_acl_settings(
    acl: Mapping[str, Any] | None, expected: dict[CallerKind, bool]
) -> None:
    view = make_view(acl)
    expected = {CallerKind.PROXY: False, **expected}  # a proxy token is never an operator's
    got = {kind: allowed(require_operator, caller_of(kind, view), view) for kind in expected}
    assert got == expected


def test_a_proxy_reads_its_own_service_and_proxy_registration_only_even_without_acls() -> None:
    view = make_view()
    web_proxy = caller_of(CallerKind.PROXY, view)
    for service_id, name in [("web", "web"), ("web-proxy", "web-proxy")]:
        assert allowed(require_service_read, web_proxy, view, service_id, name)
        assert may_read_service(web_proxy, view, service_id, name)
    for service_id, name in [("api", "api"), ("api-proxy", "api-proxy"), ("db", "db")]:
        assert not allowed(require_service_read, web_proxy, view, service_id, name)
        assert not may_read_service(web_proxy, view, service_id, name)


def test_other_callers_read_a_service_under_the_operator_rules() -> None:
    view = make_view(ACL_DENY)
    anonymous, master = caller_of(CallerKind.ANONYMOUS, view), caller_of(CallerKind.MASTER, view)
    assert not may_read_service(anonymous, view, "db", "db")
    assert may_read_service(master, view, "db", "db")
    open_view = make_view()
    assert may_read_service(caller_of(CallerKind.ANONYMOUS, open_view), open_view, "db", "db")


# -- whom a connection counts against -----------------------------------------------------------


def test_principal_is_the_proxy_the_address_or_nobody_for_the_master() -> None:
    view = make_view(ACL_ALLOW)
    token = proxy_token(view, "api-proxy")
    assert principal_of(make_request(headers={"X-Consul-Token": token}), view) == "proxy:api-proxy"
    assert principal_of(make_request(headers={"X-Consul-Token": MASTER}), view) is None
    assert principal_of(make_request(remote="10.0.0.7:41000"), view) == "addr:10.0.0.7"
    assert (
        principal_of(make_request(headers={"X-Consul-Token": "bogus"}, remote="[::1]:41000"), view)
        == "addr:::1"
    )
