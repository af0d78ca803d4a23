"""The built-in proxy's log lines (``builtin_proxy/__main__.py``)."""

from __future__ import annotations

import logging
import sys

from builtin_proxy.__main__ import _Formatter


def test_a_line_names_level_and_part_and_an_internal_error_carries_its_traceback() -> None:
    formatter = _Formatter()
    plain = logging.LogRecord(
        "builtin_proxy.public", logging.WARNING, __file__, 1, "denied %s", ("web",), None
    )
    assert formatter.format(plain).endswith(" [WARN] public: denied web")
    try:
        raise ValueError("what went wrong")
    except ValueError:
        failure = logging.LogRecord(
            "builtin_proxy.loop", logging.ERROR, __file__, 1, "internal error", None, sys.exc_info()
        )
    lines = formatter.format(failure).splitlines()
    assert lines[0].endswith(" [ERROR] loop: internal error")
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: what went wrong"
