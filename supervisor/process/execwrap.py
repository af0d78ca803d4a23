"""The exec wrapper: what a proxy's process does between ``posix_spawn`` and its own code.

Run as ``python -I -S execwrap.py [options] -- ARGV...`` (isolated, no site: it imports
only the standard library and starts in milliseconds). In order:

1. ``--pdeathsig SIG --parent PID``: ask the kernel to send SIG when the agent dies
   (however it dies: ``kill -9`` too), then check the agent is still the parent -- it
   may have died before the request was made. Used for ``-dev`` agents, whose proxies
   must not outlive them.
2. ``--hold FD``: wait until the agent has written this process into its record, then
   go on (one byte on FD); if the agent died first (EOF), exit without running the
   proxy. So a proxy never runs unrecorded, even where the agent cannot find its own
   proxies by their marker (they run as another user, whose environment it cannot read).
3. ``--gid GID --groups G1,G2 --uid UID``: become the proxy's user (needs CAP_SETGID and
   CAP_SETUID, or root).
4. Unless ``--keep-privileges`` (a proxy allowed to run as root): drop every capability
   (permitted, effective, inheritable and so ambient) and set no_new_privs, so the proxy
   can never regain what the agent was granted (an agent under systemd's
   ``AmbientCapabilities`` would otherwise pass them on) nor gain any through a
   set-user-ID program.
5. ``execve`` the proxy's own argv with the environment it was given.

A failure at any step is reported on stderr (the proxy's log) and ends the process
with exit code 126, so the supervisor's backoff shows it; nothing runs half-set-up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
EXIT_SETUP_FAILED = 126


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _fail(step: str, error: object) -> None:
    sys.stderr.write(f"proxy-supervisor exec wrapper: cannot {step}: {error}\n")
    sys.stderr.flush()
    os._exit(EXIT_SETUP_FAILED)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg: int, step: str) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        _fail(step, os.strerror(ctypes.get_errno()))


def drop_capabilities(libc: ctypes.CDLL) -> None:
    # Ambient first (it would be cleared with inheritable anyway; explicit is clearer).
    libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: no capability in any set
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        _fail("drop capabilities", os.strerror(ctypes.get_errno()))
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")


def main(argv: list[str]) -> None:
    try:
        split = argv.index("--")
    except ValueError:
        _fail("start", "usage: execwrap.py [options] -- ARGV...")
    options, command = argv[:split], argv[split + 1 :]
    if not command:
        _fail("start", "no command")
    values = dict(zip(options[::2], options[1::2], strict=False))
    libc = _libc()
    if "--pdeathsig" in values:
        signum = int(getattr(signal, values["--pdeathsig"]))
        _prctl(libc, PR_SET_PDEATHSIG, signum, "set the parent-death signal")
        if os.getppid() != int(values["--parent"]):
            os._exit(EXIT_SETUP_FAILED)  # the agent is already gone: so must we be
    if "--hold" in values:
        fd = int(values["--hold"])
        try:
            go = os.read(fd, 1)
        except OSError as exc:
            _fail("wait for the agent", exc)
        os.close(fd)
        if go != b"1":
            os._exit(EXIT_SETUP_FAILED)  # the agent died before recording us: do not run
    try:
        if "--gid" in values:
            groups = [int(group) for group in values.get("--groups", "").split(",") if group]
            os.setgroups(groups)
            gid = int(values["--gid"])
            os.setresgid(gid, gid, gid)
        if "--uid" in values:
            uid = int(values["--uid"])
            os.setresuid(uid, uid, uid)
    except OSError as exc:
        _fail("switch to the proxy's user and group", exc)
    if "--keep-privileges" not in values:
        drop_capabilities(libc)
    try:
        os.execve(command[0], command, os.environ)
    except OSError as exc:
        _fail(f"run {command[0]}", exc)


if __name__ == "__main__":
    main(sys.argv[1:])
