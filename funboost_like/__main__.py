"""``python -m funboost_like``: the command line (see :mod:`funboost_like.cli`)."""

from funboost_like.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
