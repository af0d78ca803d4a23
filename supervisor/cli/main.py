"""``proxy-supervisor``: parse the command line, run one command, map errors to exit codes.

Exit codes: 0 ok, 1 runtime error, 2 usage or configuration error. Only this module
prints errors; everything below raises typed exceptions. Flags use Consul's single-dash
spelling (``-config-dir``); the double-dash spelling works too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TextIO

from supervisor.cli import commands, connect_commands, convert_command
from supervisor.cli.client import AgentClient
from supervisor.cli.dispatch import Handler, Parser, client_flags, flag, needs_subcommand, with_client
from supervisor.errors import ConfigError, SupervisorError, UsageError
from supervisor.logsetup import private_file
from supervisor.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="proxy-supervisor", description="Per-host sidecar-proxy supervisor and Connect agent."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in (_add_agent, _add_validate, _add_proxy_commands, _add_agent_calls):
        add(sub)
    connect_commands.add_parsers(sub)
    convert_command.add_parser(sub)
    _add_connect(sub)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(handler=_version)
    return parser


def _add_agent(sub: Any) -> None:
    """``agent``: run the agent."""
    agent = sub.add_parser("agent", help="run the agent")
    flag(agent, "config-file", dest="config_files", action="append", default=[], metavar="FILE")
    flag(agent, "config-dir", dest="config_dirs", action="append", default=[], metavar="DIR")
    flag(agent, "data-dir", dest="data_dir", metavar="DIR")
    flag(agent, "dev", action="store_true", help="development mode: no data_dir needed, DEBUG logs")
    flag(agent, "node", dest="node_name", metavar="NAME")
    flag(agent, "datacenter", metavar="DC")
    flag(agent, "bind", dest="bind_addr", metavar="ADDR", help="default address of proxies' public listeners")
    flag(agent, "client", dest="client_addr", metavar="ADDR", help="address of the HTTP API")
    flag(agent, "http-port", dest="http_port", type=int, metavar="PORT")
    flag(agent, "log-level", dest="log_level", metavar="LEVEL")
    flag(agent, "log-json", dest="log_json", action="store_true", default=None)
    flag(agent, "log-file", dest="log_file", metavar="FILE")
    flag(
        agent,
        "daemon",
        action="store_true",
        help="detach into the background once started (logs go to -log-file, default data_dir/agent.log)",
    )
    flag(agent, "pid-file", dest="pid_file", metavar="FILE", help="write (and lock) the agent's PID here")
    agent.set_defaults(handler=_run_agent)


def _add_validate(sub: Any) -> None:
    """``validate``: check config files as the agent would."""
    validate = sub.add_parser("validate", help="check config files or directories")
    validate.add_argument("paths", nargs="*", metavar="PATH")
    flag(validate, "quiet", action="store_true")
    validate.set_defaults(handler=lambda args, out: commands.validate(args.paths, args.quiet, out))


def _add_proxy_commands(sub: Any) -> None:
    """``proxies``, ``logs``, ``restart``: the managed proxies."""
    proxies = sub.add_parser("proxies", help="show the managed proxies and their state")
    flag(proxies, "json", dest="as_json", action="store_true")
    client_flags(proxies)
    proxies.set_defaults(handler=with_client(_proxies))

    logs = sub.add_parser("logs", help="show a proxy's output")
    logs.add_argument("name", metavar="SERVICE|PROXY")
    flag(logs, "f", dest="follow", action="store_true", help="keep printing new output")
    flag(logs, "stderr", action="store_true", help="the stderr log instead of stdout")
    flag(logs, "n", dest="lines", type=int, default=20, metavar="N", help="lines to show first (default 20)")
    flag(logs, "data-dir", dest="data_dir", metavar="DIR", help="read logs from DIR without asking the agent")
    client_flags(logs)
    logs.set_defaults(handler=_show_log)

    restart = sub.add_parser(
        "restart", help="restart a proxy, or every proxy one at a time (-all), e.g. after an upgrade"
    )
    restart.add_argument("name", nargs="?", metavar="SERVICE|PROXY")
    flag(restart, "all", dest="restart_all", action="store_true", help="rolling restart of every proxy")
    flag(
        restart,
        "timeout",
        default="60s",
        metavar="DURATION",
        help="how long each proxy may take to be running again (default 60s)",
    )
    client_flags(restart)
    restart.set_defaults(handler=with_client(_restart))


def _add_agent_calls(sub: Any) -> None:
    """``reload``, ``leave``."""
    reload = sub.add_parser("reload", help="re-read the configuration")
    reload.set_defaults(handler=with_client(lambda _args, client, out: commands.reload(client, out)))
    leave = sub.add_parser("leave", help="stop all proxies, then the agent")
    leave.set_defaults(handler=with_client(lambda _args, client, out: commands.leave(client, out)))
    members = sub.add_parser("members", help="list the cluster's hosts and this agent's cluster state")
    flag(members, "json", dest="as_json", action="store_true", help="print JSON")
    members.set_defaults(
        handler=with_client(lambda args, client, out: commands.members(client, args.as_json, out))
    )
    for agent_call in (reload, leave, members):
        client_flags(agent_call)


def _add_connect(sub: Any) -> None:
    """``connect proxy``: the built-in proxy for a registered proxy or sidecar."""
    connect = sub.add_parser("connect", help="Connect tools")
    connect.set_defaults(handler=needs_subcommand("connect needs a subcommand: proxy"))
    connect_sub = connect.add_subparsers(dest="connect_command", metavar="SUBCOMMAND", parser_class=Parser)
    proxy = connect_sub.add_parser(
        "proxy", help="run the built-in proxy for a registered connect-proxy (or a service's sidecar)"
    )
    flag(proxy, "proxy-id", dest="proxy_id", default="", metavar="ID", help="the proxy's service ID")
    flag(
        proxy,
        "sidecar-for",
        dest="sidecar_for",
        default="",
        metavar="SERVICE-ID",
        help="run the sidecar registered for this service (-proxy-id wins if both are given)",
    )
    client_flags(proxy)
    flag(proxy, "log-level", dest="log_level", default=None, metavar="LEVEL")
    proxy.set_defaults(handler=_run_connect_proxy)


def _agent_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    for name in (
        "data_dir",
        "node_name",
        "datacenter",
        "bind_addr",
        "client_addr",
        "log_level",
        "log_json",
        "log_file",
    ):
        value = getattr(args, name)
        if value is not None:
            flags[name] = value
    if args.http_port is not None:
        flags["ports"] = {"http": args.http_port}
    return flags


def _run_agent(args: argparse.Namespace, out: TextIO) -> int:
    from supervisor.agent import Agent, AgentOptions
    from supervisor.ops.daemon import Launched, PidFile, daemonize

    options = AgentOptions(
        config_files=tuple(args.config_files),
        config_dirs=tuple(args.config_dirs),
        flags=_agent_flags(args),
        dev=args.dev,
    )
    agent = Agent(options)  # a bad config fails here, on the operator's terminal
    pid_file = PidFile(args.pid_file) if args.pid_file else None
    if not args.daemon:
        if pid_file is None:
            return agent.run()
        with pid_file:
            return agent.run()
    if args.dev or agent.config.data_dir is None:
        raise UsageError("-daemon cannot be combined with -dev (-dev proxies stop with the agent's terminal)")
    log_file = agent.config.log_file
    if not log_file:
        log_file = os.path.join(os.path.abspath(agent.config.data_dir), "agent.log")
        os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
        agent = Agent(replace(options, flags={**options.flags, "log_file": log_file}))
    try:
        # Not a with-block: the daemon keeps it as its stdout/stderr for its whole life.
        output = os.fdopen(private_file(log_file), "a", buffering=1)
    except OSError as exc:
        raise UsageError(f"-log-file {log_file}: cannot open it for writing: {exc.strerror}") from None
    outcome = daemonize(pid_file, output)
    if isinstance(outcome, Launched):
        output.close()
        where = f", pid file {pid_file.path}" if pid_file else ""
        out.write(f"agent running in the background as pid {outcome.pid} (log {log_file}{where})\n")
        return 0
    agent.readiness = outcome
    return agent.run()


def _version(_args: argparse.Namespace, out: TextIO) -> int:
    out.write(f"proxy-supervisor {__version__}\n")
    return 0


def _proxies(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    return commands.proxies(client, args.as_json, out)


def _restart(args: argparse.Namespace, client: AgentClient, out: TextIO) -> int:
    return commands.restart(client, args.name, args.restart_all, args.timeout, out)


def _show_log(args: argparse.Namespace, out: TextIO) -> int:
    # With -data-dir the log is found on disk, so it works while the agent is down.
    client = None if args.data_dir else AgentClient(args.http_addr, args.token)
    path = commands.log_path(client, args.data_dir, args.name, args.stderr)
    return commands.show_log(path, args.lines, args.follow, out)


def _run_connect_proxy(args: argparse.Namespace, out: TextIO) -> int:
    from builtin_proxy.__main__ import main as proxy_main

    proxy_id = args.proxy_id or os.environ.get("CONNECT_PROXY_ID", "")
    sidecar_for = args.sidecar_for or os.environ.get("CONNECT_SIDECAR_FOR", "")
    if not proxy_id and not sidecar_for:
        raise UsageError("-proxy-id or -sidecar-for must be given so that the proxy can configure itself")
    if not proxy_id:
        proxy_id = commands.sidecar_proxy_id(AgentClient(args.http_addr, args.token), sidecar_for)
        out.write("Configuration mode: Agent API\n")
        out.write(f"    Sidecar for ID: {sidecar_for}\n          Proxy ID: {proxy_id}\n")
        out.flush()
    proxy_args = ["-proxy-id", proxy_id, "-registered"]
    if args.http_addr:
        proxy_args += ["-http-addr", args.http_addr]
    if args.token:
        proxy_args += ["-token", args.token]
    if args.log_level:
        proxy_args += ["-log-level", args.log_level]
    return proxy_main(proxy_args)


def run(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stdout)
        return 2
    return handler(args, sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        count = len(exc.problems)
        commands.print_error(f"the configuration has {count} problem{'s' if count != 1 else ''}:")
        for problem in exc.problems:
            sys.stderr.write(f"  {problem}\n")
        return exc.exit_code
    except SupervisorError as exc:
        commands.print_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
