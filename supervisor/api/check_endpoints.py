"""The agent's checks: ``/v1/agent/checks``, registering and deregistering checks, TTL
updates, maintenance mode, and the local health of a service
(``/v1/agent/health/service/{id,name}/...``) as load balancers and orchestrators read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from supervisor.api.auth import identify, require_operator
from supervisor.api.catalog_shapes import check_json, instance_json
from supervisor.api.http import HttpError, Request, Response
from supervisor.api.router import READ_METHODS, WRITE_METHODS, Router
from supervisor.api.selection import Selection
from supervisor.catalog.agent_checks import is_maintenance, maintenance_check
from supervisor.catalog.catalog import NotATTLCheck, UnknownCheck
from supervisor.catalog.model import CheckResult, Instance
from supervisor.catalog.status import CheckStatus
from supervisor.config.registrations import build_check
from supervisor.controlplane import ControlPlane
from supervisor.errors import ConfigError

MAINTENANCE = "maintenance"
# Consul's codes for a service's aggregated health: load balancers act on these.
STATUS_CODES = {CheckStatus.PASSING.value: 200, CheckStatus.WARNING.value: 429}
TRUE_WORDS = ("1", "t", "true")  # Go's strconv.ParseBool, case-insensitively
FALSE_WORDS = ("0", "f", "false")


def aggregated_status(checks: list[CheckResult]) -> str:
    """Consul's ``AggregatedStatus``: maintenance, then critical, warning, passing."""
    if any(is_maintenance(check.check_id) for check in checks):
        return MAINTENANCE
    statuses = {check.status for check in checks}
    for status in (CheckStatus.CRITICAL, CheckStatus.WARNING):
        if status in statuses:
            return status.value
    return CheckStatus.PASSING.value


def _agent_check_json(check: CheckResult, node: str) -> dict[str, Any]:
    data = check_json(check, node)
    for key in ("Definition", "CreateIndex", "ModifyIndex"):
        data.pop(key)
    return data


def _wants_text(request: Request) -> bool:
    form = request.arg("format")
    if form:
        return form == "text"
    return request.headers.get("accept", "").startswith("text/plain")


def _enable(request: Request) -> bool:
    value = request.arg("enable")
    if value is None:
        raise HttpError(400, "Missing value for enable")
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise HttpError(400, f"Invalid value for enable: {value!r}")


