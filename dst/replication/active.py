"""active_writes: hold a write's extents active in an ActivityLog while it is in flight.

Shared by the layers that write one range to several places — Replicated (local and peer) and
the Mirror (every leg) — so that after a crash of the writer the extents that may differ
between the copies are known (:mod:`dst.replication.activity_log`).  The extents are active
*on disk* before the write is issued; the references are dropped when the write is safe
everywhere (complete, or marked and flushed in a dirty bitmap that covers it from then on).
When every slot holds a write in flight, the next write waits for one to end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from dst.replication.activity_log import ActivityLog, ActivityLogFullError

__all__ = ["ActiveWrites"]


class ActiveWrites:
    """An ActivityLog (or None: nothing to do) and the event writers wait on for a slot."""

    def __init__(self, al: ActivityLog | None) -> None:
        self.al = al
        self._freed = trio.Event()

    @asynccontextmanager
    async def writing(self, offset: int, length: int) -> AsyncIterator[None]:
        al = self.al
        if al is None:
            yield
            return
        while True:
            try:
                must_commit = al.begin(offset, length)
                break
            except ActivityLogFullError:
                await self._freed.wait()  # every slot holds a write in flight
        try:
            if must_commit:
                await trio.to_thread.run_sync(al.commit)
            yield
        finally:
            al.end(offset, length)
            self._freed.set()
            self._freed = trio.Event()
