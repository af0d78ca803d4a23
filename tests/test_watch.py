"""The config watcher on real directories (inotify through watchdog): the ways a change
can hide -- a re-created config dir, a Kubernetes ``..data`` swap, an edited symlink
target -- are each seen, and ordinary noise is not."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.watch import ConfigWatcher, plan_watches
from tests.helpers.processes import wait_until


class Recorder:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, path: str) -> None:
        with self._lock:
            self.paths.append(path)

    def take(self) -> list[str]:
        with self._lock:
            taken, self.paths = self.paths, []
        return taken

    def wait_for(self, needle: str) -> None:
        wait_until(
            lambda: any(needle in path for path in self.paths), timeout=5, message=f"an event for {needle}"
        )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def watching(config_dirs: list[Path], recorder: Recorder, files: list[Path] | None = None) -> ConfigWatcher:
    watcher = ConfigWatcher([str(d) for d in config_dirs], [str(f) for f in files or []], recorder)
    watcher.start()
    return watcher


@pytest.fixture
def stop_after() -> Iterator[list[ConfigWatcher]]:
    watchers: list[ConfigWatcher] = []
    yield watchers
    for watcher in watchers:
        watcher.stop()


def atomic_write(path: Path, text: str) -> None:
    temp = path.parent / f".{path.name}.tmp"
    temp.write_text(text)
    os.replace(temp, path)


def test_a_deleted_and_recreated_config_dir_is_watched_again(
    tmp_path: Path, recorder: Recorder, stop_after: list[ConfigWatcher]
) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "a.json").write_text("{}")
    stop_after.append(watching([conf], recorder))
    for path in conf.iterdir():
        path.unlink()
    conf.rmdir()
    recorder.wait_for("conf.d")
    conf.mkdir()  # at once: the new directory very likely reuses the old inode number
    recorder.wait_for("conf.d")
    recorder.take()

    def edit_seen() -> bool:  # the new directory's watch is placed a moment after it appears
        atomic_write(conf / "b.json", "{}")
        return any(path.endswith("b.json") for path in recorder.take())

    wait_until(edit_seen, timeout=5, interval=0.2, message="an edit in the re-created directory")


def test_a_kubernetes_configmap_swap_is_a_change(
    tmp_path: Path, recorder: Recorder, stop_after: list[ConfigWatcher]
) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    first = conf / "..2026_12_01_10_00_00.1"
    first.mkdir()
    (first / "web.json").write_text("{}")
    os.symlink(first.name, conf / "..data")
    os.symlink("..data/web.json", conf / "web.json")
    stop_after.append(watching([conf], recorder))
    # what kubelet's atomic writer does: a new timestamped dir, a temp link, a rename over ..data
    second = conf / "..2026_12_01_10_05_00.2"
    second.mkdir()
    (second / "web.json").write_text('{"node_name": "b"}')
    os.symlink(second.name, conf / "..data_tmp")
    os.replace(conf / "..data_tmp", conf / "..data")
    recorder.wait_for("..data")


def test_an_edited_symlink_target_is_a_change(
    tmp_path: Path, recorder: Recorder, stop_after: list[ConfigWatcher]
) -> None:
    conf, shared = tmp_path / "conf.d", tmp_path / "shared"
    conf.mkdir()
    shared.mkdir()
    (shared / "web.json").write_text("{}")
    (shared / "unrelated.txt").write_text("x")
    os.symlink(shared / "web.json", conf / "web.json")
    stop_after.append(watching([conf], recorder))
    (shared / "unrelated.txt").write_text("y")  # noise next to the target
    atomic_write(shared / "web.json", '{"node_name": "b"}')
    recorder.wait_for("shared/web.json")
    assert not any("unrelated" in path for path in recorder.take())


def test_a_symlinked_config_file_target_is_followed(
    tmp_path: Path, recorder: Recorder, stop_after: list[ConfigWatcher]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "agent.hcl").write_text("")
    link = tmp_path / "agent.hcl"
    os.symlink(shared / "agent.hcl", link)
    stop_after.append(watching([], recorder, files=[link]))
    atomic_write(shared / "agent.hcl", 'node_name = "b"')
    recorder.wait_for("shared/agent.hcl")


def test_editor_noise_is_not_a_change(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    plan = plan_watches([str(conf)], [])
    assert plan.wants(str(conf / "web.json")) and plan.wants(str(conf / "..data"))
    assert plan.wants(str(tmp_path / "conf.d"))  # the directory itself, seen from its parent
    for noise in (".web.json.swp", "web.json~", "notes.txt", "#web.json#"):
        assert not plan.wants(str(conf / noise)), noise
    assert not plan.wants(str(tmp_path / "other"))
