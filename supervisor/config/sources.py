"""Find and read config sources: ``-config-file`` files and the drop-ins of ``-config-dir``s."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from supervisor.config.formats import format_for
from supervisor.config.limits import MAX_FILE_BYTES
from supervisor.errors import ConfigError, ConfigProblem


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
                continue  # a directory or a device that happens to be called *.json
        except FileNotFoundError:
            continue  # deleted since listdir, or a dangling symlink: it is simply not there
        except OSError:
            pass  # a symlink loop, say: reading it reports the problem with the file's name
        paths.append(path)
    return paths


def read_source(path: str) -> Source:
    fmt = format_for(path)
    if fmt is None:
        raise ConfigError.single(
            path, "", "unknown config format: the file name must end in .json, .hcl or .toml"
        )
    try:
        data = _read_regular_file(path)
    except FileNotFoundError:
        raise ConfigError.single(path, "", "config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError.single(path, "", "is a directory (use -config-dir for a directory)") from None
    except OSError as exc:
        raise ConfigError.single(path, "", f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError.single(
            path,
            "",
            f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; split it into several drop-ins",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError.single(path, "", f"not valid UTF-8 (byte {exc.start})") from None
    return Source(path, fmt, text)


def _read_regular_file(path: str) -> bytes:
    """Up to one byte past the size limit. Opened without blocking and checked to be a
    regular file first: a FIFO or a device named as a config file must not hang (or
    flood) the agent."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file (mode {stat.filemode(mode)})")
        return handle.read(MAX_FILE_BYTES + 1)


def collect_sources(
    config_files: Sequence[str], config_dirs: Sequence[str]
) -> tuple[list[Source], list[ConfigProblem]]:
    """Read every source, files first then directories (each in the order given).

    Returns what could be read and a problem for each source that could not, so the
    caller reports those together with whatever is wrong inside the readable ones.
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
    return sources, problems


def _unique(paths: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            result.append(path)
    return result
