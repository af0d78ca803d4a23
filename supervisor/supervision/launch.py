"""Turn a planned proxy into a concrete command line and environment, at spawn time."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from supervisor.process.marker import MARKER_ENV, Marker
from supervisor.process.spawn import LaunchSpec
from supervisor.state.datadir import DataDir
from supervisor.supervision.desired import PlannedProxy


def builtin_argv() -> tuple[str, ...]:
    """The built-in proxy, run by whatever interpreter runs the agent *now*."""
    return (sys.executable, "-m", "builtin_proxy")


def _package_root() -> str:
    """The directory holding ``builtin_proxy`` (so a source checkout works without install)."""
    import builtin_proxy

    return os.path.dirname(os.path.dirname(os.path.abspath(builtin_proxy.__file__)))


def launch_for(
    planned: PlannedProxy,
    owner: str,
    ambient_env: Mapping[str, str],
    data_dir: DataDir | None,
    log_level: str = "INFO",
) -> LaunchSpec:
    """Environment order (later wins): the agent's own environment, the variables the
    agent sets (CONSUL_HTTP_ADDR …, CONNECT_PROXY_ID, CONNECT_PROXY_TOKEN), the marker."""
    env = dict(ambient_env)
    env.update(planned.spec.env)
    env[MARKER_ENV] = str(Marker(owner=owner, spec_hash=planned.spec_hash, proxy_id=planned.proxy_id))
    if planned.spec.is_builtin:
        # The built-in proxy logs at the agent's level (read at its start; not part of the
        # spec, so changing the agent's level does not restart proxies).
        env.setdefault("PROXY_SUPERVISOR_LOG_LEVEL", log_level)
        argv = builtin_argv()
        root = _package_root()
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = root if not existing else f"{root}{os.pathsep}{existing}"
    else:
        argv = planned.spec.command
    stdout_path = stderr_path = None
    if data_dir is not None:
        stdout_path, stderr_path = data_dir.log_paths(planned.proxy_id)
    return LaunchSpec(
        proxy_id=planned.proxy_id,
        argv=argv,
        env=env,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
    )
