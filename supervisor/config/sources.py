"""Find and read config sources: ``-config-file`` files and the drop-ins of ``-config-dir``s."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from supervisor.config.formats import format_for
from supervisor.errors import ConfigError, ConfigProblem

MAX_CONFIG_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Source:
    """The text of one config file (``name`` is the path shown in messages)."""

    name: str
    fmt: str
    text: str


def is_config_name(filename: str) -> bool:
    """Drop-ins are ``*.json``, ``*.hcl`` and ``*.toml``; dotfiles (editor locks, swap files,
    half-written temp files of atomic saves) never count."""
    return not filename.startswith(".") and format_for(filename) is not None


def files_in_dir(directory: str) -> list[str]:
    """Config files directly in ``directory``, in lexical order (later files win)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        raise ConfigError.single(directory, "", "config directory does not exist") from None
    except NotADirectoryError:
        raise ConfigError.single(directory, "", "is not a directory (use -config-file for a file)") from None
    except OSError as exc:
        raise ConfigError.single(directory, "", f"cannot read directory: {exc.strerror}") from None
    paths = []
    for name in names:
        if not is_config_name(name):
            continue
        path = os.path.join(directory, name)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                continue
        except FileNotFoundError:
            continue  # deleted between listdir and stat: it is simply not there any more
        paths.append(path)
    return paths


def read_source(path: str) -> Source:
    fmt = format_for(path)
    if fmt is None:
        raise ConfigError.single(
            path, "", "unknown config format: the file name must end in .json, .hcl or .toml"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError.single(path, "", "config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError.single(path, "", "is a directory (use -config-dir for a directory)") from None
    except OSError as exc:
        raise ConfigError.single(path, "", f"cannot read file: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError.single(path, "", f"file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError.single(path, "", f"not valid UTF-8 (byte {exc.start})") from None
    return Source(path, fmt, text)


def collect_sources(config_files: Sequence[str], config_dirs: Sequence[str]) -> list[Source]:
    """Read every source, files first then directories (each in the order given).

    All unreadable sources are reported together in one ConfigError.
    """
    paths: list[str] = list(config_files)
    problems: list[ConfigProblem] = []
    for directory in config_dirs:
        try:
            paths.extend(files_in_dir(directory))
        except ConfigError as exc:
            problems.extend(exc.problems)
    sources: list[Source] = []
    for path in _unique(paths):
        try:
            sources.append(read_source(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return sources


def _unique(paths: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            result.append(path)
    return result
