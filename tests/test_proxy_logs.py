"""Proxy log rotation by the agent: copy-then-truncate under a live O_APPEND writer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.errors import ConfigError
from supervisor.ops.proxylogs import RotationPolicy, rotate, rotate_due
from tests.helpers.agent import AgentProcess, fake_proxy
from tests.helpers.processes import wait_until

# Writes "n\n" for n = 0, 1, 2 … through an O_APPEND descriptor, exactly as a proxy
# writes into the file the agent opened for it, until killed.
WRITER = textwrap.dedent(
    """
    import os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    n = 0
    while True:
        os.write(fd, b"%d\\n" % n)
        n += 1
    """
)


def numbers(*paths: Path) -> tuple[list[int], int]:
    """The numbers in these files, oldest file first, and how many files end in a torn line.

    A write that was in progress when a copy made its last read can be cut (its end is
    in the part that is truncated away). Only the last line of a file may be torn.
    """
    found: list[int] = []
    torn = 0
    for path in paths:
        if path.exists():
            lines = path.read_text().split("\n")
            if lines[-1]:
                torn += 1
            found.extend(int(line) for line in lines[:-1])
    return found, torn


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "web-proxy-stdout.log"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(log)], start_new_session=True)
    try:
        wait_until(lambda: log.exists() and log.stat().st_size > 100_000, timeout=10)
        yield log
    finally:
        process.kill()
        process.wait(10)


def test_rotation_under_a_fast_writer_keeps_order_and_loses_at_most_the_window(writer: Path) -> None:
    rotations = 20
    rotating = 0.0  # seconds spent inside rotate(): the only time lines can be lost
    began = time.monotonic()
    for _ in range(rotations):
        wait_until(lambda: writer.stat().st_size > 50_000, timeout=10)
        started = time.monotonic()
        rotate(str(writer), max_files=rotations + 1)
        rotating += time.monotonic() - started
    elapsed = time.monotonic() - began
    kept = [writer.with_name(f"{writer.name}.{index}") for index in range(rotations, 0, -1)]
    seen, torn = numbers(*kept, writer)
    assert seen == sorted(set(seen)), "rotation duplicated or reordered lines"
    assert torn <= rotations + 1
    missing = seen[-1] - seen[0] + 1 - len(seen)
    # The writer does nothing but write (hundreds of thousands of lines a second). What a
    # copy-then-truncate can lose is what the writer wrote between the copy's last read and
    # the truncate -- a sliver of each rotate() call: a few lines on an idle machine. On a
    # loaded one that sliver stretches with preemption, so the bound is what was written
    # while rotate() ran at all (at the writer's measured rate), never more.
    rate = (seen[-1] - seen[0]) / elapsed
    assert missing <= max(rotations * 50, rate * rotating), f"{missing} lines lost in {rotations} rotations"
    assert len(seen) > rotations * 10_000  # (no duplicates above: each truncate really emptied it)


def test_rotate_shifts_copies_and_keeps_at_most_max_files(tmp_path: Path) -> None:
    log = tmp_path / "db-proxy-stderr.log"
    for generation in range(5):
        log.write_text(f"generation {generation}\n")
        rotate(str(log), max_files=3)
    assert log.read_text() == ""
    assert [(tmp_path / f"{log.name}.{i}").read_text() for i in (1, 2, 3)] == [
        "generation 4\n",
        "generation 3\n",
        "generation 2\n",
    ]
    assert not (tmp_path / f"{log.name}.4").exists()
    assert not list(tmp_path.glob("*.tmp"))
    log.write_text("dropped\n")
    assert rotate(str(log), max_files=0) == len("dropped\n")
    assert log.read_text() == "" and (tmp_path / f"{log.name}.1").read_text() == "generation 4\n"


def test_rotate_due_picks_only_oversized_proxy_logs(tmp_path: Path) -> None:
    big, small = tmp_path / "a-proxy-stdout.log", tmp_path / "b-proxy-stdout.log"
    other = tmp_path / "notes.txt"
    for path, size in ((big, 2000), (small, 10), (other, 5000)):
        path.write_bytes(b"x" * size)
    (tmp_path / "link-proxy-stdout.log").symlink_to(other)
    rotated = rotate_due(str(tmp_path), RotationPolicy(max_bytes=1000, max_files=2))
    assert rotated == [(str(big), 2000)]
    assert other.stat().st_size == 5000 and small.stat().st_size == 10
    assert rotate_due(str(tmp_path), RotationPolicy(max_bytes=0, max_files=2)) == []  # off
    assert rotate_due(str(tmp_path / "missing"), RotationPolicy(1, 1)) == []


def test_a_failed_copy_leaves_the_live_file_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "a-proxy-stdout.log"
    log.write_bytes(b"precious\n" * 1000)
    (tmp_path / f"{log.name}.1.tmp").mkdir()  # the copy cannot be created
    assert rotate_due(str(tmp_path), RotationPolicy(max_bytes=100, max_files=2)) == []
    assert log.read_bytes() == b"precious\n" * 1000
    assert f"cannot rotate {log}" in caplog.text


def test_log_rotation_settings_are_validated(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(
        '{"data_dir": "/d", "connect": {"proxy": {"log_max_bytes": "64MiB", "log_max_files": 3}}}'
    )
    config = load_config([str(good)], [])
    assert (config.proxy_log_max_bytes, config.proxy_log_max_files) == (64 * 1024 * 1024, 3)
    defaults = load_config([], [], {"data_dir": "/d"})
    assert defaults.proxy_log_max_bytes == 10 * 1024 * 1024 and defaults.proxy_log_max_files == 5
    bad = tmp_path / "bad.json"
    bad.write_text('{"data_dir": "/d", "connect": {"proxy": {"log_max_bytes": "ten megs"}}}')
    with pytest.raises(ConfigError) as raised:
        load_config([str(bad)], [])
    assert "bad.json: connect.proxy.log_max_bytes" in str(raised.value)


@pytest.mark.slow
def test_agent_rotates_logs_of_its_own_and_of_adopted_proxies(tmp_path: Path) -> None:
    agent = AgentProcess(
        tmp_path,
        extra={"connect": {"proxy": {"allow_managed_root": True, "log_max_bytes": 400, "log_max_files": 3}}},
    )
    command = fake_proxy("tick", tmp_path / "web.state")
    agent.write("web.json", {"service": {"name": "web", "connect": {"proxy": {"command": command}}}})
    logs = agent.data_dir / "proxy" / "logs"  # type: ignore[operator]
    live = logs / "web-proxy-stdout.log"
    copies = [logs / f"web-proxy-stdout.log.{index}" for index in (3, 2, 1)]
    try:
        agent.start()
        pid = agent.wait_state("web-proxy", "running")["Pid"]
        wait_until(copies[-1].exists, timeout=20, message="the first rotation")
        # The copy exists a moment before the agent's line about it is written.
        wait_until(
            lambda: f"rotated {live}" in agent.current_log(), timeout=5, message="the rotation's log line"
        )

        agent.kill9()  # the next agent adopts the proxy and must rotate the file it still writes
        agent.start()
        assert agent.proxies()["web-proxy"]["Pid"] == pid
        # (a rotation renames .1 to .2 before it writes .1 again: the copy can be missing a moment)
        first_copy = _read(copies[-1])
        wait_until(
            lambda: _read(copies[-1]) not in ("", first_copy), timeout=20, message="a rotation after adoption"
        )
        assert agent.proxies()["web-proxy"]["Pid"] == pid  # rotation never restarts a proxy
        wait_until(lambda: live.stat().st_size > 0, timeout=5, message="the proxy to keep writing")

        ticks = [
            int(m) for m in re.findall(r"^tick (\d+)$", "".join(_read(p) for p in [*copies, live]), re.M)
        ]
        assert ticks == sorted(set(ticks))
        # At 20 lines a second the copy-then-truncate window practically never costs a line;
        # allow one per rotation (three copies kept) rather than trusting luck.
        assert ticks[-1] - ticks[0] + 1 - len(ticks) <= 3
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in [*copies, live] if p.exists())
    finally:
        agent.kill_everything()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_rotated_copies_are_private(tmp_path: Path) -> None:
    log = tmp_path / "a-proxy-stdout.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"secret-ish output\n")
    os.close(fd)
    rotate(str(log), max_files=1)
    assert (tmp_path / f"{log.name}.1").stat().st_mode & 0o777 == 0o600
