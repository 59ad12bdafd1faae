"""``python -m influencekit``: the same command line as ``influencekit``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
