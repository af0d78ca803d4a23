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

from supervisor.cli import commands, connect_commands
from supervisor.cli.client import AgentClient
from supervisor.errors import ConfigError, SupervisorError, UsageError
from supervisor.logsetup import private_file
from supervisor.version import __version__


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    parser.add_argument(f"-{name}", f"--{name}", **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit itself; raise instead
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def _client_flags(parser: argparse.ArgumentParser) -> None:
    _flag(
        parser,
        "http-addr",
        dest="http_addr",
        help="agent API address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)",
    )
    _flag(parser, "token", help="ACL token (default: CONSUL_HTTP_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="proxy-supervisor", description="Per-host sidecar-proxy supervisor and Connect agent."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    agent = sub.add_parser("agent", help="run the agent")
    _flag(agent, "config-file", dest="config_files", action="append", default=[], metavar="FILE")
    _flag(agent, "config-dir", dest="config_dirs", action="append", default=[], metavar="DIR")
    _flag(agent, "data-dir", dest="data_dir", metavar="DIR")
    _flag(agent, "dev", action="store_true", help="development mode: no data_dir needed, DEBUG logs")
    _flag(agent, "node", dest="node_name", metavar="NAME")
    _flag(agent, "datacenter", metavar="DC")
    _flag(
        agent, "bind", dest="bind_addr", metavar="ADDR", help="default address of proxies' public listeners"
    )
    _flag(agent, "client", dest="client_addr", metavar="ADDR", help="address of the HTTP API")
    _flag(agent, "http-port", dest="http_port", type=int, metavar="PORT")
    _flag(agent, "log-level", dest="log_level", metavar="LEVEL")
    _flag(agent, "log-json", dest="log_json", action="store_true", default=None)
    _flag(agent, "log-file", dest="log_file", metavar="FILE")
    _flag(
        agent,
        "daemon",
        action="store_true",
        help="detach into the background once started (logs go to -log-file, default data_dir/agent.log)",
    )
    _flag(agent, "pid-file", dest="pid_file", metavar="FILE", help="write (and lock) the agent's PID here")

    validate = sub.add_parser("validate", help="check config files or directories")
    validate.add_argument("paths", nargs="*", metavar="PATH")
    _flag(validate, "quiet", action="store_true")

    proxies = sub.add_parser("proxies", help="show the managed proxies and their state")
    _flag(proxies, "json", dest="as_json", action="store_true")
    _client_flags(proxies)

    logs = sub.add_parser("logs", help="show a proxy's output")
    logs.add_argument("name", metavar="SERVICE|PROXY")
    _flag(logs, "f", dest="follow", action="store_true", help="keep printing new output")
    _flag(logs, "stderr", action="store_true", help="the stderr log instead of stdout")
    _flag(logs, "n", dest="lines", type=int, default=20, metavar="N", help="lines to show first (default 20)")
    _flag(
        logs, "data-dir", dest="data_dir", metavar="DIR", help="read logs from DIR without asking the agent"
    )
    _client_flags(logs)

    restart = sub.add_parser(
        "restart", help="restart a proxy, or every proxy one at a time (-all), e.g. after an upgrade"
    )
    restart.add_argument("name", nargs="?", metavar="SERVICE|PROXY")
    _flag(restart, "all", dest="restart_all", action="store_true", help="rolling restart of every proxy")
    _flag(
        restart,
        "timeout",
        default="60s",
        metavar="DURATION",
        help="how long each proxy may take to be running again (default 60s)",
    )
    _client_flags(restart)

    for name, text in (
        ("reload", "re-read the configuration"),
        ("leave", "stop all proxies, then the agent"),
    ):
        _client_flags(sub.add_parser(name, help=text))

    connect_commands.add_parsers(sub, _flag, _client_flags)
    connect = sub.add_parser("connect", help="Connect tools")
    connect_sub = connect.add_subparsers(dest="connect_command", metavar="SUBCOMMAND", parser_class=_Parser)
    proxy = connect_sub.add_parser("proxy", help="run the built-in proxy for a registered connect-proxy")
    _flag(proxy, "proxy-id", dest="proxy_id", required=True, metavar="ID", help="the proxy's service ID")
    _client_flags(proxy)
    _flag(proxy, "log-level", dest="log_level", default=None, metavar="LEVEL")
    sub.add_parser("version", help="print the version")
    return parser


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


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    out = sys.stdout
    if args.command is None:
        build_parser().print_help(out)
        return 2
    if args.command == "version":
        out.write(f"proxy-supervisor {__version__}\n")
        return 0
    if args.command == "validate":
        return commands.validate(args.paths, args.quiet, out)
    if args.command == "agent":
        return _run_agent(args, out)
    if args.command == "connect":
        if args.connect_command != "proxy":
            raise UsageError("connect needs a subcommand: proxy")
        from builtin_proxy.__main__ import main as proxy_main

        proxy_args = ["-proxy-id", args.proxy_id, "-registered"]
        if args.http_addr:
            proxy_args += ["-http-addr", args.http_addr]
        if args.token:
            proxy_args += ["-token", args.token]
        if args.log_level:
            proxy_args += ["-log-level", args.log_level]
        return proxy_main(proxy_args)
    client = AgentClient(args.http_addr, args.token)
    if args.command == "proxies":
        return commands.proxies(client, args.as_json, out)
    if args.command == "logs":
        path = commands.log_path(None if args.data_dir else client, args.data_dir, args.name, args.stderr)
        return commands.show_log(path, args.lines, args.follow, out)
    if args.command == "restart":
        return commands.restart(client, args.name, args.restart_all, args.timeout, out)
    if args.command == "reload":
        return commands.reload(client, out)
    if args.command == "leave":
        return commands.leave(client, out)
    if args.command == "intention":
        return connect_commands.intention(args, client, out)
    if args.command == "query":
        return connect_commands.query(args, client, out)
    raise UsageError(f"unknown command {args.command!r}")


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
