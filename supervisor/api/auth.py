"""Who is calling, and what they may do.

Tokens come from ``X-Consul-Token``, ``?token=`` or ``Authorization: Bearer`` (Consul's
three places). A proxy's token (CONNECT_PROXY_TOKEN) grants read-only Connect access to
its own service only -- even without ACLs, presenting a proxy token restricts the caller
to that proxy's scope. Without ``acl.enabled``, other callers on the API are trusted as
in Consul; with it, operator calls need the master token unless the default policy is
``allow``. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

from supervisor.api.http import HttpError, Request
from supervisor.supervision.view import AgentView


class CallerKind(Enum):
    ANONYMOUS = "anonymous"  # no token at all
    MASTER = "master"  # acl.master_token
    PROXY = "proxy"  # one managed proxy's CONNECT_PROXY_TOKEN
    UNKNOWN = "unknown"  # a token the agent does not know


@dataclass(frozen=True)
class Caller:
    kind: CallerKind
    proxy_id: str = ""
    service_id: str = ""
    service_name: str = ""

    @property
    def is_proxy(self) -> bool:
        return self.kind is CallerKind.PROXY

    @property
    def is_master(self) -> bool:
        return self.kind is CallerKind.MASTER


def token_of(request: Request) -> str:
    token = request.arg("token") or request.headers.get("x-consul-token", "")
    if not token:
        authorization = request.headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


_tokens: tuple[AgentView | None, dict[bytes, Caller]] = (None, {})


def _proxy_tokens(view: AgentView) -> dict[bytes, Caller]:
    """Proxies by the digest of their token, worked out once per view. Looking up the
    digest, not the token, tells a timing observer nothing about the token itself."""
    global _tokens
    known, index = _tokens
    if known is not view:
        index = {
            _digest(planned.spec.token): Caller(
                CallerKind.PROXY,
                proxy_id=proxy_id,
                service_id=planned.service.id,
                service_name=planned.service.name,
            )
            for proxy_id, planned in view.proxies.items()
        }
        _tokens = (view, index)
    return index


def identify(request: Request, view: AgentView) -> Caller:
    memo = request.memo.get("caller")
    if isinstance(memo, Caller):
        return memo
    caller = _identify(request, view)
    request.memo["caller"] = caller
    return caller


def _identify(request: Request, view: AgentView) -> Caller:
    token = token_of(request)
    if not token:
        return Caller(CallerKind.ANONYMOUS)
    master = view.config.acl.master_token
    if master and hmac.compare_digest(token.encode(), master.encode()):
        return Caller(CallerKind.MASTER)
    return _proxy_tokens(view).get(_digest(token)) or Caller(CallerKind.UNKNOWN)


def principal_of(request: Request, view: AgentView) -> str | None:
    """Who a request's connection counts against for the connection limits: a proxy by
    its token, everyone else by address; the master token is never limited (None)."""
    caller = identify(request, view)
    if caller.is_master:
        return None
    if caller.is_proxy:
        return f"proxy:{caller.proxy_id}"
    return f"addr:{request.remote_host}"


def _denied() -> HttpError:
    return HttpError(403, "Permission denied")


def require_operator(caller: Caller, view: AgentView) -> None:
    """Calls that change or reveal the agent itself (reload, leave, supervision state)."""
    if caller.is_master:
        return
    if caller.is_proxy:
        raise _denied()
    acl = view.config.acl
    if acl.enabled and acl.default_policy == "deny":
        raise _denied()


def require_service_read(caller: Caller, view: AgentView, service_id: str, service_name: str) -> None:
    """Reading one service's registration (or its managed proxy's configuration)."""
    if caller.is_proxy:
        if service_name in (caller.service_name, f"{caller.service_name}-proxy") or service_id in (
            caller.service_id,
            caller.proxy_id,
        ):
            return
        raise _denied()
    require_operator(caller, view)


def may_read_service(caller: Caller, view: AgentView, service_id: str, service_name: str) -> bool:
    try:
        require_service_read(caller, view, service_id, service_name)
    except HttpError:
        return False
    return True
