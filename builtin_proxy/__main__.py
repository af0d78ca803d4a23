"""``python -m builtin_proxy``: the built-in Connect proxy (also ``proxy-supervisor connect proxy``).

A managed proxy needs nothing on the command line: the agent sets CONNECT_PROXY_ID,
CONNECT_PROXY_TOKEN and CONSUL_HTTP_ADDR. A proxy registered by hand
(``kind: connect-proxy``) is started with ``-proxy-id`` naming its service registration.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from collections.abc import Sequence

from supervisor.levels import numeric
from supervisor.net import DEFAULT_ADDRESS


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        level = {logging.WARNING: "WARN", logging.ERROR: "ERROR"}.get(record.levelno, record.levelname)
        line = f"{stamp} [{level}] {record.name.rsplit('.', 1)[-1]}: {record.getMessage()}"
        if record.exc_info:  # (an internal error's traceback: what a bug report needs)
            line += "\n" + self.formatException(record.exc_info)
        return line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="builtin_proxy", description="The built-in Connect proxy.")
    parser.add_argument(
        "-proxy-id",
        "--proxy-id",
        dest="proxy_id",
        default=os.environ.get("CONNECT_PROXY_ID", ""),
        help="the proxy's service ID (default: CONNECT_PROXY_ID)",
    )
    parser.add_argument(
        "-token", "--token", default=None, help="ACL token (default: CONNECT_PROXY_TOKEN, CONSUL_HTTP_TOKEN)"
    )
    parser.add_argument(
        "-http-addr",
        "--http-addr",
        dest="http_addr",
        default=os.environ.get("CONSUL_HTTP_ADDR", DEFAULT_ADDRESS),
        help=f"the agent's API address (default: CONSUL_HTTP_ADDR or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "-log-level",
        "--log-level",
        dest="log_level",
        default=os.environ.get("PROXY_SUPERVISOR_LOG_LEVEL", "INFO"),
    )
    parser.add_argument(
        "-registered",
        "--registered",
        action="store_true",
        help="the proxy is a hand-registered connect-proxy service, not a managed proxy",
    )
    return parser.parse_args(list(argv))


def handed_token() -> str:
    """The token the supervisor handed over on a pipe (PROXY_SUPERVISOR_TOKEN_FD), kept
    out of the environment, which other processes of the same user can read."""
    fd_text = os.environ.pop("PROXY_SUPERVISOR_TOKEN_FD", "")
    if not fd_text.isdigit():
        return ""
    fd = int(fd_text)
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
        os.close(fd)
    except OSError as exc:
        sys.stderr.write(f"builtin_proxy: cannot read the token on fd {fd}: {exc}\n")
        return ""
    return b"".join(chunks).decode().strip()


def private_memory() -> None:
    """Non-dumpable: other processes of this user may neither ptrace it nor read its
    /proc files (environment, memory), so one compromised proxy cannot take another's
    token. Only asked for when proxies run as their own user: the agent must be able to
    read the environment of proxies that run as the agent's user (to find them)."""
    import ctypes

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, ctypes.c_ulong(0), 0, 0, 0) != 0:
        sys.stderr.write(
            f"builtin_proxy: cannot make itself non-dumpable: {os.strerror(ctypes.get_errno())}\n"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("builtin_proxy")
    root.addHandler(handler)
    root.setLevel(numeric(args.log_level))
    if not args.proxy_id:
        sys.stderr.write("builtin_proxy: no proxy ID: set CONNECT_PROXY_ID or pass -proxy-id\n")
        return 2
    if os.environ.get("PROXY_SUPERVISOR_NONDUMPABLE") == "1":
        private_memory()
    handed = handed_token()
    token = args.token
    if token is None:
        token = handed or os.environ.get("CONNECT_PROXY_TOKEN") or os.environ.get("CONSUL_HTTP_TOKEN", "")
    managed = bool(handed or os.environ.get("CONNECT_PROXY_TOKEN")) and not args.registered
    from builtin_proxy.proxy import Proxy

    return Proxy(args.http_addr, token, args.proxy_id, managed=managed).run()


if __name__ == "__main__":
    raise SystemExit(main())
