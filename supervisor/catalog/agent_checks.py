"""Checks registered through ``PUT /v1/agent/check/register`` and the maintenance-mode
checks, persisted in ``data_dir/checks/`` so they survive a restart (as in Consul).

Each is kept as the client's definition and rebuilt through the same validation at
start-up; a file that cannot be used is moved aside with a message, never stopping the
agent. File names are a digest of the check ID: IDs such as ``service:web`` or
``_service_maintenance:web`` are not safe file names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from supervisor.catalog.status import CheckKind
from supervisor.config.model import CheckDef
from supervisor.config.registrations import build_check
from supervisor.errors import ConfigError, DataDirError
from supervisor.state.atomic import remove_stale_temp_files
from supervisor.state.documents import load_document, save_document

log = logging.getLogger("supervisor.checks")
SOURCE = "<api check registration>"
VERSION = 1

NODE_MAINTENANCE = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
NODE_MAINTENANCE_NOTE = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
SERVICE_MAINTENANCE_NOTE = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)


def maintenance_check(service_id: str, service_name: str, reason: str) -> CheckDef:
    """Consul's maintenance check: critical while set (the node's, or ``service_id``'s)."""
    if not service_id:
        return CheckDef(
            NODE_MAINTENANCE,
            "Node Maintenance Mode",
            CheckKind.MAINTENANCE,
            notes=reason or NODE_MAINTENANCE_NOTE,
        )
    return CheckDef(
        SERVICE_MAINTENANCE_PREFIX + service_id,
        "Service Maintenance Mode",
        CheckKind.MAINTENANCE,
        notes=reason or SERVICE_MAINTENANCE_NOTE,
        service_id=service_id,
    )


def is_maintenance(check_id: str) -> bool:
    return check_id == NODE_MAINTENANCE or check_id.startswith(SERVICE_MAINTENANCE_PREFIX)


class AgentChecks:
    """The registered checks by ID; ``checks`` is replaced on every change (readers on the
    API's loop take the current tuple)."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.checks: tuple[CheckDef, ...] = ()
        self._raw: dict[str, Any] = {}

    def load(self, *, remote_scripts: bool) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        remove_stale_temp_files(self.directory)
        loaded = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.directory, name)
            try:
                document = load_document(path, VERSION, "it is moved aside")
                if document is None:
                    continue
                raw = document["Check"]
                check = self._build(raw, remote_scripts)
            except (DataDirError, KeyError, TypeError, ValueError, ConfigError) as exc:
                aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
                os.replace(path, aside)
                log.error("registered check file %s is unusable (%s); moved it to %s", path, exc, aside)
                continue
            loaded.append(check)
            self._raw[check.check_id] = raw
        self.checks = tuple(loaded)

    def get(self, check_id: str) -> CheckDef | None:
        return next((check for check in self.checks if check.check_id == check_id), None)

    def register(self, check: CheckDef, raw: Any) -> None:
        """Add or replace ``check`` (saved first: a check that cannot be saved is not kept)."""
        self._persist(check.check_id, raw)
        self._raw[check.check_id] = raw
        self.checks = (*(c for c in self.checks if c.check_id != check.check_id), check)

    def deregister(self, check_id: str) -> bool:
        if self.get(check_id) is None:
            return False
        if self.directory is not None:
            try:
                os.unlink(self._path(check_id))
            except FileNotFoundError:
                pass
        self._raw.pop(check_id, None)
        self.checks = tuple(check for check in self.checks if check.check_id != check_id)
        return True

    def drop_service(self, service_id: str) -> list[str]:
        """A deregistered service takes its checks with it; returns their IDs."""
        gone = [check.check_id for check in self.checks if check.service_id == service_id]
        for check_id in gone:
            self.deregister(check_id)
        return gone

    def keep_only(self, service_ids: Iterable[str]) -> None:
        """Drop the checks of services that no longer exist (after a reload)."""
        known = set(service_ids)
        for check in list(self.checks):
            if check.service_id and check.service_id not in known:
                log.info(
                    "check %s: service %s is gone; deregistered it too", check.check_id, check.service_id
                )
                self.deregister(check.check_id)

    def save_all(self) -> None:
        """Write every registration again (data_dir was deleted under the running agent)."""
        for check_id, raw in self._raw.items():
            self._persist(check_id, raw)

    def _build(self, raw: Any, remote_scripts: bool) -> CheckDef:
        if isinstance(raw, dict) and raw.get("Maintenance") is True:
            return maintenance_check(str(raw.get("ServiceID", "")), "", str(raw.get("Reason", "")))
        return build_check(raw, SOURCE, remote_scripts=remote_scripts)

    def _path(self, check_id: str) -> str:
        assert self.directory is not None
        digest = hashlib.sha256(check_id.encode()).hexdigest()[:32]
        return os.path.join(self.directory, f"{digest}.json")

    def _persist(self, check_id: str, raw: Any) -> None:
        if self.directory is None:
            return
        try:
            save_document(self._path(check_id), VERSION, {"Check": raw}, compact=True)
        except DataDirError as exc:
            raise DataDirError(f"cannot save the registration of check {check_id}: {exc}") from exc
