"""``python -m immutorch``: see ``python -m immutorch --help``."""

from ._cli import main

raise SystemExit(main(prog="python -m immutorch"))
