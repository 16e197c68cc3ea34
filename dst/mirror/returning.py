"""The return of a mirror leg: the watcher that brings an ERRED leg back (seed 004).

A watcher per leg (:func:`watch_leg`, run by ``Mirror.run``) waits, for an ERRED leg, until a
probe without FAILFAST is answered (the leg answers again — however long that takes), then
until every request failed back from it has been answered or can no longer land
(``RemoteVolume.wait_orphans_settled``), then resyncs only the dirty extents
(:func:`~dst.replication.resync.copy_dirty_extents`) from IN_SYNC legs, and makes the leg
IN_SYNC.  A leg that fails during its resync is simply ERRED again.  A copy holds its extent's
range lock, so a write to it lands on every leg before or after the copy, never during.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import trio

from dst.block import Bio, Op
from dst.client.remote import RemoteVolume
from dst.errors import BlockError
from dst.mirror.legs import LegState
from dst.replication.resync import copy_dirty_extents

if TYPE_CHECKING:
    from dst.mirror.layer import Mirror

__all__ = ["RETRY_AFTER_S", "watch_leg"]

log = logging.getLogger("dst.mirror")

#: After a failed probe or an interrupted resync, wait this long before trying again.
RETRY_AFTER_S = 1.0


async def watch_leg(mirror: Mirror, i: int) -> None:
    """Forever: whenever leg ``i`` is ERRED, try to bring it back."""
    while True:
        if mirror.table.states[i] is LegState.ERRED:
            if not await _bring_back(mirror, i):
                await trio.sleep(RETRY_AFTER_S)
        else:
            await mirror.wait_changed()


async def _bring_back(mirror: Mirror, i: int) -> bool:
    """Probe leg ``i``, wait for its orphans, resync its dirty extents; True if IN_SYNC."""
    leg = mirror.legs[i]
    probe = memoryview(bytearray(mirror._limits.logical_block_size))
    try:
        # Without FAILFAST: waits, through reconnects, until the leg answers again.
        await leg.layer.submit(Bio.from_buffer(Op.READ, 0, probe))
    except BlockError:
        return False
    if leg.layer.size != mirror._size:
        # A leg that was down at start and turned out to be another size: never in sync.
        if leg.reason != "size mismatch":
            leg.reason = "size mismatch"
            log.error(
                "event=leg_size_mismatch leg=%s size=%d mirror_size=%d",
                leg.name,
                leg.layer.size,
                mirror._size,
            )
            mirror._note_change()
        return False
    if isinstance(leg.layer, RemoteVolume):
        await leg.layer.wait_orphans_settled()  # no stale write can land after a copy
    mirror.table.start_resync(i)
    started = trio.current_time()
    log.info("event=leg_resync_started leg=%s dirty=%d", leg.name, leg.bitmap.dirty_bytes)
    mirror._note_change()
    copied = 0
    interrupted = ""
    try:
        while leg.bitmap.dirty_bytes and mirror.table.states[i] is LegState.RESYNCING:
            copied += await copy_dirty_extents(
                leg.bitmap,
                mirror._size,
                lambda offset, view: _copy(mirror, i, offset, view),
                rate=mirror.resync_rate,
                progress=leg.progress,
            )
        error = await mirror._leg_io(i, Bio(Op.FLUSH, 0, 0))
        if error is not None:
            raise error
        await trio.to_thread.run_sync(leg.bitmap.flush)
    except* BlockError as group:
        interrupted = str(group.exceptions[0])
    if interrupted or not mirror.table.finish_resync(i):
        if mirror.table.states[i] is LegState.RESYNCING:
            mirror.table.on_error(i, True)  # a copy failed on the source side: retry later
        log.warning(
            "event=leg_resync_interrupted leg=%s bytes=%d reason=%r",
            leg.name,
            copied,
            interrupted or leg.reason,
        )
        mirror._note_change()
        return False
    leg.reason = ""
    log.info(
        "event=leg_resync_finished leg=%s bytes=%d seconds=%.2f",
        leg.name,
        copied,
        trio.current_time() - started,
    )
    mirror._note_change()
    return True


async def _copy(mirror: Mirror, i: int, offset: int, view: memoryview) -> None:
    """Copy one extent from an IN_SYNC leg to leg ``i`` and clear its bit, under the
    extent's range lock (a write to it lands on every leg before or after, never during)."""
    leg = mirror.legs[i]
    async with mirror._locks.locked(offset, offset + len(view)):
        if mirror.table.states[i] is not LegState.RESYNCING:
            raise BlockError(errno.ECANCELED, f"leg {leg.name} erred during its resync")
        await mirror._read(Bio.from_buffer(Op.READ, offset, view))
        error = await mirror._leg_io(i, Bio.from_buffer(Op.WRITE, offset, view))
        if error is not None:
            raise error
        leg.bitmap.clear(offset, len(view))
        leg.resynced_bytes += len(view)
