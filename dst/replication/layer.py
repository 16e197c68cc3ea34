"""Replicated: the primary's block layer — every write on the local store and on the peer.

```
 Session → Replicated ─┬─ local: FileStore
                       └─ peer:  RemoteVolume(secondary, role replica, no resend)
```

Protocol C (DRBD's): a write is acknowledged when both the local store and the peer have
completed it; FLUSH and FUA complete when they are stable on both.  Reads are served locally.

**Segmentation.**  The peer link's limits are what the secondary's volume advertises (max
bytes, and a boundary if its store has one: ``dst/replication/peer.py``), so the generic
splitter cuts every bio sent to the peer into commands that fit, whatever its shape (seed
000) — one transaction, pipelined.  This layer takes any bio the local store takes, and that
is what it advertises upward: the peer's limits stay at the peer link instead of cutting a
client's write on every hop above it.  (Older DRBD cut every request at 32 KiB; dst did too
until a 1 MiB write cost the secondary 32 requests, three times its CPU per byte.)

**Write ordering.**  Overlapping writes must land in the same order on both replicas.  A write
waits until no in-flight write overlaps its range before it is issued to both sides (DRBD's
conflict detection, done by waiting); non-overlapping writes proceed in parallel.

**Degraded mode.**  When the peer is unreachable (or a peer write fails), the range is marked
in the persistent dirty bitmap, the bitmap is flushed, and only then is the write
acknowledged: an acknowledged write the peer lacks is always on disk in the bitmap.

**Activity log.**  Before a write is issued its extents are active in the on-disk activity
log; after a crash of the primary, the extents the log still holds are marked dirty at start
(``Volume.open``), so writes that reached one side and not the other are resynced.

**Resync.**  A background task waits for the peer link; while dirty extents exist and the
link is up, it copies each one (read locally under the extent's write lock, write to the
peer), clears its bit, and flushes the bitmap now and then; a token bucket bounds the rate.
Progress and rate are in ``statistics()``.  The link's handshake and the resync live in
:mod:`dst.replication.relink`.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, replace
from functools import partial

import trio

from dst import chaos
from dst.block import Bio, BioFlags, Limits, Op, split
from dst.block.layer import BlockLayer, Pending, Plug, submit_in_task
from dst.block.rangelock import RangeLocks
from dst.client.remote import RemoteVolume
from dst.errors import BlockError, ConfigError
from dst.replication import relink
from dst.replication.active import ActiveWrites
from dst.replication.activity_log import ActivityLog
from dst.replication.resync import DEFAULT_RESYNC_RATE, ResyncProgress
from dst.replication.started import start_write
from dst.replication.sync import ReplicaState

log = logging.getLogger("dst.replication")

#: DRBD's replication protocols: when a write is acknowledged.  C: done on both sides.
#: B: done locally and received by the peer.  A: done locally and sent to the peer.
#: FLUSH, FUA and PREFLUSH mean stable on both under every protocol.
PROTOCOLS = ("A", "B", "C")
#: Extents tracked as "completed by the peer, not yet flushed" before tracking gives up and a
#: failed peer FLUSH marks the whole volume (65536 x 64 KiB = 4 GiB written without a FLUSH).
UNFLUSHED_CAP = 65536


@dataclass(frozen=True, slots=True)
class ReplicationStatistics:
    peer_connected: bool
    out_of_sync_bytes: int
    #: Nothing out of sync *and* the resync concluded in both sides' generation ids (the
    #: peer adopted ours): an empty bitmap alone can still mean "adopt not yet sent".
    peer_up_to_date: bool
    resync_total_bytes: int
    resync_done_bytes: int
    resync_rate_bytes_s: float
    resynced_bytes: int
    degraded_writes: int
    degraded_bytes: int


class Replicated:
    def __init__(
        self,
        local: BlockLayer,
        peer: RemoteVolume,
        state: ReplicaState,
        *,
        activity_log: ActivityLog | None = None,
        resync_rate: int = DEFAULT_RESYNC_RATE,
        protocol: str = "C",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"replication protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.local = local
        self.peer = peer
        self.state = state
        self.bitmap = state.bitmap
        # Every new link is handshaken (generation ids, sync.py) before it takes a write.
        peer.on_link = partial(relink.handshake, self)
        self.al = activity_log
        self._active = ActiveWrites(activity_log)
        # Extents the peer completed since its last successful FLUSH: in its page cache, not
        # yet known stable.  If the peer's FLUSH fails they are marked out of sync.
        self._unflushed: set[int] = set()
        self._unflushed_overflow = False
        # Extents the current resync pass copied (bit cleared) that the peer holds only in its
        # page cache until the pass's final FLUSH: a relink before it marks them again.
        self._resync_unflushed: set[int] = set()
        self.resync_rate = resync_rate
        self._locks = RangeLocks()
        self._progress = ResyncProgress()
        self._resynced = 0
        self._degraded_writes = 0
        self.writes_started = 0  # writes started without a task (started.py)
        self._degraded_bytes = 0
        # Protocols A and B: writes finish on the peer after their acknowledgement, in tasks
        # of this nursery (opened by run_resync); a FLUSH waits for those issued before it.
        # Started bios (start) that must wait run in it too.
        self._behind: trio.Nursery | None = None
        self._behind_done: set[trio.Event] = set()

    @property
    def limits(self) -> Limits:
        # What this layer takes: what the local store takes.  The peer's limits are this
        # layer's own business — its link splits every bio it sends there — so they are not
        # pushed onto the layers above (a peer's boundary would cut a client's write into
        # pieces on every hop before it got here).
        return self.local.limits

    @property
    def size(self) -> int:
        return self.local.size

    # -- I/O ---------------------------------------------------------------------------------

    async def submit(self, bio: Bio) -> None:
        if bio.op is Op.READ:
            await self.local.submit(bio)
            return
        if bio.op is Op.FLUSH:
            await self._flush(bio)
            return
        pieces = split(bio, self.local.limits)  # the peer link splits to the peer itself
        if len(pieces) == 1:  # the common case: no nursery, no task
            await self._write(pieces[0])
            return
        async with trio.open_nursery() as nursery:
            for piece in pieces:
                nursery.start_soon(self._write, piece)

    @property
    def can_start(self) -> bool:
        """Started bios need the layer's task nursery (run_resync's)."""
        return self._behind is not None

    async def start(self, bio: Bio, plug: Plug | None = None) -> Pending:
        """Start ``bio`` (valid: checked at the edge) and call back on its completion: a
        plain protocol C write without a task (``dst/replication/started.py``), anything
        else in a task of the layer's own running :meth:`submit`."""
        started = await start_write(self, bio, plug)
        if started is not None:
            return started
        return await submit_in_task(self, bio, self._behind, plug, "replication")

    def submit_nowait(self, bio: Bio) -> bool:
        """A READ the local store completes at once (reads are local, as in submit); every
        other bio goes to both sides, so it is declined."""
        if bio.op is not Op.READ:
            return False
        nowait = getattr(self.local, "submit_nowait", None)
        return nowait is not None and bool(nowait(bio))

    async def _write(self, piece: Bio) -> None:
        if piece.flags & BioFlags.PREFLUSH:
            await self._drain_behind()
        early = self.protocol != "C" and not piece.flags & BioFlags.FUA
        if chaos.BROKEN and chaos.broken("ack-before-sync"):
            early = True
        if not early or self._behind is None:
            await self._write_through(piece)
            return
        ready, done, failed = trio.Event(), trio.Event(), list[BlockError]()
        self._behind_done.add(done)
        self._behind.start_soon(self._write_behind, piece, ready, done, failed)
        await ready.wait()
        if failed:
            raise failed[0]

    async def _write_behind(
        self, piece: Bio, ready: trio.Event, done: trio.Event, failed: list[BlockError]
    ) -> None:
        """Protocols A and B: ``ready`` is set once the local write is done and the peer has
        the request on the wire (A) or in memory (B); the rest — the peer's completion, the
        bitmap if it fails, the activity log — runs on after the acknowledgement."""
        try:
            await self._write_through(piece, ready)
        except BlockError as exc:
            failed.append(exc)
        except trio.Cancelled:
            # Shutting down with the peer's side unfinished: it may lack an acknowledged
            # write, which the activity log will not recall after a clean stop.
            with trio.CancelScope(shield=True):
                if ready.is_set():
                    await self.state.before_degraded_ack()
                    if self.bitmap.mark(piece.offset, piece.length):
                        await trio.to_thread.run_sync(self.bitmap.flush)
            raise
        finally:
            ready.set()
            done.set()
            self._behind_done.discard(done)

    async def _drain_behind(self) -> None:
        """Wait for every write acknowledged early before now to complete on the peer."""
        for done in list(self._behind_done):
            await done.wait()

    async def _write_through(self, piece: Bio, ready: trio.Event | None = None) -> None:
        async with (
            self._locks.locked(piece.offset, piece.offset + piece.length),
            # Active on disk before the write is issued; ended when it is on both sides, or
            # marked and flushed in the bitmap.
            self._active.writing(piece.offset, piece.length),
        ):
            await self._both(piece, ready)

    async def _both(self, bio: Bio, ready: trio.Event | None = None) -> BlockError | None:
        """Run a bio on both sides; a peer failure degrades (bitmap), a local one fails.
        Returns the peer's error, if any (for FLUSH, which has no range to degrade).
        ``ready`` (protocols A and B) is set when the local side succeeded and the peer's
        side reached its early stage or ended."""
        if ready is None and self.peer.connected and not chaos.ARMED:
            return await self._both_in_turn(bio)
        peer_error: BlockError | None = None
        local_error: BlockError | None = None
        local_ok, peer_early = False, trio.Event()
        # Broken build: acknowledge once local, whatever the peer (protocol C acts like A
        # without even the send) — the checker must catch the lost write after a failover.
        ack_local = chaos.BROKEN and ready is not None and chaos.broken("ack-before-sync")
        peer_bio = bio.with_failfast(False)
        if ack_local and bio.op is Op.WRITE:
            # ...but with the write's own bytes: the acknowledged request's buffers go back
            # to its session's pool while this copy may still wait to be sent.
            copy = Bio.from_buffer(Op.WRITE, bio.offset, bio.data())
            peer_bio = replace(peer_bio, segments=copy.segments)
        # Chaos only: with the crash point armed the peer's side waits for the local write,
        # so the kill lands after the local write and before anything was sent.
        local_first: trio.Event | None = None
        if chaos.ARMED and bio.op is not Op.FLUSH and chaos.armed("primary.after-local-write"):
            local_first = trio.Event()

        def check_ready() -> None:
            if ready is not None and local_ok and (ack_local or peer_early.is_set()):
                ready.set()

        async def on_peer() -> None:
            nonlocal peer_error
            if local_first is not None:
                await local_first.wait()
            try:
                stage = "sent" if self.protocol == "A" else "received"
                # A client's FAILFAST is about its own link; the replica link keeps its own
                # rules (no resend, degrade on failure), not a client's deadline.
                await self.peer.submit(peer_bio, early=peer_early, stage=stage)
            except BlockError as exc:
                peer_error = exc
                if ready is not None:  # degrade (bitmap, generation) before the ack
                    await self._degrade(bio, exc)
            finally:
                peer_early.set()

        async def on_local() -> None:
            nonlocal local_error, local_ok
            try:
                await self.local.submit(bio)
                local_ok = True
                if local_first is not None:
                    chaos.crash_point("primary.after-local-write")
                check_ready()
            except BlockError as exc:
                local_error = exc
            finally:
                if local_first is not None:
                    local_first.set()

        async def on_early() -> None:
            await peer_early.wait()
            check_ready()

        async with trio.open_nursery() as nursery:
            # The local side runs in this task, the peer's in one of its own: they overlap as
            # soon as either waits (a small local write does not: it is issued inline, before
            # the peer's request is sent).
            if ready is not None:
                nursery.start_soon(on_early)
            if self.peer.connected:
                nursery.start_soon(on_peer)
                await on_local()
            else:
                await on_local()
                peer_error = BlockError(errno.ENOTCONN, "peer not connected")
                if ready is not None:
                    await self._degrade(bio, peer_error)
                peer_early.set()
        return await self._settle(bio, local_error, peer_error, ready is None)

    async def _both_in_turn(self, bio: Bio) -> BlockError | None:
        """Protocol C (and every FLUSH), the peer connected: send to the peer, run the bio
        here, then wait for the peer's answer — overlapped without a task or nursery of its
        own, which cost the primary more CPU than the rest of its write path."""
        peer_error: BlockError | None = None
        local_error: BlockError | None = None
        txn = None
        try:
            # A client's FAILFAST is about its own link; the replica link keeps its own rules.
            txn = await self.peer.start(bio.with_failfast(False))
        except BlockError as exc:
            peer_error = exc
        try:
            await self.local.submit(bio)
        except BlockError as exc:
            local_error = exc
        if txn is not None:
            try:
                await txn.wait()
            except BlockError as exc:
                peer_error = exc
        return await self._settle(bio, local_error, peer_error, True)

    async def _settle(
        self,
        bio: Bio,
        local_error: BlockError | None,
        peer_error: BlockError | None,
        degrade: bool,
    ) -> BlockError | None:
        """After both sides ran: a local failure fails the bio; a peer failure is degraded
        here when ``degrade`` (not yet done on the way, as protocols A and B do)."""
        if local_error is not None:
            if peer_error is None and bio.op is not Op.FLUSH:
                # The bio fails, but the peer may hold it and we may not: mark the range so a
                # resync makes the replicas agree again (on our bytes).
                if self.bitmap.mark(bio.offset, bio.length):
                    await trio.to_thread.run_sync(self.bitmap.flush)
            raise local_error
        if bio.op is Op.FLUSH:
            return peer_error
        if peer_error is not None:
            if degrade:
                await self._degrade(bio, peer_error)
        else:
            self._note_unflushed(bio)
            if chaos.ARMED:  # protocol C: the client's answer is still to come
                chaos.crash_point("primary.after-peer-ack")
        return peer_error

    async def _flush(self, bio: Bio) -> None:
        """FLUSH both sides.  Writes the peer completed before a FLUSH that then fails on the
        peer may be lost to it by a power cut: they are marked out of sync, durably, before
        the FLUSH is acknowledged."""
        await self._drain_behind()  # protocols A, B: writes acknowledged before this FLUSH
        unflushed, overflow = self._unflushed, self._unflushed_overflow
        self._unflushed, self._unflushed_overflow = set(), False
        try:
            peer_error = await self._both(bio)
        except BlockError:
            self._unflushed |= unflushed  # the FLUSH failed: nothing was made stable
            self._unflushed_overflow |= overflow
            raise
        if peer_error is None or not (unflushed or overflow):
            return
        await self._mark_unflushed(unflushed, overflow, "peer_flush_failed", str(peer_error))

    async def _mark_unflushed(
        self, unflushed: set[int], overflow: bool, event: str, reason: str
    ) -> None:
        """Mark, durably, extents the peer completed but may not hold stably."""
        step = self.bitmap.extent_size
        await self.state.before_degraded_ack()
        if overflow:
            self.bitmap.mark_all()
        for extent in unflushed:
            self.bitmap.mark(extent * step, min(step, self.size - extent * step))
        await trio.to_thread.run_sync(self.bitmap.flush)
        log.warning(
            "event=%s marked_extents=%d reason=%r",
            event,
            len(unflushed) if not overflow else -1,
            reason,
        )

    def _note_unflushed(self, bio: Bio) -> None:
        if self._unflushed_overflow:
            return
        step = self.bitmap.extent_size
        self._unflushed.update(range(bio.offset // step, (bio.offset + bio.length - 1) // step + 1))
        if len(self._unflushed) > UNFLUSHED_CAP:
            self._unflushed, self._unflushed_overflow = set(), True

    async def _degrade(self, bio: Bio, why: BlockError) -> None:
        """Record a write the peer did not get, durably, before it is acknowledged."""
        self._degraded_writes += 1
        self._degraded_bytes += bio.length
        await self.state.before_degraded_ack()
        if self.bitmap.mark(bio.offset, bio.length):
            await trio.to_thread.run_sync(self.bitmap.flush)
        if self._degraded_writes == 1 or self._degraded_writes % 1000 == 0:
            log.warning(
                "event=degraded_write offset=%d length=%d reason=%r out_of_sync=%d",
                bio.offset,
                bio.length,
                str(why),
                self.bitmap.dirty_bytes,
            )

    # -- the peer link's life (relink.py) -------------------------------------------------

    async def share_epoch(self, epoch: int) -> None:
        """Tell the peer about a takeover's epoch; if it is away, the next handshake does."""
        await relink.share_epoch(self, epoch)

    async def run_resync(self) -> None:
        """Forever: resync the peer whenever it is connected and extents are dirty
        (:func:`dst.replication.relink.resync_forever`).  Also holds the tasks that finish
        protocol A and B writes after their acknowledgement, and started bios that wait."""
        async with trio.open_nursery() as behind:
            self._behind = behind
            try:
                await relink.resync_forever(self)
            finally:
                self._behind = None

    def statistics(self) -> ReplicationStatistics:
        return ReplicationStatistics(
            peer_connected=self.peer.connected,
            out_of_sync_bytes=self.bitmap.dirty_bytes,
            peer_up_to_date=not self.bitmap.dirty_bytes and not self.state.needs_finish,
            resync_total_bytes=self._progress.total_bytes,
            resync_done_bytes=self._progress.done_bytes,
            resync_rate_bytes_s=self._progress.rate_bytes_s,
            resynced_bytes=self._resynced,
            degraded_writes=self._degraded_writes,
            degraded_bytes=self._degraded_bytes,
        )

    async def aclose(self) -> None:
        if self.al is not None:
            # A clean stop: no write is in flight, the bitmap holds what the peer lacks.
            await trio.to_thread.run_sync(self.al.clear)
        await self.local.aclose()
