"""Run the agent as ``nobody`` (via ``setpriv``) from a test running as root.

The project and its virtualenv may live where ``nobody`` cannot read (a clone under
/root, say), so this stages our packages and their installed dependencies into a
world-readable directory and finds an interpreter ``nobody`` can run.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Unprivileged:
    uid: int
    gid: int
    python: str
    pythonpath: str

    @property
    def prefix(self) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = self.pythonpath
        env.pop("VIRTUAL_ENV", None)
        return env

    def make_dir(self, name: str) -> Path:
        """A fresh directory the unprivileged user owns."""
        path = Path(tempfile.mkdtemp(prefix=f"ps-{name}-", dir="/tmp"))
        os.chown(path, self.uid, self.gid)
        path.chmod(0o755)
        return path


def _requirement_closure(root: str) -> set[str]:
    seen: set[str] = set()
    pending = [root]
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            marker_free = requirement.split(";")[0]
            if (
                ";" in requirement
                and "python_version" in requirement
                and "< '3.11'" in requirement.replace('"', "'")
            ):
                continue
            pending.append(re.split(r"[\s<>=!~\[(]", marker_free.strip(), maxsplit=1)[0])
    return seen


def _copy_distribution(name: str, stage: Path) -> None:
    distribution = importlib.metadata.distribution(name)
    for file in distribution.files or []:
        parts = file.parts
        if (
            not parts
            or parts[0] == ".."
            or parts[0].endswith((".dist-info", ".egg-info"))
            or parts[0] == "__pycache__"
        ):
            continue
        source = Path(str(distribution.locate_file(file)))
        if not source.is_file():
            continue
        target = stage / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def stage_packages() -> Path:
    stage = Path(tempfile.mkdtemp(prefix="ps-stage-", dir="/tmp"))
    for package in ("supervisor", "builtin_proxy"):
        shutil.copytree(REPO / package, stage / package, ignore=shutil.ignore_patterns("__pycache__"))
    (stage / "tests" / "helpers").mkdir(parents=True)
    for name in ("__init__.py",):
        (stage / "tests" / name).write_text("")
        (stage / "tests" / "helpers" / name).write_text("")
    shutil.copy2(REPO / "tests" / "helpers" / "fakeproxy.py", stage / "tests" / "helpers" / "fakeproxy.py")
    for name in _requirement_closure("proxy-supervisor"):
        if name == "proxy-supervisor":
            continue
        try:
            _copy_distribution(name, stage)
        except importlib.metadata.PackageNotFoundError:
            continue
    for directory, _dirs, files in os.walk(stage):
        os.chmod(directory, 0o755)
        for file in files:
            path = os.path.join(directory, file)
            os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
    stage.chmod(0o755)
    return stage


def find_unprivileged() -> Unprivileged | str:
    """Set up running as nobody, or return why it is impossible here."""
    if os.geteuid() != 0:
        return "needs root to switch to the nobody user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return "there is no nobody user"
    stage = stage_packages()
    candidates = [
        sys.executable,
        os.path.realpath(sys.executable),
        getattr(sys, "_base_executable", sys.executable),
        f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",
        f"/usr/local/bin/python{sys.version_info.major}.{sys.version_info.minor}",
    ]
    # The probe also spawns the interpreter again, as the agent will spawn proxies with it.
    major, minor = sys.version_info[:2]
    probe = (
        f"import os, sys; assert sys.version_info[:2] == ({major}, {minor}); "
        "import psutil, watchdog, cryptography, hcl, supervisor.cli.main; "
        "pid = os.posix_spawn(sys.argv[1], [sys.argv[1], '-c', 'pass'], dict(os.environ)); "
        "assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0; print('ok')"
    )
    runtime = None
    for candidate in dict.fromkeys(candidates):
        if not os.path.exists(candidate):
            continue
        attempt = Unprivileged(nobody.pw_uid, nobody.pw_gid, candidate, str(stage))
        result = subprocess.run(
            [*attempt.prefix, candidate, "-c", probe, candidate],
            capture_output=True,
            text=True,
            env=attempt.env(),
            cwd=str(stage),
            timeout=60,
        )
        if result.returncode == 0 and result.stdout.strip() == "ok":
            runtime = attempt
            break
    if runtime is None:
        return f"no Python {sys.version_info.major}.{sys.version_info.minor} interpreter usable by nobody"
    return runtime
