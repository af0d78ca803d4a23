"""Services registered through ``PUT /v1/agent/service/register``, persisted in data_dir.

Each registration is kept as the cleaned definition in ``data_dir/services/<id>.json``
(0600: registrations may carry tokens) and rebuilt through the same validation as config
files when the agent starts. A corrupt file is moved aside with a message; it never
stops the agent (Consul refused to start on a stray temp file: B13).

``services`` is an immutable tuple replaced on every change, so the supervision thread
can read it without locks. A registration with a ``sidecar_service`` is one file and two
services, the sidecar right after its parent; deregistering the parent removes both.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from supervisor.config.model import ServiceDef
from supervisor.config.schema import find_key
from supervisor.errors import ConfigError, DataDirError
from supervisor.state.atomic import remove_stale_temp_files
from supervisor.state.documents import load_document, save_document

log = logging.getLogger("supervisor.registry")
SOURCE = "<api registration>"
VERSION = 1

Build = Callable[[Any, str], tuple[ServiceDef, ...]]
"""Builds a kept registration again: (raw definition, source) -> its services."""


class Registry:
    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.services: tuple[ServiceDef, ...] = ()
        self._raw: dict[str, Any] = {}

    def load(self, build: Build) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        remove_stale_temp_files(self.directory)
        services: list[ServiceDef] = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.directory, name)
            try:
                document = load_document(path, VERSION, "it is moved aside")
                if document is None:  # removed since the directory was listed
                    continue
                if not isinstance(document, dict) or "Service" not in document:
                    raise DataDirError("it holds no Service")
                raw = document["Service"]
                built = build(raw, SOURCE)
                taken = {s.id for s in services} & {s.id for s in built}
                if name != f"{built[0].id}.json" or taken:
                    # Not a file this agent wrote: one registration per ID, named after it.
                    raise DataDirError(
                        f"it registers {', '.join(sorted(taken)) or built[0].id} under another name"
                    )
            except (DataDirError, KeyError, TypeError, ConfigError) as exc:
                aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
                os.replace(path, aside)
                log.error("registered service file %s is unusable (%s); moved it to %s", path, exc, aside)
                continue
            services += built
            self._raw[built[0].id] = raw
        self.services = tuple(services)

    def get(self, service_id: str) -> ServiceDef | None:
        return next((service for service in self.services if service.id == service_id), None)

    def register(self, service: ServiceDef | tuple[ServiceDef, ...], raw: Any) -> None:
        """Keep a registration: a service, or a service and its sidecar. Replaces what was
        registered under that ID before (with its sidecar)."""
        group = service if isinstance(service, tuple) else (service,)
        parent_id = group[0].id
        self._persist(parent_id, raw)
        self._raw[parent_id] = raw
        kept = tuple(s for s in self.services if s.id != parent_id and s.sidecar_for != parent_id)
        self.services = kept + group

    def deregister(self, service_id: str) -> bool:
        """Remove a registration with its sidecar, or only a sidecar (as Consul allows):
        the kept definition then loses its ``sidecar_service``."""
        service = self.get(service_id)
        if service is None:
            return False
        if service.sidecar_for and service.sidecar_for in self._raw:
            parent_id = service.sidecar_for
            raw = _without_sidecar(self._raw[parent_id])
            self._persist(parent_id, raw)
            self._raw[parent_id] = raw
            self.services = tuple(s for s in self.services if s.id != service_id)
            return True
        if self.directory is not None:
            try:
                os.unlink(os.path.join(self.directory, f"{service_id}.json"))
            except FileNotFoundError:
                pass
        self._raw.pop(service_id, None)
        self.services = tuple(s for s in self.services if s.id != service_id and s.sidecar_for != service_id)
        return True

    def save_all(self) -> None:
        """Write every registration again (data_dir was deleted under the running agent)."""
        for service_id, raw in self._raw.items():
            self._persist(service_id, raw)

    def rebuild(self, build: Build) -> None:
        """Build every registration again (the agent's rules changed on a reload)."""
        rebuilt: list[ServiceDef] = []
        for parent_id, raw in self._raw.items():
            try:
                rebuilt += build(raw, SOURCE)
            except ConfigError as exc:
                log.error("registered service %s no longer valid: %s", parent_id, exc)
                rebuilt += [s for s in self.services if parent_id in (s.id, s.sidecar_for)]
        self.services = tuple(rebuilt)

    def _persist(self, service_id: str, raw: Any) -> None:
        if self.directory is None:
            return
        path = os.path.join(self.directory, f"{service_id}.json")
        try:
            save_document(path, VERSION, {"Service": raw}, compact=True)
        except DataDirError as exc:
            raise DataDirError(f"cannot save the registration of {service_id}: {exc}") from exc


def _without_sidecar(raw: Any) -> Any:
    copy = dict(raw)
    key = find_key(raw, "connect")
    if key is not None and isinstance(raw[key], dict):
        sidecar = find_key(raw[key], "sidecar_service")
        copy[key] = {k: v for k, v in raw[key].items() if k != sidecar}
    return copy
