"""Whether this agent may start a proxy as it is configured, and what it tells the operator.

Pure: the agent's privileges are inputs, so every case (root with and without
``allow_managed_root``, a proxy user with and without the capabilities to switch to it)
is tested without processes or privileges.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from supervisor.supervision.desired import PlannedProxy

log = logging.getLogger("supervisor.policy")

ROOT_BLOCKED = (
    "running as root: managed proxies are not started as root; run the agent as an "
    "unprivileged user, or set connect.proxy.allow_managed_root = true"
)


@dataclass(frozen=True)
class Privileges:
    is_root: bool
    can_switch_users: bool  # root, or CAP_SETUID and CAP_SETGID
    can_signal_other_users: bool  # root, or CAP_KILL
    has_capabilities: bool  # any capability a proxy could inherit
    user: str  # the agent's user, for messages


@dataclass(frozen=True)
class StartPolicy:
    privileges: Privileges
    allow_managed_root: bool

    def refusal(self, planned: PlannedProxy) -> str | None:
        """Why ``planned`` may not be started, if it may not."""
        run_as = planned.run_as
        if self.runs_as_root(planned):
            return None if self.allow_managed_root else ROOT_BLOCKED
        if run_as is None:
            return None
        if not self.privileges.can_switch_users:
            return (
                f"cannot run as user {run_as.user}: the agent ({self.privileges.user}) "
                "may not switch users; run it as root, or grant it CAP_SETUID, CAP_SETGID "
                "and CAP_KILL (systemd: AmbientCapabilities=)"
            )
        if not self.privileges.can_signal_other_users and not self.privileges.is_root:
            return (
                f"cannot run as user {run_as.user}: the agent could not stop it without CAP_KILL "
                "(systemd: AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL)"
            )
        return None

    def runs_as_root(self, planned: PlannedProxy) -> bool:
        """A proxy that would run as root (the agent's root, or a configured root user)."""
        run_as = planned.run_as
        return self.privileges.is_root and (run_as is None or run_as.is_root)

    def drops_capabilities(self, planned: PlannedProxy) -> bool:
        """Must the exec wrapper drop capabilities the agent holds? Yes, unless the proxy is
        one allowed to run as root (it keeps root's powers: a port below 1024, say)."""
        return self.privileges.has_capabilities and not self.runs_as_root(planned)


def say_refused_as_root(refusals: Iterable[str | None]) -> None:
    count = sum(1 for why in refusals if why == ROOT_BLOCKED)
    if count:
        log.error(
            "agent runs as root and connect.proxy.allow_managed_root is false: %d managed "
            "prox%s will NOT be started. Run the agent as an unprivileged user, set "
            "connect.proxy.user to run proxies as another user, or set "
            "connect.proxy.allow_managed_root = true to allow proxies to run as root.",
            count,
            "y" if count == 1 else "ies",
        )


def say_what_shared_proxies_can_read(planned: Iterable[PlannedProxy], user: str, data_dir: str) -> bool:
    """Where proxies share the agent's user, say plainly what any of them can read.
    Returns whether it was said (it is said once per agent run)."""
    shared = [proxy for proxy in planned if proxy.run_as is None]
    if not shared:
        return False
    log.warning(
        "%d managed prox%s run as the agent's own user, %s: each can read everything the agent can, "
        "the CA private key (%s/connect/ca.json) and every proxy's token (%s/proxy/allocations.json) "
        "included. Set connect.proxy.user to run proxies as a user of their own "
        "(the agent then needs root, or CAP_SETUID, CAP_SETGID and CAP_KILL: see contrib/systemd).",
        len(shared),
        "y" if len(shared) == 1 else "ies",
        user,
        data_dir,
        data_dir,
    )
    return True