@dataclass
class CheckEndpoints:
    plane: ControlPlane

    def register(self, router: Router) -> None:
        router.add(READ_METHODS, "/v1/agent/checks", self.checks)
        router.add(WRITE_METHODS, "/v1/agent/check/register", self.register_check)
        router.add(WRITE_METHODS, "/v1/agent/check/deregister/:id", self.deregister_check)
        router.add(WRITE_METHODS, "/v1/agent/check/pass/:id", self.check_pass)
        router.add(WRITE_METHODS, "/v1/agent/check/warn/:id", self.check_warn)
        router.add(WRITE_METHODS, "/v1/agent/check/fail/:id", self.check_fail)
        router.add(WRITE_METHODS, "/v1/agent/check/update/:id", self.check_update)
        router.add(WRITE_METHODS, "/v1/agent/maintenance", self.node_maintenance)
        router.add(WRITE_METHODS, "/v1/agent/service/maintenance/:id", self.service_maintenance)
        router.add(READ_METHODS, "/v1/agent/health/service/id/:id", self.health_by_id)
        router.add(READ_METHODS, "/v1/agent/health/service/name/:name", self.health_by_name)

    def _operator(self, request: Request) -> None:
        view = self.plane.view
        assert view is not None
        require_operator(identify(request, view), view)

    async def checks(self, request: Request) -> Response:
        self._operator(request)
        selection = Selection.of(request)
        catalog = self.plane.catalog
        checks = {check.check_id: check_json(check, catalog.node.name) for check in catalog.local_checks()}
        return Response.json(selection.apply_values(checks))

    # -- registration ------------------------------------------------------------------------

    async def register_check(self, request: Request) -> Response:
        self._operator(request)
        view = self.plane.view
        assert view is not None
        body = request.json()
        try:
            check = build_check(body, "request body", remote_scripts=view.config.enable_script_checks)
        except ConfigError as exc:
            raise HttpError(400, "Invalid check: " + "; ".join(str(p) for p in exc.problems)) from None
        if is_maintenance(check.check_id):
            raise HttpError(400, f"check ID {check.check_id!r} is reserved for maintenance mode")
        self.plane.register_check(check, body)
        return Response()

    async def deregister_check(self, request: Request) -> Response:
        self._operator(request)
        self.plane.deregister_check(request.params["id"])
        return Response()

    # -- TTL updates -------------------------------------------------------------------------

    def _ttl_update(self, request: Request, status: CheckStatus, output: str) -> Response:
        self._operator(request)
        check_id = request.params["id"]
        try:
            self.plane.catalog.update_ttl(check_id, status, output)
        except UnknownCheck:
            raise HttpError(404, f"Unknown check ID {check_id!r}") from None
        except NotATTLCheck as exc:
            raise HttpError(400, str(exc)) from None
        return Response()

    async def check_pass(self, request: Request) -> Response:
        return self._ttl_update(request, CheckStatus.PASSING, request.arg("note") or "")

    async def check_warn(self, request: Request) -> Response:
        return self._ttl_update(request, CheckStatus.WARNING, request.arg("note") or "")

    async def check_fail(self, request: Request) -> Response:
        return self._ttl_update(request, CheckStatus.CRITICAL, request.arg("note") or "")

    async def check_update(self, request: Request) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "Request decode failed: expected a JSON object with Status and Output")
        # Consul's decoding: names match case-insensitively, null is absent, others are skipped.
        fields = {key.lower(): value for key, value in body.items() if value is not None}
        status, output = fields.get("status"), fields.get("output", "")
        if status not in tuple(CheckStatus):
            raise HttpError(400, f"Invalid check status {status!r}: use passing, warning or critical")
        if not isinstance(output, str):
            raise HttpError(400, "Output must be a string")
        return self._ttl_update(request, CheckStatus(status), output)

    # -- maintenance mode --------------------------------------------------------------------

    async def node_maintenance(self, request: Request) -> Response:
        self._operator(request)
        self._maintenance(_enable(request), "", request.arg("reason") or "")
        return Response()

    async def service_maintenance(self, request: Request) -> Response:
        self._operator(request)
        service_id = request.params["id"]
        enable = _enable(request)
        if not self.plane.service_exists(service_id):
            raise HttpError(404, f"No service registered with ID {service_id!r}")
        self._maintenance(enable, service_id, request.arg("reason") or "")
        return Response()

    def _maintenance(self, enable: bool, service_id: str, reason: str) -> None:
        check = maintenance_check(service_id, "", reason)
        plane = self.plane
        if not enable:
            plane.deregister_check(check.check_id)
        elif plane.checks.get(check.check_id) is None:  # enabling twice keeps the first reason
            raw = {"Maintenance": True, "ServiceID": service_id, "Reason": reason}
            plane.register_check(check, raw)

    # -- a service's local health ------------------------------------------------------------

    def _health_of(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        catalog = self.plane.catalog
        node = catalog.node.name
        checks = [check for check in catalog.local_checks() if check.check_id in instance.check_ids]
        checks += [check for check in catalog.local_checks() if check.check_id in catalog.node_check_ids]
        status = aggregated_status(checks)
        service = instance_json(instance)
        return status, {
            "AggregatedStatus": status,
            "Service": service,
            "Checks": [_agent_check_json(check, node) for check in checks],
        }

    async def health_by_id(self, request: Request) -> Response:
        self._operator(request)
        service_id = request.params["id"]
        instance = self.plane.catalog.instances.get(service_id)
        if instance is None:
            if _wants_text(request):
                return Response.text(f"ServiceId {service_id} not found", 404)
            body = {"AggregatedStatus": CheckStatus.CRITICAL.value, "Service": None, "Checks": None}
            return Response.json(body, 404)
        status, data = self._health_of(instance)
        code = STATUS_CODES.get(status, 503)
        if _wants_text(request):
            return Response.text(status, code)
        return Response.json(data, code, {"X-Consul-Reason": status})

    async def health_by_name(self, request: Request) -> Response:
        self._operator(request)
        name = request.params["name"]
        instances = [i for i in self.plane.catalog.instances.values() if i.name == name]
        if not instances:
            reason = f"ServiceName {name} Not Found"
            if _wants_text(request):
                return Response.text(reason, 404)
            return Response.json([], 404, {"X-Consul-Reason": reason})
        results = [self._health_of(instance) for instance in instances]
        code = max(STATUS_CODES.get(status, 503) for status, _ in results)
        status = next(status for status, _ in results if STATUS_CODES.get(status, 503) == code)
        if _wants_text(request):
            return Response.text(status, code)
        return Response.json([data for _, data in results], code, {"X-Consul-Reason": status})
