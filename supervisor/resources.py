"""Process resources shared by the agent and the built-in proxy."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("supervisor.resources")


def raise_open_file_limit() -> None:
    """Every blocking query, pidfd and proxied connection holds a descriptor: lift the soft
    limit (often 1024) to the hard one, as network servers do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
