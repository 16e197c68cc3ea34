"""RangeLocks: hold a byte range of a device against every overlapping holder.

Layers that send one write to several places (Replicated: local and peer; Mirror: every leg)
must land overlapping writes in the same order everywhere, and a resync copy of an extent
must not interleave with a write to it.  Both are done by waiting (DRBD's conflict detection):
a holder of ``[start, end)`` waits until no overlapping holder is left, then holds it;
non-overlapping holders proceed in parallel.  Waiters are not queued fairly; a waiter that
loses the race simply waits again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["RangeLocks"]


class RangeLocks:
    """The ranges held right now, each with the event its waiters wait on."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    @asynccontextmanager
    async def locked(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold [start, end) against every overlapping holder."""
        while True:
            busy = next((ev for s, e, ev in self._held if s < end and start < e), None)
            if busy is None:
                break
            await busy.wait()
        entry = (start, end, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()

    def __len__(self) -> int:
        return len(self._held)
