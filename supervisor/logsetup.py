"""The agent's own log: Consul-style levels, plain or JSON lines, stderr or a file.

Proxy output never goes here; it goes to the proxies' own files in data_dir.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
from typing import Any

from supervisor.levels import NAMES, TRACE, numeric

ROOT = "supervisor"


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _component(record: logging.LogRecord) -> str:
    return record.name.rsplit(".", 1)[-1]


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = NAMES.get(record.levelno, record.levelname)
        text = f"{_timestamp(record)} [{level}] {_component(record)}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "@timestamp": _timestamp(record),
            "@level": NAMES.get(record.levelno, record.levelname).lower(),
            "@module": _component(record),
            "@message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


LOG_FILE_MODE = 0o600  # the agent's log names proxies, addresses and errors: its user's only


def private_file(path: str) -> int:
    """Open ``path`` for appending, created 0600 (an older, looser file is tightened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_FILE_MODE)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, LOG_FILE_MODE)
    return fd


class _Private(logging.FileHandler):
    """Every file a log handler opens (the first and each after a rotation) is 0600."""

    def _open(self) -> Any:
        os.close(private_file(self.baseFilename))
        return super()._open()


class PrivateWatchedFileHandler(_Private, logging.handlers.WatchedFileHandler):
    pass


class PrivateRotatingFileHandler(_Private, logging.handlers.RotatingFileHandler):
    pass


class KeepAllRotatingHandler(PrivateRotatingFileHandler):
    """Size rotation that never deletes (Consul's ``log_rotate_max_files = 0``): the full
    file is renamed to ``<name>.<UTC timestamp>`` and a new one is started."""

    def doRollover(self) -> None:
        if self.stream:
            self.stream.close()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        if os.path.exists(self.baseFilename):
            os.rename(self.baseFilename, f"{self.baseFilename}.{stamp}")
        self.stream = self._open()


def file_handler(path: str, rotate_bytes: int, rotate_max_files: int) -> logging.Handler:
    """The agent's log file. Without a size limit it is reopened when moved away, so an
    external logrotate (create or copytruncate) works; with one, the agent rotates it:
    ``rotate_max_files`` > 0 keeps that many (``.1`` newest), 0 keeps all (timestamped),
    -1 keeps none."""
    if rotate_bytes <= 0:
        return PrivateWatchedFileHandler(path)
    if rotate_max_files == 0:
        return KeepAllRotatingHandler(path, maxBytes=rotate_bytes)
    return PrivateRotatingFileHandler(path, maxBytes=rotate_bytes, backupCount=max(rotate_max_files, 0))


def configure_logging(
    level: str,
    *,
    json_lines: bool = False,
    log_file: str | None = None,
    rotate_bytes: int = 0,
    rotate_max_files: int = 0,
) -> None:
    logging.addLevelName(TRACE, "TRACE")
    logger = logging.getLogger(ROOT)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    handler: logging.Handler
    if log_file:
        handler = file_handler(log_file, rotate_bytes, rotate_max_files)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger(ROOT).setLevel(numeric(level))
