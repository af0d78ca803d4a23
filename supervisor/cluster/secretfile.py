"""Reading a secret the operator keeps in a file (the etcd password, the CA key-encryption key)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("supervisor.cluster")


def read_secret_file(path: str, limit: int = 4096) -> bytes:
    """The file's first ``limit`` bytes; warns when others than its owner may read it.
    Raises ``OSError`` (the caller names the setting)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_mode & 0o077:
            log.warning("%s can be read by others than its owner: chmod 600 it", path)
        return handle.read(limit)
