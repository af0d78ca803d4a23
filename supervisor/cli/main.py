"""``proxy-supervisor``: parse the command line, run one command, map errors to exit codes.

Exit codes: 0 ok, 1 runtime error, 2 usage or configuration error. Only this module
prints errors; everything below raises typed exceptions. Flags use Consul's single-dash
spelling (``-config-dir``); the double-dash spelling works too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from supervisor.cli import commands, connect_commands
from supervisor.cli.client import AgentClient
from supervisor.errors import ConfigError, SupervisorError, UsageError
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
        from supervisor.agent import Agent, AgentOptions

        options = AgentOptions(
            config_files=tuple(args.config_files),
            config_dirs=tuple(args.config_dirs),
            flags=_agent_flags(args),
            dev=args.dev,
        )
        return Agent(options).run()
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
