"""The command line's dispatch: every command and subcommand reaches a handler, groups
without a subcommand say which ones exist, and no command needs an agent to be parsed."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator

import pytest

from supervisor.cli import main
from supervisor.errors import UsageError


def _commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                path = f"{prefix} {name}".strip()
                yield path, child
                yield from _commands(child, path)


def test_the_parser_built_is_the_top_level_one() -> None:
    parser = main.build_parser()
    assert parser.prog == "proxy-supervisor"
    assert {name for name, _ in _commands(parser) if " " not in name} >= {
        "agent",
        "validate",
        "proxies",
        "logs",
        "restart",
        "reload",
        "leave",
        "intention",
        "query",
        "connect",
        "version",
    }


def test_every_command_and_subcommand_has_a_handler() -> None:
    missing = [
        name for name, parser in _commands(main.build_parser()) if parser.get_default("handler") is None
    ]
    assert missing == []


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.run([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.run(["version"]) == 0
    assert capsys.readouterr().out.startswith("proxy-supervisor ")


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["intention"], "create, delete, get, list, check or match"),
        (["query"], "create, list, delete or execute"),
        (["connect"], "proxy"),
    ],
)
def test_a_group_without_its_subcommand_names_them(argv: list[str], names: str) -> None:
    with pytest.raises(UsageError, match=names):
        main.run(argv)


def test_unknown_commands_and_flags_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="invalid choice: 'bogus'"):
        main.run(["bogus"])
    with pytest.raises(UsageError, match="unrecognized arguments: -nope"):
        main.run(["version", "-nope"])


def test_client_commands_take_the_agent_address_from_their_flags() -> None:
    unreachable = "127.0.0.1:9"  # discard: nothing listens there
    for argv in (["proxies"], ["reload"], ["intention", "list"], ["query", "list"], ["restart", "web"]):
        with pytest.raises(Exception, match=r"cannot reach the agent at http://127\.0\.0\.1:9") as caught:
            main.run([*argv, "-http-addr", unreachable])
        assert caught.type.__module__.startswith("supervisor"), argv


def test_logs_with_data_dir_reads_the_disk_without_an_agent(tmp_path) -> None:
    logs = tmp_path / "proxy" / "logs"
    logs.mkdir(parents=True)
    (logs / "web-proxy-stdout.log").write_text("one\ntwo\n")
    out = io.StringIO()
    args = main.build_parser().parse_args(["logs", "web", "-data-dir", str(tmp_path), "-n", "1"])
    assert args.handler(args, out) == 0
    assert out.getvalue() == "two\n"
