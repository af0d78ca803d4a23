"""Turn a planned proxy into a concrete command line and environment, at spawn time."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from supervisor.process.marker import MARKER_ENV, Marker
from supervisor.process.spawn import SECRET_FD, LaunchSpec, Wrapping
from supervisor.state.datadir import DataDir
from supervisor.supervision.desired import ENV_PROXY_TOKEN, PlannedProxy

ENV_TOKEN_FD = "PROXY_SUPERVISOR_TOKEN_FD"
ENV_NONDUMPABLE = "PROXY_SUPERVISOR_NONDUMPABLE"


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
    *,
    drop_capabilities: bool = False,
) -> LaunchSpec:
    """Environment order (later wins): the agent's own environment, the variables the
    agent sets (CONSUL_HTTP_ADDR …, CONNECT_PROXY_ID, CONNECT_PROXY_TOKEN), the marker.

    The built-in proxy gets its token on a pipe (SECRET_FD) instead of in its
    environment, where other processes of its user could read it; a custom proxy gets
    CONNECT_PROXY_TOKEN, as Consul's protocol says. The exec wrapper runs when the proxy
    needs another user, must die with a ``-dev`` agent, or must not inherit the agent's
    capabilities (``drop_capabilities``)."""
    env = dict(ambient_env)
    env.update(planned.spec.env)
    env[MARKER_ENV] = str(Marker(owner=owner, spec_hash=planned.spec_hash, proxy_id=planned.proxy_id))
    secret = None
    if planned.spec.is_builtin:
        secret = env.pop(ENV_PROXY_TOKEN, "").encode()
        env[ENV_TOKEN_FD] = str(SECRET_FD)
        if planned.run_as is not None:
            env[ENV_NONDUMPABLE] = "1"  # other proxies of its user may not read its memory
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
    wrapping = None
    if planned.run_as is not None or planned.spec.die_with_agent or drop_capabilities:
        wrapping = Wrapping(
            run_as=planned.run_as,
            die_with_agent=planned.spec.die_with_agent,
            # Running as another user, the agent cannot read a proxy's environment to
            # find it by its marker: it may only run once it is in the record.
            hold=planned.run_as is not None,
            keep_privileges=not drop_capabilities and planned.run_as is None,
        )
    return LaunchSpec(
        proxy_id=planned.proxy_id,
        argv=argv,
        env=env,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        wrapping=wrapping,
        secret=secret,
    )
