"""Conversions between the block model and wire messages (kept out of both sans-IO cores)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from dst.block import Bio, Limits

LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(Limits))


def limits_to_wire(limits: Limits) -> dict[str, int]:
    return {name: int(getattr(limits, name)) for name in LIMIT_FIELDS}


def limits_from_wire(raw: Mapping[str, int]) -> Limits:
    """Limits a peer announced; unknown keys are ignored (newer peers), and the result is
    validated so an impossible announcement is a ConfigError, not a hang later."""
    known = {k: int(v) for k, v in raw.items() if k in LIMIT_FIELDS}
    return Limits(**known).validate()


def page_runs(bio: Bio, page_size: int) -> tuple[tuple[int, int, int], ...]:
    """The seed-003 (size, offset) list of a bio's pages, run-length encoded as
    (size, offset, count).  A segment is described by where it sits in its page of
    ``page_size`` bytes; a segment that spans pages contributes one entry per page (counted
    in bulk: a partial first page, whole pages, a partial last page)."""
    runs: list[list[int]] = []

    def add(size: int, in_page: int, count: int) -> None:
        if runs and runs[-1][0] == size and runs[-1][1] == in_page:
            runs[-1][2] += count
        else:
            runs.append([size, in_page, count])

    for seg in bio.segments:
        # Position of the segment inside the buffer's page grid.
        pos, left = seg.offset, seg.length
        in_page = pos % page_size
        if in_page:
            size = min(left, page_size - in_page)
            add(size, in_page, 1)
            left -= size
        whole, tail = divmod(left, page_size)
        if whole:
            add(page_size, 0, whole)
        if tail:
            add(tail, 0, 1)
    return tuple((r[0], r[1], r[2]) for r in runs)
