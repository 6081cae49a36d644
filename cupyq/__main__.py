"""``python -m cupyq``: the command line (see :mod:`cupyq.cli`)."""

from cupyq.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
