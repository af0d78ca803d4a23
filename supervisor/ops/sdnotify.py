"""systemd's notification protocol (``sd_notify``), spoken directly over the datagram socket.

No libsystemd binding: the protocol is one ``KEY=VALUE`` line per field, sent as a single
datagram to the unix socket named by ``NOTIFY_SOCKET`` (a leading ``@`` means the
abstract namespace). ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, when set) ask for a
``WATCHDOG=1`` ping at least that often; we ping at half the interval, as sd_watchdog_enabled(3)
recommends.

A notifier never raises into its caller: systemd being slow or gone must not stop the
agent, so a failed send is logged once at WARN and then at DEBUG.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

from supervisor.config.limits import parse_uint

log = logging.getLogger("supervisor.sdnotify")


class SdNotifier:
    """Sends state changes to the service manager. ``None``-safe: see ``from_environment``."""

    def __init__(self, address: str, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._warned = False
        self._last_status: str | None = None

    @classmethod
    def from_environment(cls, *, unset: bool = False) -> SdNotifier | None:
        """A notifier for ``NOTIFY_SOCKET``, or None when not started by systemd (Type=notify).

        ``unset`` removes the variables from this process's environment, as sd_notify(3)'s
        ``unset_environment`` does: proxies inherit the agent's environment and must not
        speak to systemd in the agent's name.
        """
        address = os.environ.get("NOTIFY_SOCKET", "")
        interval = watchdog_interval(os.environ)
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        if not address or address[0] not in "/@":
            return None
        return cls(address, interval)

    def close(self) -> None:
        self._sock.close()

    def send(self, **fields: str | int) -> bool:
        """Send one notification, e.g. ``send(READY=1, STATUS="3 proxies running")``."""
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # one field per line: a newline would split it
            lines.append(f"{key}={text}")
        payload = "\n".join(lines).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(payload, socket.MSG_DONTWAIT, target)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
            self._last_status = status
        self.send(**fields)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the reload it asked for.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1)

    def status(self, text: str) -> None:
        """Send STATUS= only when it changed (the loop publishes often)."""
        if text != self._last_status:
            self._last_status = text
            self.send(STATUS=text)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is asked of this process."""
    usec = env.get("WATCHDOG_USEC", "")
    if not parse_uint(usec):
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd a wrapper)
    return int(usec) / 1_000_000 / 2
