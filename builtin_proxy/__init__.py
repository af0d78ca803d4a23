"""The built-in Connect proxy, run by the agent as ``python -m builtin_proxy``."""
