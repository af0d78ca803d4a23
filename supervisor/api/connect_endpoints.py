"""Connect endpoints: CA roots, leaf certificates, and authorization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import Caller, identify, require_operator
from supervisor.api.blocking import block_until_changed
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.router import READ_METHODS, WRITE_METHODS, Router
from supervisor.config.durations import format_duration
from supervisor.config.keys import check_safe_id
from supervisor.config.schema import Context, Invalid, Obj, Str
from supervisor.connect.spiffe import InvalidSpiffeID, parse_service
from supervisor.controlplane import ControlPlane

AUTHORIZE = Obj({"target": Str(), "client_cert_uri": Str(), "client_cert_serial": Str()})


def valid_service_name(name: str) -> str:
    try:
        return check_safe_id(name, "", Context(""))
    except Invalid as exc:
        raise HttpError(400, f"Invalid service name: {exc}") from None


@dataclass
class ConnectEndpoints:
    plane: ControlPlane

    def register(self, router: Router) -> None:
        router.add(READ_METHODS, "/v1/agent/connect/ca/roots", self.roots)
        router.add(READ_METHODS, "/v1/connect/ca/roots", self.roots)
        router.add(("GET", "HEAD", "PUT", "POST"), "/v1/connect/ca/configuration", self.ca_configuration)
        router.add(READ_METHODS, "/v1/agent/connect/ca/leaf/:service", self.leaf)
        router.add(WRITE_METHODS, "/v1/agent/connect/authorize", self.authorize)

    def _view(self) -> Any:
        assert self.plane.view is not None
        return self.plane.view

    async def ca_configuration(self, request: Request) -> Response:
        """``GET /v1/connect/ca/configuration``: the built-in provider and its settings (the
        private key is never shown, as Consul shows it "hidden")."""
        view = self._view()
        require_operator(identify(request, view), view)
        if request.method not in ("GET", "HEAD"):
            raise HttpError(
                405,
                "the CA is configured in connect.ca_config of the agent's config files: "
                "edit it there and reload",
                {"Allow": "OPTIONS,GET,HEAD"},
            )
        ca = self.plane.authority
        ca_config = view.config.ca
        config: dict[str, Any] = {
            "LeafCertTTL": format_duration(ca_config.leaf_cert_ttl),
            "RotationPeriod": "2160h",
        }
        if ca_config.private_key:
            config.update({"PrivateKey": "hidden", "RootCert": ca_config.root_cert})
        index = ca.roots_index
        body = {"Provider": "consul", "Config": config, "CreateIndex": index, "ModifyIndex": index}
        return Response.json(body, headers={"X-Consul-Index": str(index)})

    async def roots(self, request: Request) -> Response:
        ca = self.plane.authority
        data = await block_until_changed(
            request,
            self.plane.changes,
            lambda: (ca.roots_json(), ca.roots_index),
            lambda r: r[1],
            param="index",
        )
        return Response.json(data[0], headers={"X-Consul-Index": str(data[1])})

    def _authorize_leaf(self, request: Request, service: str) -> None:
        # Apart from the handler so that the held blocking query below pins no AgentView.
        view = self._view()
        caller = identify(request, view)
        if caller.is_proxy:
            if caller.service_name != service:
                raise HttpError(403, "Permission denied: a proxy token may only fetch its own service's leaf")
        else:
            require_operator(caller, view)

    async def leaf(self, request: Request) -> Response:
        service = valid_service_name(request.params["service"])
        self._authorize_leaf(request, service)
        leaves = self.plane.leaves
        assert leaves is not None
        await leaves.ensure(service)

        def compute() -> tuple[dict[str, Any], int]:
            leaf = leaves.get(service)
            return leaf.to_json(), leaf.modify_index

        data = await block_until_changed(request, self.plane.changes, compute, lambda r: r[1], param="index")
        return Response.json(data[0], headers={"X-Consul-Index": str(data[1])})

    async def authorize(self, request: Request) -> Response:
        view = self._view()
        body = request.json()
        ctx = Context("request body", from_client=True)
        params = AUTHORIZE.validate(body, "", ctx)
        if ctx.problems:
            raise HttpError(400, "Request decode failed: " + "; ".join(str(p) for p in ctx.problems))
        target = params.get("target", "")
        if not target:
            raise HttpError(400, "Target service must be specified")
        uri = params.get("client_cert_uri", "")
        try:
            client = parse_service(uri)
        except InvalidSpiffeID:
            raise HttpError(400, "ClientCertURI not a valid Connect identifier") from None
        caller = identify(request, view)
        self._require_authorize(caller, view, target)
        ca = self.plane.authority
        if client.trust_domain not in ca.trust_domains:
            return Response.json(
                {
                    "Authorized": False,
                    "Reason": f"Identity from an external trust domain: {client.trust_domain}",
                }
            )
        acl = view.config.acl
        allowed, reason = self.plane.intentions.decide(
            client.service, target, default_allow=acl.default_policy == "allow", acls_enabled=acl.enabled
        )
        return Response.json({"Authorized": allowed, "Reason": reason})

    @staticmethod
    def _require_authorize(caller: Caller, view: Any, target: str) -> None:
        if caller.is_proxy:
            if caller.service_name != target:
                raise HttpError(
                    403, "Permission denied: a proxy token may only authorize for its own service"
                )
            return
        require_operator(caller, view)
