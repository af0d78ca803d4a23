"""Services registered through ``PUT /v1/agent/service/register``, persisted in data_dir.

Each registration is kept as the cleaned definition in ``data_dir/services/<id>.json``
(0600: registrations may carry tokens) and rebuilt through the same validation as config
files when the agent starts. A corrupt file is moved aside with a message; it never
stops the agent (Consul refused to start on a stray temp file: B13).

``services`` is an immutable tuple replaced on every change, so the supervision thread
can read it without locks.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from supervisor.config.build import build_service
from supervisor.config.model import ProxyDefaults, ServiceDef
from supervisor.errors import ConfigError, DataDirError
from supervisor.state.atomic import remove_stale_temp_files
from supervisor.state.documents import load_document, save_document

log = logging.getLogger("supervisor.registry")
SOURCE = "<api registration>"
VERSION = 1


class Registry:
    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.services: tuple[ServiceDef, ...] = ()
        self._raw: dict[str, Any] = {}

    def load(self, defaults: ProxyDefaults, *, remote_scripts: bool = False) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        remove_stale_temp_files(self.directory)
        services = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.directory, name)
            try:
                document = load_document(path, VERSION, "it is moved aside")
                if document is None:  # removed since the directory was listed
                    continue
                raw = document["Service"]
                service = build_service(raw, SOURCE, defaults, remote_scripts=remote_scripts)
            except (DataDirError, KeyError, TypeError, ConfigError) as exc:
                aside = f"{path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
                os.replace(path, aside)
                log.error("registered service file %s is unusable (%s); moved it to %s", path, exc, aside)
                continue
            services.append(service)
            self._raw[service.id] = raw
        self.services = tuple(services)

    def get(self, service_id: str) -> ServiceDef | None:
        return next((service for service in self.services if service.id == service_id), None)

    def register(self, service: ServiceDef, raw: Any) -> None:
        self._persist(service.id, raw)
        self._raw[service.id] = raw
        self.services = tuple(s for s in self.services if s.id != service.id) + (service,)

    def deregister(self, service_id: str) -> bool:
        if self.get(service_id) is None:
            return False
        if self.directory is not None:
            try:
                os.unlink(os.path.join(self.directory, f"{service_id}.json"))
            except FileNotFoundError:
                pass
        self._raw.pop(service_id, None)
        self.services = tuple(s for s in self.services if s.id != service_id)
        return True

    def save_all(self) -> None:
        """Write every registration again (data_dir was deleted under the running agent)."""
        for service_id, raw in self._raw.items():
            self._persist(service_id, raw)

    def rebuild(self, defaults: ProxyDefaults, *, remote_scripts: bool = False) -> None:
        """Re-apply proxy_defaults (after a config reload) to the registered services."""
        rebuilt = []
        for service in self.services:
            try:
                rebuilt.append(
                    build_service(self._raw[service.id], SOURCE, defaults, remote_scripts=remote_scripts)
                )
            except ConfigError as exc:
                log.error("registered service %s no longer valid: %s", service.id, exc)
                rebuilt.append(service)
        self.services = tuple(rebuilt)

    def _persist(self, service_id: str, raw: Any) -> None:
        if self.directory is None:
            return
        path = os.path.join(self.directory, f"{service_id}.json")
        try:
            save_document(path, VERSION, {"Service": raw}, compact=True)
        except DataDirError as exc:
            raise DataDirError(f"cannot save the registration of {service_id}: {exc}") from exc
