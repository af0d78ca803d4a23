"""The agent's own log: levels, JSON lines, a file that logrotate may move, size rotation."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.logsetup import ROOT, configure_logging

log = logging.getLogger("supervisor.test")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    logger = logging.getLogger(ROOT)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def test_json_lines_and_level(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    configure_logging("warn", json_lines=True, log_file=str(path))
    log.info("hidden")
    log.warning("shown %d", 1)
    (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert entry["@level"] == "warn" and entry["@message"] == "shown 1" and entry["@module"] == "test"


def test_a_log_file_moved_away_by_logrotate_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    configure_logging("INFO", log_file=str(path))
    log.info("before")
    os.rename(path, tmp_path / "agent.log.1")  # logrotate's default (create) method
    log.info("after")
    assert "before" in (tmp_path / "agent.log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()


def test_size_rotation_keeps_max_files(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    configure_logging("INFO", log_file=str(path), rotate_bytes=2000, rotate_max_files=2)
    for index in range(200):
        log.info("line %03d %s", index, "x" * 40)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["agent.log", "agent.log.1", "agent.log.2"]
    assert "line 199" in path.read_text()
    assert all(p.stat().st_size <= 2100 for p in tmp_path.iterdir())


def test_size_rotation_with_zero_max_files_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    configure_logging("INFO", log_file=str(path), rotate_bytes=1000, rotate_max_files=0)
    for index in range(100):
        log.info("line %03d %s", index, "x" * 40)
    kept = "".join(p.read_text() for p in sorted(tmp_path.iterdir()))
    assert all(f"line {index:03d}" in kept for index in range(100))  # Consul's 0: nothing deleted
    assert len(list(tmp_path.iterdir())) > 3


@pytest.mark.parametrize("rotate_bytes, max_files", [(0, 0), (100, 2), (100, 0)])
def test_the_agent_log_file_is_private(tmp_path: Path, rotate_bytes: int, max_files: int) -> None:
    path = tmp_path / "agent.log"
    configure_logging("INFO", log_file=str(path), rotate_bytes=rotate_bytes, rotate_max_files=max_files)
    logger = logging.getLogger(f"{ROOT}.test")
    for number in range(20):  # past the rotation size, when there is one
        logger.info("line %d of the agent's log, long enough to rotate", number)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("agent.log")]
    assert files and all(oct(p.stat().st_mode & 0o777) == oct(0o600) for p in files), files
