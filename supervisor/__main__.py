"""``python -m supervisor`` is the same as the ``proxy-supervisor`` command."""

from supervisor.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
