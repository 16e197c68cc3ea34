"""The ``dst`` command (filled in as the peers land)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("dst: not yet", file=sys.stderr)
    return 2
