"""The operator commands (everything but ``agent``): validate, proxies, logs, reload, leave."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import quote

from supervisor.catalog.status import CheckStatus
from supervisor.cli.client import AgentClient
from supervisor.config import load_config
from supervisor.config.durations import parse_duration
from supervisor.config.keys import is_safe_id
from supervisor.config.limits import parse_uint
from supervisor.errors import AgentRequestError, ReloadRefused, UsageError
from supervisor.supervision.machine import State
from supervisor.supervision.ports import ephemeral_overlap


def validate(paths: Sequence[str], quiet: bool, out: TextIO) -> int:
    """Load every given file or directory exactly as the agent would; raises ConfigError."""
    if not paths:
        raise UsageError("validate needs at least one config file or directory")
    files = [path for path in paths if not os.path.isdir(path)]
    dirs = [path for path in paths if os.path.isdir(path)]
    config = load_config(
        files, dirs, {"data_dir": "/validate"} if not _mentions_data_dir(files, dirs) else None
    )
    if not quiet:
        for notice in config.notices:
            out.write(f"note: {notice}\n")
        overlap = ephemeral_overlap(config.proxy_min_port, config.proxy_max_port)
        if overlap:
            out.write(f"warning: {overlap}\n")
        managed = len(config.managed_services())
        out.write(
            f"Configuration is valid! {len(config.services)} service(s), {managed} managed prox"
            f"{'y' if managed == 1 else 'ies'}.\n"
        )
    return 0


def _mentions_data_dir(files: Sequence[str], dirs: Sequence[str]) -> bool:
    """``validate`` checks drop-ins that may leave data_dir to another file; only supply a
    placeholder when no given source sets it."""
    try:
        load_config(files, dirs)
    except Exception:  # noqa: BLE001 - any failure is reported by the real load that follows
        return False
    return True


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _note(entry: dict[str, Any]) -> str:
    state = entry["State"]
    if state == State.BLOCKED:
        return str(entry.get("BlockedReason") or "blocked")
    if state == State.BACKOFF:
        next_in = entry.get("NextAttemptInSeconds")
        when = "waiting"
        if next_in is not None:
            at = time.strftime("%H:%M:%S", time.localtime(time.time() + next_in))
            when = f"next attempt at {at} (in {next_in:.1f}s)"
        return f"{when}; last: {entry.get('LastExit') or 'unknown'}"
    check = entry.get("Check") or {}
    if state == State.RUNNING and check.get("Status") == CheckStatus.CRITICAL and check.get("Output"):
        return f"NOT SERVING: {check['Output']}"
    if entry.get("Adopted"):
        return "adopted from an earlier agent run"
    if entry.get("LastExit") and entry.get("Restarts"):
        return f"last exit: {entry['LastExit']}"
    return ""


def proxies(client: AgentClient, as_json: bool, out: TextIO) -> int:
    data = client.get("/v1/agent/connect/proxies")
    if as_json:
        out.write(json.dumps(data, indent=2) + "\n")
        return 0
    if not data:
        out.write("No managed proxies.\n")
        return 0
    header = ("PROXY", "SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "PORT", "NOTE")
    rows = [
        (
            entry["ProxyServiceID"],
            entry["TargetServiceID"],
            entry["State"],
            str(entry["Pid"] or "-"),
            _duration(entry.get("UptimeSeconds")),
            str(entry["Restarts"]),
            str(entry["Port"] or "-"),
            _note(entry),
        )
        for entry in data.values()
    ]
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
    return 0


def _candidates(name: str) -> list[str]:
    """A proxy ID, or a service's: its managed proxy's, its supervised sidecar's."""
    return [name, f"{name}-proxy", f"{name}-sidecar-proxy"] if not name.endswith("-proxy") else [name]


