"""How the command line finds its command: every subparser carries a ``handler``.

A handler takes the parsed arguments and the output stream and returns the exit code;
commands that talk to a running agent are wrapped by ``with_client``, which builds the
API client from ``-http-addr``/``-token`` (or CONSUL_HTTP_ADDR/CONSUL_HTTP_TOKEN).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TextIO

from supervisor.cli.client import AgentClient
from supervisor.errors import UsageError

Handler = Callable[[argparse.Namespace, TextIO], int]
ClientCommand = Callable[[argparse.Namespace, AgentClient, TextIO], int]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit itself; raise instead
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def flag(parser: Any, name: str, **kwargs: Any) -> None:
    """Consul's single-dash spelling (``-config-dir``), with the double dash accepted too."""
    parser.add_argument(f"-{name}", f"--{name}", **kwargs)


def client_flags(parser: argparse.ArgumentParser) -> None:
    flag(
        parser,
        "http-addr",
        dest="http_addr",
        help="agent API address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)",
    )
    flag(parser, "token", help="ACL token (default: CONSUL_HTTP_TOKEN)")


def with_client(command: ClientCommand) -> Handler:
    def handler(args: argparse.Namespace, out: TextIO) -> int:
        return command(args, AgentClient(args.http_addr, args.token), out)

    return handler


def needs_subcommand(message: str) -> Handler:
    """The handler of a command group called without one of its subcommands."""

    def handler(_args: argparse.Namespace, _out: TextIO) -> int:
        raise UsageError(message)

    return handler
