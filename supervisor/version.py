"""The single place the version lives (read by pyproject and the CLI)."""

__version__ = "0.1.0"
