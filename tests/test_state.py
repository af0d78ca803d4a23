"""Persistence in data_dir: atomic writes, the lock, node ID, records, allocations."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from supervisor.errors import AgentLockedError, DataDirError
from supervisor.state.atomic import atomic_write
from supervisor.state.datadir import Allocation, DataDir, ProxyRecord


def test_atomic_write_replaces_whole_file_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")
    path.chmod(0o644)
    atomic_write(str(path), b"new content", mode=0o600)
    assert path.read_text() == "new content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(str(path), b"new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_data_dir_layout_and_modes(tmp_path: Path) -> None:
    data_dir = DataDir(str(tmp_path / "data"))
    data_dir.prepare()
    for directory in (data_dir.proxy_dir, data_dir.logs_dir, data_dir.pids_dir):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    node_id = data_dir.node_id()
    assert DataDir(data_dir.root).node_id() == node_id  # kept
    assert data_dir.log_paths("web-proxy")[0].endswith("/proxy/logs/web-proxy-stdout.log")


def test_prepare_removes_temp_files_of_interrupted_writes(tmp_path: Path) -> None:
    data_dir = DataDir(str(tmp_path / "data"))
    data_dir.prepare()
    leftover = Path(data_dir.proxy_dir) / ".tmp-abc-snapshot.json"
    leftover.write_text("{half")
    assert data_dir.prepare() == [leftover.name]
    assert not leftover.exists()


def test_only_one_lock_holder(tmp_path: Path) -> None:
    data_dir = DataDir(str(tmp_path / "data"))
    data_dir.prepare()
    lock = data_dir.lock()
    try:
        with pytest.raises(AgentLockedError) as exc:
            DataDir(data_dir.root).lock()
        assert exc.value.holder_pid == os.getpid()
        assert f"PID {os.getpid()}" in str(exc.value)
    finally:
        lock.release()
    DataDir(data_dir.root).lock().release()  # free again


def test_records_round_trip_and_are_versioned(tmp_path: Path) -> None:
    data_dir = DataDir(str(tmp_path / "data"))
    data_dir.prepare()
    record = ProxyRecord("web-proxy", 123, 456, "boot", "hash", 3, 2, ("/bin/p",), 1700000000.0, 1)
    data_dir.save_records({"web-proxy": record})
    assert data_dir.load_records().records == {"web-proxy": record}
    document = json.loads(Path(data_dir.snapshot_path).read_text())
    assert document["Version"] == 2 and document["Proxies"]["web-proxy"]["StartTicks"] == 456
    assert stat.S_IMODE(os.stat(data_dir.snapshot_path).st_mode) == 0o600


def test_consul_snapshot_is_recognised_and_not_adopted(tmp_path: Path) -> None:
    data_dir = DataDir(str(tmp_path / "data"))
    data_dir.prepare()
    consul = {
        "Version": 1,
        "Proxies": {"web-proxy": {"Mode": 1, "Config": {"Pid": 4242, "ProxyID": "web-proxy"}}},
    }
    Path(data_dir.snapshot_path).write_text(json.dumps(consul))
    result = data_dir.load_records()
    assert result.records == {}
    assert result.problem is not None and "written by Consul" in result.problem and "4242" in result.problem


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"Version": 9, "Proxies": {}}', '{"Version": 2, "Proxies": {"a": {}}}']
)
def test_corrupt_records_are_set_aside(tmp_path: Path, content: str) -> None:
    data_dir = DataDir(str(tmp_path / "data"))
    data_dir.prepare()
    Path(data_dir.snapshot_path).write_text(content)
    result = data_dir.load_records()
    assert result.records == {} and result.problem is not None and "moved it to" in result.problem
    assert not Path(data_dir.snapshot_path).exists()
    assert any(name.startswith("snapshot.json.corrupt-") for name in os.listdir(data_dir.proxy_dir))


def test_allocations_round_trip_and_stay_private(tmp_path: Path) -> None:
    data_dir = DataDir(str(tmp_path / "data"))
    data_dir.prepare()
    allocations = {"web-proxy": Allocation("secret-token", 20001, True)}
    data_dir.save_allocations(allocations)
    assert data_dir.load_allocations() == (allocations, None)
    assert stat.S_IMODE(os.stat(data_dir.allocations_path).st_mode) == 0o600


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataDirError, match="cannot create data_dir"):
        DataDir(str(blocker / "data")).prepare()


def test_an_existing_loose_data_dir_is_tightened_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    DataDir(str(root)).prepare()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert any("was mode 0755; tightened it to 0700" in record.getMessage() for record in caplog.records)


def test_proxy_ports_overlapping_the_ephemeral_range_are_warned_about(tmp_path: Path) -> None:
    from supervisor.supervision.ports import ephemeral_overlap

    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    assert ephemeral_overlap(20000, 20255, str(ranges)) is None
    warning = ephemeral_overlap(40000, 40100, str(ranges))
    assert warning is not None and "32768-60999" in warning and "40000-40100" in warning
