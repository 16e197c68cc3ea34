"""Replicated writes started without a task: the primary's side of the started path.

A server session starts each WRITE on its volume's stack (``Fence → Replicated``) from its
reader, under the session's :class:`~dst.block.Plug`, and answers it from the completion
callback — the shape the NBD bridge has over RemoteVolume (``dst/block/layer.py``).  For a
plain protocol C write with the peer connected, :func:`start_write` does what
``Replicated._write_through`` does in a task, in the same order, without waiting for anything:

1. the write's range, if no write in flight overlaps it (``RangeLocks.hold_nowait``);
2. its extents, if they are active on disk already (``ActiveWrites.begin_nowait``: no
   activity log commit is needed);
3. the local write, if the store completes it at once (``submit_nowait``: the page cache);
4. the peer's command, started under the plug — it leaves with the others the reader started
   in the same pass, in one gathered write, when the reader flushes the plug;
5. when the peer answers, the range and extents are released and the write completes; if the
   peer failed, the range is marked in the bitmap and flushed first, in a task (the
   degraded write of ``Replicated._degrade``), as the task path does.

If any of 1-3 cannot be done at once, what was taken is given back, nothing was written, and
the write runs in a task as ``Replicated.submit`` (None here; the caller does that).  So is
everything else: READ, FLUSH, TRIM, WRITE_ZEROES, FUA and PREFLUSH writes, protocols A and
B, a disconnected peer, and chaos builds (their crash points and broken modes live on the
task path).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import trio

from dst import chaos
from dst.block import Bio, BioFlags, Completion, Op, Plug
from dst.errors import BlockError

if TYPE_CHECKING:
    from dst.client.commands import Transaction
    from dst.replication.layer import Replicated

__all__ = ["start_write"]

# Tested per write: int & int, not IntFlag's slow __and__ (dst/client/remote.py does the same).
_NOT_STARTED = int(BioFlags.FUA | BioFlags.PREFLUSH)


async def start_write(layer: Replicated, bio: Bio, plug: Plug | None) -> Completion | None:
    """Start ``bio`` (valid: checked at the edge) on both sides without a task, or None with
    nothing done (module docstring)."""
    if (
        bio.op is not Op.WRITE
        or int(bio.flags) & _NOT_STARTED
        or layer.protocol != "C"
        or chaos.ARMED
        or chaos.BROKEN
        or not layer.peer.connected
    ):
        return None
    nowait = getattr(layer.local, "submit_nowait", None)
    if nowait is None:
        return None
    offset, length = bio.offset, bio.length
    hold = layer._locks.hold_nowait(offset, offset + length)
    if hold is None:
        return None
    write = _Write(layer, bio, hold)
    if not layer._active.begin_nowait(offset, length):
        layer._locks.release(hold)
        return None
    try:
        written = nowait(bio)
    except BlockError:
        write.release()
        raise
    if not written:
        write.release()
        return None
    try:
        txn = await layer.peer.start(bio.with_failfast(False), plug)  # the link's own rules
    except BaseException as exc:
        # Written here, not sent: a degraded write (a BlockError), or one cut short by
        # cancellation — marked all the same, so the peer gets it by resync.
        error = exc if isinstance(exc, BlockError) else BlockError(errno.EIO, "not sent")
        write.peer_failed(error)
        if not isinstance(exc, BlockError):
            raise
        return write
    layer.writes_started += 1
    txn.then(lambda: write.peer_done(txn))
    return write


class _Write(Completion):
    """One started write, from its range lock to its completion."""

    __slots__ = ("_bio", "_hold", "_layer")

    def __init__(self, layer: Replicated, bio: Bio, hold: tuple[int, int, trio.Event]) -> None:
        super().__init__()
        self._layer, self._bio, self._hold = layer, bio, hold

    def release(self) -> None:
        """Give back the range and the extents (the write is safe, or was never issued)."""
        self._layer._locks.release(self._hold)
        self._layer._active.end(self._bio.offset, self._bio.length)

    def peer_done(self, txn: Transaction) -> None:
        """The peer's callback: both sides have the write, or the peer failed it."""
        if txn.error is not None:
            self.peer_failed(txn.error)
            return
        self._layer._note_unflushed(self._bio)
        self.release()
        self.finish()

    def peer_failed(self, error: BlockError) -> None:
        tasks = self._layer._behind
        if tasks is None:  # the layer is shutting down: the write fails
            self.release()
            self.finish(error)
            return
        tasks.start_soon(self._degrade, error)

    async def _degrade(self, why: BlockError) -> None:
        """Mark the range the peer lacks, durably, then complete the write — as the task
        path does before it acknowledges a degraded write."""
        error: BlockError | None = why  # until the range is marked
        try:
            await self._layer._degrade(self._bio, why)
            error = None
        except BlockError as exc:
            error = exc
        finally:
            self.release()
            self.finish(error)
