"""RangeLocks: hold a byte range of a device against every overlapping holder.

Layers that send one write to several places (Replicated: local and peer; Mirror: every leg)
must land overlapping writes in the same order everywhere, and a resync copy of an extent
must not interleave with a write to it.  Both are done by waiting (DRBD's conflict detection):
a holder of ``[start, end)`` waits until no overlapping holder is left, then holds it;
non-overlapping holders proceed in parallel.  Waiters are not queued fairly; a waiter that
loses the race simply waits again.  A holder that must not wait (a write started without a
task, ``dst/replication/started.py``) takes a range with :meth:`RangeLocks.hold_nowait` or
leaves it to one that can.
"""

from __future__ import annotations

import trio

__all__ = ["RangeLocks"]


class RangeLocks:
    """The ranges held right now, each with the event its waiters wait on."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    def locked(self, start: int, end: int) -> _Hold:
        """``async with``: hold [start, end) against every overlapping holder."""
        return _Hold(self._held, start, end)

    def hold_nowait(self, start: int, end: int) -> tuple[int, int, trio.Event] | None:
        """Hold [start, end) if no holder overlaps it, else None; give it back with
        :meth:`release`."""
        for s, e, _ in self._held:
            if s < end and start < e:
                return None
        entry = (start, end, trio.Event())
        self._held.append(entry)
        return entry

    def release(self, entry: tuple[int, int, trio.Event]) -> None:
        self._held.remove(entry)
        entry[2].set()

    def __len__(self) -> int:
        return len(self._held)


class _Hold:
    """One holding of a range (a class, not a generator: this is on every write's path)."""

    __slots__ = ("_entry", "_held")

    def __init__(self, held: list[tuple[int, int, trio.Event]], start: int, end: int) -> None:
        self._held = held
        self._entry = (start, end, trio.Event())

    async def __aenter__(self) -> None:
        start, end, _ = self._entry
        while True:
            busy = next((ev for s, e, ev in self._held if s < end and start < e), None)
            if busy is None:
                break
            await busy.wait()
        self._held.append(self._entry)

    async def __aexit__(self, *exc_info: object) -> None:
        self._held.remove(self._entry)
        self._entry[2].set()
