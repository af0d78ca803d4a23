"""proxy-supervisor: the per-host agent (config, supervision, persistence, HTTP API, CLI).

Consul's ``supervisor`` name is shared with supervisord's package: install this project in
its own virtual environment (or with pipx), never next to supervisord.
"""

from supervisor.version import __version__

__all__ = ["__version__"]
