"""Who a process is: facts from /proc that survive agent restarts and defeat PID reuse.

A PID alone names a process only until it exits; the kernel then recycles the number,
and on Linux ``kill(pid, 0)`` even succeeds for a *thread* ID of another process (the
bug behind Consul issue 4455). A process is identified here by (pid, start time in
clock ticks since boot, boot id): a recycled PID has a different start time, a reboot a
different boot id, and a thread ID fails the thread-group check.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessIdentity:
    """What the supervision record stores to recognise a process after an agent restart."""

    pid: int
    start_ticks: int
    boot_id: str


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat this project uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    start_ticks: int


@functools.cache
def boot_id() -> str:
    """The kernel's random ID of this boot (changes on every reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        # Without it a reboot cannot be told apart; start time alone still guards reuse.
        return "unknown"


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat; None if there is no such process (or thread) any more."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # comm is in parentheses and may itself contain spaces and parentheses.
    open_paren = raw.find("(")
    close_paren = raw.rfind(")")
    if open_paren < 0 or close_paren < 0:
        return None
    fields = raw[close_paren + 2 :].split()
    try:
        return ProcStat(
            pid=int(raw[:open_paren]),
            comm=raw[open_paren + 1 : close_paren],
            state=fields[0],
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            session=int(fields[3]),
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def thread_group_id(pid: int) -> int | None:
    """The process a task belongs to (differs from ``pid`` for a non-leader thread)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def identity_of(pid: int) -> ProcessIdentity | None:
    """The identity of a live process, or None if ``pid`` is gone or is a thread."""
    stat = read_stat(pid)
    if stat is None or stat.state in ("Z", "X") or thread_group_id(pid) != pid:
        return None
    return ProcessIdentity(pid=pid, start_ticks=stat.start_ticks, boot_id=boot_id())


def seconds_since_boot() -> float:
    """The clock that /proc start times are measured against (includes suspend)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def age_of(start_ticks: int) -> float:
    """How long ago a process with this start time was started, in seconds."""
    return max(0.0, seconds_since_boot() - start_ticks / CLOCK_TICKS_PER_SECOND)


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, or None if it does not exist (or names a thread, not a process)."""
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None


def open_verified(expected: ProcessIdentity) -> int | None:
    """Open a pidfd to the process ``expected`` describes, or None if it is not that process.

    The pidfd is opened *first* and the identity checked afterwards: once the pidfd
    exists it refers to one process for good, so a PID recycled between the check and
    later signals cannot be hit (procps-ng issue 207 discusses this ordering).
    """
    if expected.boot_id != boot_id():
        return None
    pidfd = open_pidfd(expected.pid)
    if pidfd is None:
        return None
    current = identity_of(expected.pid)
    if current != expected:
        os.close(pidfd)
        return None
    return pidfd
