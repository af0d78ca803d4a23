"""Configuration: find, parse, validate and merge Consul-style drop-ins into an AgentConfig."""

from supervisor.config.build import COMMAND_LINE, build_config, load_config
from supervisor.config.model import AgentConfig, ManagedProxyDef, ServiceDef, Upstream

__all__ = [
    "COMMAND_LINE",
    "AgentConfig",
    "ManagedProxyDef",
    "ServiceDef",
    "Upstream",
    "build_config",
    "load_config",
]
