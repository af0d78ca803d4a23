"""``proxy-supervisor convert FILE|DIR...``: managed proxies to ``sidecar_service``
definitions, in each input's own format (the rewriting is ``supervisor.config.convert``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from supervisor.cli.dispatch import flag
from supervisor.config.build import build_config
from supervisor.config.convert import convert_document
from supervisor.config.formats import format_for, parse_text
from supervisor.config.limits import MAX_FILE_BYTES, LimitExceeded, loads_json
from supervisor.config.sources import Source
from supervisor.config.writers import WriteError, dump
from supervisor.errors import ConfigError, UsageError


def _files(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if format_for(name) and os.path.isfile(full) and ".sidecar." not in name:
                    yield full
        elif not os.path.exists(path):
            raise UsageError(f"{path}: no such file or directory")
        elif not os.path.isfile(path):
            raise UsageError(f"{path}: not a regular file")
        elif format_for(path) is None:
            raise UsageError(f"{path}: not a config file (.json, .hcl or .toml)")
        else:
            yield path


def _allocated_ports(data_dir: str | None) -> dict[str, int]:
    """The ports the agent assigned to managed proxies (data_dir/proxy/allocations.json)."""
    if not data_dir:
        return {}
    path = os.path.join(data_dir, "proxy", "allocations.json")
    try:
        if not os.path.isfile(path):
            raise ValueError("not a regular file")
        with open(path, "rb") as handle:
            proxies = loads_json(handle.read(MAX_FILE_BYTES + 1)).get("Proxies", {})
        ports = {str(pid): entry["Port"] for pid, entry in proxies.items() if entry.get("PortAuto") is True}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, LimitExceeded) as exc:
        raise UsageError(f"{path}: cannot read the assigned ports ({exc}); run as the agent's user") from None
    bad = [pid for pid, port in ports.items() if type(port) is not int or not 0 < port < 65536]
    if bad:
        raise UsageError(f"{path}: the port of {bad[0]} is not a port number; the file is damaged")
    return ports


def beside(path: str, fmt: str) -> str:
    """Where ``-write`` puts the converted file: ``web.json`` -> ``web.sidecar.json``."""
    return path[: -len(fmt) - 1] + f".sidecar.{fmt}"


def convert(args: argparse.Namespace, out: TextIO) -> int:
    if not args.paths:
        raise UsageError("convert needs at least one config file or directory")
    allocated = _allocated_ports(args.data_dir)
    files = list(_files(args.paths))
    total = 0
    for path in files:
        fmt = format_for(path)
        assert fmt is not None
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError.single(path, "", f"cannot be read: {exc}") from None
        document = parse_text(text, fmt, path)
        build_config([Source(path, fmt, text)], {"data_dir": "/convert"})  # as valid as the agent needs
        result = convert_document(document, allocated)
        if not result.converted:
            sys.stderr.write(f"{path}: no managed proxies to convert\n")
            continue
        total += len(result.converted)
        written = _written(result.document, fmt, path)
        for note in result.notes:
            sys.stderr.write(f"{path}: {note}\n")
        if args.write:
            target = beside(path, fmt)
            try:
                with open(target, "w" if args.force else "x", encoding="utf-8") as handle:
                    handle.write(written)
            except FileExistsError:
                raise UsageError(f"{target} exists already; pass -force to replace it") from None
            except OSError as exc:
                raise UsageError(f"cannot write {target}: {exc}") from None
            sys.stderr.write(
                f"{path}: {len(result.converted)} service(s) converted, written to {target}; replace "
                f"{os.path.basename(path)} with it (both in one config dir define the services twice)\n"
            )
        else:
            if len(files) > 1:
                sys.stderr.write(f"==> {path}: {len(result.converted)} service(s) converted\n")
            out.write(written)
    if not total:
        sys.stderr.write("nothing converted: no service has connect.proxy\n")
    return 0


def _written(document: Any, fmt: str, path: str) -> str:
    """The converted document as text, checked: read back it must be the same document,
    and it must load as the original did (a stand-in data_dir: a drop-in often leaves it to
    another file)."""
    try:
        text = dump(document, fmt)
        same = parse_text(text, fmt, path) == _plain(document)
    except (WriteError, ConfigError, ValueError, TypeError) as exc:
        same, text = False, str(exc)
    if not same:
        raise ConfigError.single(
            path,
            "",
            f"the converted document cannot be written back as {fmt.upper()} unchanged; "
            "convert a JSON copy of this file instead",
        )
    try:
        build_config([Source(path, fmt, text)], {"data_dir": "/convert"})
    except ConfigError as exc:
        problems = "; ".join(str(p) for p in exc.problems)
        sys.stderr.write(f"{path}: warning: the converted file does not validate: {problems}\n")
    return text


def _plain(value: Any) -> Any:
    """What a parser gives back for ``value`` (repeated HCL blocks are lists)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "convert", help="turn managed proxies (connect.proxy) into sidecar_service definitions"
    )
    parser.add_argument("paths", nargs="*", metavar="FILE|DIR")
    flag(
        parser,
        "write",
        action="store_true",
        help="write NAME.sidecar.EXT beside each file instead of printing",
    )
    flag(parser, "force", action="store_true", help="with -write: replace an earlier NAME.sidecar.EXT")
    flag(
        parser,
        "data-dir",
        dest="data_dir",
        metavar="DIR",
        help="keep the ports the agent assigned (its data_dir)",
    )
    parser.set_defaults(handler=convert)
