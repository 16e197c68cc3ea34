"""copy_dirty_extents: the resync loop shared by replication and the mirror.

Both keep a :class:`~dst.replication.bitmap.DirtyBitmap` of what a copy lacks (a replica, a
mirror leg) and bring it back by copying only the marked extents from a good source.  The
*copy* of one extent is the caller's (read from where, write to where, under which lock, then
``bitmap.clear``); this module runs the copies: RESYNC_PARALLEL workers over a snapshot of the
dirty extents (one copy at a time leaves the link idle between them), a token bucket holding
the average rate to ``rate`` bytes/s, and a bitmap flush every RESYNC_FLUSH_EVERY bytes, so a
crash mid-resync repeats little.  Progress goes into a :class:`ResyncProgress` the caller
shows in its status.  The first failed copy ends the pass (nursery: the others are
cancelled) and propagates as an ExceptionGroup; the caller decides what failure means.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from dst import chaos
from dst.replication.bitmap import DirtyBitmap

__all__ = ["RESYNC_FLUSH_EVERY", "RESYNC_PARALLEL", "ResyncProgress", "copy_dirty_extents"]

#: Extent copies in flight during a resync.
RESYNC_PARALLEL = 8
#: Default rate cap, bytes/s (``--resync-rate``): leaves most of a gigabit link and disk to
#: the workload.  Replication and the mirror share it.
DEFAULT_RESYNC_RATE = 64 << 20
#: Flush cleared bits to disk after this many resynced bytes (a lost clear costs a re-copy).
RESYNC_FLUSH_EVERY = 64 << 20

#: Copies ``view``'s length of bytes at ``offset`` and clears the extent's bit.
CopyExtent = Callable[[int, memoryview], Awaitable[None]]


@dataclass(slots=True)
class ResyncProgress:
    """The running (or last) pass: bytes to copy, copied, and the average rate."""

    total_bytes: int = 0
    done_bytes: int = 0
    rate_bytes_s: float = 0.0
    running: bool = False


async def copy_dirty_extents(
    bitmap: DirtyBitmap,
    size: int,
    copy: CopyExtent,
    *,
    rate: int,
    progress: ResyncProgress,
    parallel: int = RESYNC_PARALLEL,
) -> int:
    """Copy every extent dirty in ``bitmap`` now with ``copy``; returns the bytes copied.
    The bitmap is flushed at the end (after the caller's own FLUSH of the target, if any,
    the caller flushes it again to make the clears durable)."""
    step = bitmap.extent_size
    extents = iter(
        [
            pos
            for offset, length in list(bitmap.dirty_extents())
            for pos in range(offset, min(offset + length, size), step)
        ]
    )
    progress.total_bytes = bitmap.dirty_bytes
    progress.done_bytes = 0
    progress.rate_bytes_s = 0.0
    progress.running = True
    started = trio.current_time()
    since_flush = 0

    async def worker() -> None:
        nonlocal since_flush
        buf = memoryview(bytearray(step))
        for pos in extents:
            n = min(step, size - pos)
            await copy(pos, buf[:n])
            progress.done_bytes += n
            if chaos.ARMED:
                chaos.crash_point("resync.mid")
            since_flush += n
            elapsed = trio.current_time() - started
            progress.rate_bytes_s = progress.done_bytes / elapsed if elapsed else 0.0
            ahead = progress.done_bytes / rate - elapsed  # token bucket
            if ahead > 0:
                await trio.sleep(ahead)
            if since_flush >= RESYNC_FLUSH_EVERY:
                since_flush = 0
                await trio.to_thread.run_sync(bitmap.flush)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
    finally:
        progress.running = False
    return progress.done_bytes
