"""Who proxies run as: the agent's own privileges, and the user a proxy may be given.

Proxies run as the agent's user unless ``connect.proxy.user`` (or a service's
``connect.proxy.user``) names another. Switching needs CAP_SETUID and CAP_SETGID -- an
agent running as root has them, and systemd can grant exactly those to an unprivileged
agent (``AmbientCapabilities=``); stopping a proxy of another user also needs CAP_KILL.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7


@dataclass(frozen=True)
class RunAs:
    """The user and groups one proxy runs as (resolved from names in the config)."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @property
    def is_root(self) -> bool:
        return self.uid == 0


class UnknownUser(LookupError):
    """``connect.proxy.user`` or ``group`` names no user or group of this host."""


def resolve_run_as(user: str, group: str | None = None) -> RunAs:
    """A proxy user by name or number; its group is ``group``, else the user's own;
    supplementary groups are the user's (as ``login`` would set them)."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise UnknownUser(f"connect.proxy.user: there is no user {user!r} on this host") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, OverflowError):
            raise UnknownUser(f"connect.proxy.group: there is no group {group!r} on this host") from None
    try:
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    except OSError:
        groups = (gid,)
    return RunAs(entry.pw_name, entry.pw_uid, gid, groups)


def _capability_sets() -> dict[str, int]:
    sets: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
                    sets[name] = int(value.strip(), 16)
    except OSError:
        pass
    return sets


def has_capabilities() -> bool:
    """Does the agent hold any capability a proxy could inherit?"""
    return any(_capability_sets().values())


def can_switch_users() -> bool:
    if os.geteuid() == 0:
        return True
    effective = _capability_sets().get("CapEff", 0)
    return bool(effective & (1 << CAP_SETUID)) and bool(effective & (1 << CAP_SETGID))


def can_signal_other_users() -> bool:
    return os.geteuid() == 0 or bool(_capability_sets().get("CapEff", 0) & (1 << CAP_KILL))


def agent_user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
