"""The API registrations store (``supervisor/catalog/registry.py``): services registered
through the agent API, kept as one 0600 file each in data_dir and rebuilt through config
validation on start; a damaged file is set aside, never fatal."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from supervisor.catalog.registry import SOURCE, Registry
from supervisor.config.model import AgentConfig, ProxyDefaults, ServiceDef
from supervisor.config.registrations import build_service, registration_builder
from supervisor.errors import DataDirError

DEFAULTS = ProxyDefaults()
BUILD = registration_builder(AgentConfig(data_dir=None))


def registration(raw: dict[str, Any]) -> tuple[ServiceDef, dict[str, Any]]:
    return build_service(raw, SOURCE, DEFAULTS), raw


def test_a_registration_is_saved_privately_and_rebuilt_identically(tmp_path: Path) -> None:
    directory = tmp_path / "services"
    registry = Registry(str(directory))
    service, raw = registration(
        {"ID": "web-1", "Name": "web", "Port": 80, "Tags": ["v1"], "Check": {"TTL": "10s"}}
    )
    registry.register(service, raw)
    path = directory / "web-1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"Version": 1, "Service": raw}
    again = Registry(str(directory))
    again.load(BUILD)
    assert again.services == (service,)


def test_registering_an_id_again_replaces_it(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    registry.register(*registration({"ID": "web-1", "Name": "web", "Port": 80}))
    registry.register(*registration({"ID": "web-1", "Name": "web", "Port": 81}))
    assert [(s.id, s.port) for s in registry.services] == [("web-1", 81)]


def test_deregistering_removes_the_file_and_reports_unknown_ids(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    registry.register(*registration({"Name": "web"}))
    assert registry.deregister("web") is True
    assert not (tmp_path / "web.json").exists()
    assert registry.get("web") is None and registry.services == ()
    assert registry.deregister("web") is False


def test_a_damaged_file_is_moved_aside_and_the_rest_still_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Registry(str(tmp_path)).register(*registration({"Name": "good"}))
    (tmp_path / "torn.json").write_text('{"Version": 1, "Service": {"Na')
    (tmp_path / "invalid.json").write_text(json.dumps({"Version": 1, "Service": {"Name": "../x"}}))
    (tmp_path / "future.json").write_text(json.dumps({"Version": 9, "Service": {"Name": "later"}}))
    (tmp_path / ".tmp-abc-good.json").write_text("half-written by a crash")
    registry = Registry(str(tmp_path))
    with caplog.at_level(logging.ERROR, logger="supervisor.registry"):
        registry.load(BUILD)
    assert [service.id for service in registry.services] == ["good"]
    names = sorted(path.name for path in tmp_path.iterdir())
    assert "good.json" in names
    # each damaged file is kept (renamed) for the operator, and the temp file is gone
    assert len([name for name in names if ".json.corrupt-" in name]) == 3
    assert not any(name.startswith(".tmp-") for name in names)
    for name in ("torn.json", "invalid.json", "future.json"):
        assert f"{name} is unusable" in caplog.text


def test_a_registration_that_cannot_be_saved_is_refused_and_not_kept(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    registry = Registry(str(blocked))
    with pytest.raises(DataDirError, match="cannot save the registration of web"):
        registry.register(*registration({"Name": "web"}))
    assert registry.services == ()


def test_save_all_restores_every_registration_after_data_dir_was_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "services"
    registry = Registry(str(directory))
    registry.register(*registration({"Name": "web"}))
    registry.register(*registration({"Name": "db"}))
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    registry.save_all()
    again = Registry(str(directory))
    again.load(BUILD)
    assert sorted(service.id for service in again.services) == ["db", "web"]


def test_without_a_data_dir_registrations_live_in_memory_only() -> None:
    registry = Registry(None)
    registry.load(BUILD)
    registry.register(*registration({"Name": "web"}))
    assert registry.get("web") is not None
    assert registry.deregister("web") is True
    assert registry.services == ()


def test_a_hand_dropped_file_registering_a_taken_id_is_set_aside(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path))
    registry.register(*registration({"Name": "web", "Port": 80}))
    copy = json.loads((tmp_path / "web.json").read_text())
    (tmp_path / "zz-copy.json").write_text(json.dumps(copy))
    (tmp_path / "no-service.json").write_text(json.dumps({"Version": 1}))
    again = Registry(str(tmp_path))
    again.load(BUILD)
    assert [s.id for s in again.services] == ["web"]
    aside = sorted(p.name.split(".corrupt-")[0] for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert aside == ["no-service.json", "zz-copy.json"]
