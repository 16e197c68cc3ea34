"""active_writes: hold a write's extents active in an ActivityLog while it is in flight.

Shared by the layers that write one range to several places — Replicated (local and peer) and
the Mirror (every leg) — so that after a crash of the writer the extents that may differ
between the copies are known (:mod:`dst.replication.activity_log`).  The extents are active
*on disk* before the write is issued; the references are dropped when the write is safe
everywhere (complete, or marked and flushed in a dirty bitmap that covers it from then on).
When every slot holds a write in flight, the next write waits for one to end.
"""

from __future__ import annotations

import trio

from dst.replication.activity_log import ActivityLog, ActivityLogFullError

__all__ = ["ActiveWrites"]


class ActiveWrites:
    """An ActivityLog (or None: nothing to do) and the event writers wait on for a slot."""

    def __init__(self, al: ActivityLog | None) -> None:
        self.al = al
        self._freed = trio.Event()

    def writing(self, offset: int, length: int) -> _Writing:
        """``async with``: the write's extents active on disk for the block's duration."""
        return _Writing(self, offset, length)

    def begin_nowait(self, offset: int, length: int) -> bool:
        """Make the write's extents active without waiting — True if they were active on
        disk already (or there is no log) — or False with nothing changed; :meth:`end`
        after the write."""
        return self.al is None or self.al.begin_nowait(offset, length)

    def end(self, offset: int, length: int) -> None:
        """The write is safe everywhere: its extents' references go."""
        if self.al is not None:
            self._ended(offset, length)

    def _ended(self, offset: int, length: int) -> None:
        assert self.al is not None
        self.al.end(offset, length)
        self._freed.set()
        self._freed = trio.Event()


class _Writing:
    """One write's hold (a class, not a generator: this is on every write's path)."""

    __slots__ = ("_length", "_offset", "_owner")

    def __init__(self, owner: ActiveWrites, offset: int, length: int) -> None:
        self._owner, self._offset, self._length = owner, offset, length

    async def __aenter__(self) -> None:
        owner = self._owner
        al = owner.al
        if al is None:
            return
        while True:
            try:
                must_commit = al.begin(self._offset, self._length)
                break
            except ActivityLogFullError:
                await owner._freed.wait()  # every slot holds a write in flight
        if must_commit:
            try:
                await trio.to_thread.run_sync(al.commit)
            except BaseException:
                owner._ended(self._offset, self._length)
                raise

    async def __aexit__(self, *exc_info: object) -> None:
        if self._owner.al is not None:
            self._owner._ended(self._offset, self._length)
