"""Versioned JSON documents in data_dir: the CA, intentions, prepared queries, API
registrations. One way to read and write them.

A document is ``{"Version": N, ...}``, written atomically (0600, parent 0700). Reading one
that is damaged raises ``CorruptStateError`` naming the file and what to do (an operator
must act: these are never silently replaced), one that cannot be read ``DataDirError``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from supervisor.errors import CorruptStateError, DataDirError
from supervisor.state.atomic import atomic_write


class Damaged(ValueError):
    """Raised by a document's reader for content it cannot use (becomes CorruptStateError)."""


def load_document(path: str, version: int, remedy: str) -> dict[str, Any] | None:
    """The document at ``path`` (None if there is none); ``remedy`` says what to do when
    it is damaged, for the error message."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataDirError(f"{path} cannot be read ({exc.strerror}); {remedy}") from exc
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise Damaged("not a JSON object")
        if data.get("Version") != version:
            raise Damaged(f"unknown version {data.get('Version')!r}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptStateError(f"{path} cannot be used ({exc}); {remedy}") from exc
    return data


def damaged(path: str, exc: BaseException, remedy: str) -> CorruptStateError:
    """The error for a document whose content a reader could not use."""
    return CorruptStateError(f"{path} cannot be used ({exc}); {remedy}")


def save_document(path: str, version: int, body: dict[str, Any], *, compact: bool = False) -> None:
    """Write ``{"Version": version, **body}`` atomically; raises DataDirError."""
    document = {"Version": version, **body}
    text = json.dumps(document, separators=(",", ":")) if compact else json.dumps(document, indent=1)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        atomic_write(path, text.encode(), mode=0o600)
    except OSError as exc:
        raise DataDirError(f"cannot write {path}: {exc.strerror}") from exc