def find_proxy(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``/v1/agent/connect/proxies`` entry for a proxy ID or its target service's ID."""
    for candidate in _candidates(name):
        entry = data.get(candidate)
        if entry is None:
            matches = [e for e in data.values() if e["TargetServiceID"] == name]
            entry = matches[0] if matches else None
        if entry is not None:
            return dict(entry)
    known = ", ".join(sorted(data)) or "none"
    raise UsageError(f"no managed proxy for {name!r} (known proxies: {known})")


def log_path(client: AgentClient | None, data_dir: str | None, name: str, stderr: bool) -> str:
    """Find a proxy's log by proxy ID or service ID, through the agent or in a data_dir."""
    if not is_safe_id(name):  # the name becomes part of a file path
        raise UsageError(
            f"{name!r} is not a proxy or service name (letters, digits and - _ . @ : + =, no leading dot)"
        )
    candidates = _candidates(name)
    suffix = "stderr" if stderr else "stdout"
    if data_dir is not None:
        for candidate in candidates:
            path = os.path.join(data_dir, "proxy", "logs", f"{candidate}-{suffix}.log")
            if os.path.exists(path):
                return path
        raise UsageError(f"no {suffix} log for {name!r} in {os.path.join(data_dir, 'proxy', 'logs')}")
    assert client is not None
    entry = find_proxy(client.get("/v1/agent/connect/proxies"), name)
    path = entry["StderrLog" if stderr else "StdoutLog"]
    if not path:
        raise AgentRequestError(
            f"proxy {entry['ProxyServiceID']} has no log file: the agent runs without a "
            "data_dir (-dev), so proxy output goes to the agent's terminal"
        )
    return str(path)


def show_log(path: str, lines: int, follow: bool, out: TextIO) -> int:
    try:
        handle = open(path, "rb")  # kept open while following
    except PermissionError:
        raise AgentRequestError(
            f"cannot read {path}: permission denied; proxy logs are readable only by the agent's user"
        ) from None
    except FileNotFoundError:
        raise AgentRequestError(f"{path} does not exist (the proxy has not written anything yet?)") from None
    with handle:
        for line in _tail(handle, lines):
            out.write(line)
        out.flush()
        if follow:
            _follow(handle, path, out)
    return 0


def _tail(handle: Any, count: int) -> list[str]:
    if count <= 0:
        handle.seek(0, os.SEEK_END)
        return []
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    block = 64 * 1024
    data = b""
    position = end
    while position > 0 and data.count(b"\n") <= count:
        position = max(0, position - block)
        handle.seek(position)
        data = handle.read(end - position)
    handle.seek(end)
    text = data.decode("utf-8", "replace")
    kept = text.splitlines(keepends=True)[-count:]
    return kept


def _follow(handle: Any, path: str, out: TextIO) -> None:
    """Like ``tail -F``: survive truncation (copytruncate) and replacement (rename rotation)."""
    inode = os.fstat(handle.fileno()).st_ino
    try:
        while True:
            chunk = handle.read()
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
                continue
            time.sleep(0.2)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                continue
            if current.st_ino != inode:
                handle.close()
                handle = open(path, "rb")
                inode = current.st_ino
            elif current.st_size < handle.tell():
                handle.seek(0)
    except KeyboardInterrupt:
        return
    finally:
        handle.close()


def restart(client: AgentClient, name: str | None, restart_all: bool, timeout: str, out: TextIO) -> int:
    """Restart one proxy, or all of them one at a time: each must be running again before
    the next is touched, and the first one that does not come back stops the roll."""
    if (name is None) == (not restart_all):
        raise UsageError("restart needs either a proxy (or service) name or -all, not both")
    try:
        whole = parse_uint(timeout)
        seconds = float(whole) if whole is not None else parse_duration(timeout)
    except ValueError:
        raise UsageError(f"-timeout {timeout!r}: use a duration such as 30s or 2m") from None
    data = client.get("/v1/agent/connect/proxies")
    if restart_all:
        targets = sorted(data)
        if not targets:
            out.write("No managed proxies to restart.\n")
            return 0
    else:
        assert name is not None
        targets = [find_proxy(data, name)["ProxyServiceID"]]
    for number, proxy_id in enumerate(targets, start=1):
        old_pid = data.get(proxy_id, {}).get("Pid")
        prefix = f"[{number}/{len(targets)}] " if restart_all else ""
        out.write(f"{prefix}{proxy_id}: restarting (pid {old_pid or '-'})... ")
        out.flush()
        began = time.monotonic()
        try:
            entry = client.put(
                f"/v1/agent/connect/proxies/{quote(proxy_id, safe='')}/restart?timeout={seconds:g}s",
                timeout=seconds + 15,
            )
        except AgentRequestError as exc:
            out.write("failed\n")
            out.flush()
            left = targets[number:]
            if restart_all:
                note = f"; not restarted: {', '.join(left)}" if left else ""
                raise AgentRequestError(
                    f"rolling restart stopped at {proxy_id} ({number} of {len(targets)}): {exc}{note}"
                ) from None
            raise
        out.write(f"running as pid {entry['Pid']} after {time.monotonic() - began:.1f}s\n")
        out.flush()
    if restart_all:
        out.write(f"Restarted {len(targets)} prox{'y' if len(targets) == 1 else 'ies'}, one at a time.\n")
    return 0


def reload(client: AgentClient, out: TextIO) -> int:
    """Exit 2 when the agent finds the configuration invalid (it keeps the running one)."""
    try:
        client.put("/v1/agent/reload", timeout=90)
    except AgentRequestError as exc:
        if exc.status == 400:
            raise ReloadRefused(str(exc), exc.status) from None
        raise
    out.write("Configuration reloaded\n")
    return 0


def leave(client: AgentClient, out: TextIO) -> int:
    out.write("Stopping all managed proxies, then the agent...\n")
    out.flush()
    client.put("/v1/agent/leave", timeout=180)
    out.write("Graceful leave complete\n")
    return 0


MEMBER_STATUS = {1: "alive", 2: "leaving", 3: "left", 4: "failed"}


def members(client: AgentClient, as_json: bool, out: TextIO) -> int:
    """The hosts of the cluster (Consul's ``members``), and this agent's cluster state."""
    listed = client.get("/v1/agent/members")
    info = client.get("/v1/agent/self")
    cluster = info.get("Cluster") if isinstance(info, dict) else None
    if as_json:
        out.write(json.dumps({"Members": listed, "Cluster": cluster}, indent=2) + "\n")
        return 0
    rows = [("Node", "Address", "Status", "DC")]
    for member in listed:
        status = MEMBER_STATUS.get(int(member.get("Status", 0)), str(member.get("Status")))
        rows.append((member["Name"], str(member["Addr"]), status, member.get("Tags", {}).get("dc", "")))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    if cluster is None:
        out.write("\nsingle-host agent (no cluster block)\n")
        return 0
    line = f"\ncluster: {cluster.get('State')} (etcd {', '.join(cluster.get('Endpoints', []))})"
    if cluster.get("Error"):
        line += f"; last error: {cluster['Error']}"
    out.write(line + "\n")
    return 0 if cluster.get("State") == "connected" else 1


def print_error(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")


def sidecar_proxy_id(client: AgentClient, service_id: str) -> str:
    """The ID of the one connect-proxy registered on this agent for ``service_id`` (Consul's
    ``connect proxy -sidecar-for`` lookup, with its messages)."""
    try:
        services = client.get("/v1/agent/services")
    except AgentRequestError as exc:
        raise AgentRequestError(f"Failed looking up sidecar proxy info for {service_id}: {exc}") from None
    found = sorted(
        str(service.get("ID"))
        for service in (services or {}).values()
        if isinstance(service, dict)
        and service.get("Kind") == "connect-proxy"
        and str((service.get("Proxy") or {}).get("DestinationServiceID", "")).lower() == service_id.lower()
    )
    if not found:
        raise AgentRequestError(f"No sidecar proxy registered for {service_id}")
    if len(found) > 1:
        raise AgentRequestError(
            f"More than one sidecar proxy registered for {service_id}.\n"
            f"    Start proxy with -proxy-id and one of the following IDs: {', '.join(found)}"
        )
    return found[0]
