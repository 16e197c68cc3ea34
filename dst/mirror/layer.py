"""Mirror: a client-side block layer that keeps a copy of the volume on every leg (seed 004).

```
 NBD bridge → Mirror ─┬─ leg 0: RemoteVolume(server A)     each leg with its own
                      ├─ leg 1: RemoteVolume(server B)     persistent DirtyBitmap
                      └─ leg 2: ...
```

Writes (and TRIM, WRITE_ZEROES, FLUSH) go to every leg that is not ERRED; reads go round-robin
to IN_SYNC legs.  The leg rules — FAILFAST, drop at the first failure, LAST_ERRED — are in
:mod:`dst.mirror.legs`; the transport side of FAILFAST (deadline, failing every pending
request of a leg at once, no resend) is :class:`~dst.client.remote.RemoteVolume`'s.

**What a leg misses is on disk before the write is acknowledged.**  A write that did not
complete on a leg (ERRED, or failed just now) is marked in that leg's bitmap and the bitmap is
flushed before the user hears of success; a bridge restart finds the bits and treats the leg
as ERRED until resynced.  Writes a leg completed since its last FLUSH are remembered (extents),
and marked if its FLUSH fails: they may be in its volatile cache only.

**Bridge crash.**  Every write's extents are active in the mirror's activity log before it is
issued (:mod:`dst.replication.active`); after a crash, :meth:`Mirror.recover` marks them on
every leg but one, which the others are then resynced from.

**Ordering.**  Overlapping writes, and a resync copy and the writes to its extent, exclude each
other by range (:class:`~dst.block.rangelock.RangeLocks`), so every leg sees them in one order.

**Return.**  A watcher per leg brings an ERRED leg back when it answers again, resyncing only
its dirty extents (:mod:`dst.mirror.returning`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from dst.block import (
    Bio,
    BioFlags,
    BlockLayer,
    Limits,
    Op,
    Pending,
    Plug,
    StartingLayer,
    validate_bio,
)
from dst.block.layer import closed_error, submit_in_task, submit_split
from dst.block.rangelock import RangeLocks
from dst.errors import BlockError, ConfigError
from dst.mirror.legs import LegState, LegTable, Verdict
from dst.mirror.returning import watch_leg
from dst.mirror.started import start_io
from dst.replication.active import ActiveWrites
from dst.replication.activity_log import ActivityLog
from dst.replication.bitmap import DirtyBitmap
from dst.replication.resync import DEFAULT_RESYNC_RATE, ResyncProgress

__all__ = ["Leg", "Mirror"]

log = logging.getLogger("dst.mirror")

#: Extents remembered per leg as "completed, not yet flushed" before a failed FLUSH of that leg
#: marks the whole leg instead (65536 x 64 KiB = 4 GiB written without a FLUSH).
UNFLUSHED_CAP = 65536
#: The mirror's own request cap: a bio spans at most two activity-log extents.
MIRROR_MAX_BYTES = 4 << 20


@dataclass(eq=False, slots=True)
class Leg:
    """One copy of the volume: a block layer (usually a RemoteVolume) and its bitmap."""

    name: str
    layer: BlockLayer
    bitmap: DirtyBitmap
    reason: str = ""
    progress: ResyncProgress = field(default_factory=ResyncProgress)
    resynced_bytes: int = 0
    errors: int = 0
    unflushed: set[int] = field(default_factory=set)
    unflushed_overflow: bool = False


class Mirror:
    """The mirror layer; run :meth:`run` in a nursery for the legs' return and resync."""

    def __init__(
        self,
        legs: Sequence[Leg],
        *,
        resync_rate: int = DEFAULT_RESYNC_RATE,
        activity_log: ActivityLog | None = None,
    ) -> None:
        if not legs:
            raise ConfigError("a mirror needs at least one leg")
        # A leg whose server was down at start has size 0 until it connects.
        sizes = {leg.layer.size for leg in legs if leg.layer.size}
        if len(sizes) > 1:
            named = ", ".join(f"{leg.name}={leg.layer.size}" for leg in legs)
            raise ConfigError(f"mirror legs differ in size: {named}")
        if not sizes:
            raise ConfigError("no mirror leg is reachable")
        self.legs = list(legs)
        self.resync_rate = resync_rate
        self._size = sizes.pop()
        # Own cap: a write's extents must fit the activity log's slots (4 MiB extents).
        limits = Limits(max_bytes=MIRROR_MAX_BYTES).stack(legs[0].layer.limits)
        for leg in legs[1:]:
            limits = limits.stack(leg.layer.limits)
        self._limits: Limits = limits
        usable = [leg.layer.size > 0 and not leg.bitmap.dirty_bytes for leg in legs]
        try:
            self.table = LegTable.start(usable)
        except ValueError:
            states = ", ".join(
                f"{leg.name} {'dirty' if leg.bitmap.dirty_bytes else 'clean'}"
                f"{'' if leg.layer.size else ' unreachable'}"
                for leg in legs
            )
            raise ConfigError(
                f"no mirror leg is both reachable and in sync ({states}): serving a leg that "
                "misses writes would return stale data; start its server, or delete the "
                "bitmap of the leg you choose to trust"
            ) from None
        self._locks = RangeLocks()
        self._active = ActiveWrites(activity_log)
        self._changed = trio.Event()
        self._closed = False
        self._interrupted = False  # see interrupted()
        # The started path (dst/mirror/started.py): every leg's start, or None if a leg cannot
        # start bios; the nursery of run(), which finishes what a started bio must wait for.
        starts: list[Callable[[Bio, Plug | None], Awaitable[Pending]]] = [
            leg.layer.start for leg in legs if isinstance(leg.layer, StartingLayer)
        ]
        self.starts = starts if len(starts) == len(legs) else None
        self.tasks: trio.Nursery | None = None
        self.started = 0  # bios started without a task
        for i, leg in enumerate(self.legs):
            if self.table.states[i] is LegState.ERRED:
                leg.reason = "dirty at start" if leg.bitmap.dirty_bytes else "unreachable at start"
                log.warning(
                    "event=leg_erred leg=%s reason=%r dirty=%d",
                    leg.name,
                    leg.reason,
                    leg.bitmap.dirty_bytes,
                )

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def size(self) -> int:
        return self._size

    def state(self, leg: int) -> LegState:
        return self.table.states[leg]

    async def wait_changed(self) -> None:
        """Wait for the next change of any leg's state."""
        await self._changed.wait()

    async def recover(self) -> None:
        """After a crash of the bridge, before any write: the extents the activity log held
        may differ between legs (a write reached some of them).  They are marked on every leg
        but the first IN_SYNC one — the source the others are resynced from — and flushed."""
        al = self._active.al
        if al is None or al.was_clean:
            return
        source = self.table.in_sync()[0]
        recovered = al.recovered_extents
        for i, leg in enumerate(self.legs):
            if i == source:
                continue
            for offset, length in recovered:
                leg.bitmap.mark(offset, length)
            await trio.to_thread.run_sync(leg.bitmap.flush)
            if self.table.states[i] is LegState.IN_SYNC:
                self.table.on_error(i, True)
                leg.reason = "writes in flight when the bridge stopped"
        log.warning(
            "event=crash_recovery al_extents=%d bytes=%d source=%s",
            len(recovered),
            sum(length for _, length in recovered),
            self.legs[source].name,
        )
        self._note_change()

    def _note_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- I/O -----------------------------------------------------------------------------

    @property
    def can_start(self) -> bool:
        """Started bios need legs that start them and the nursery of :meth:`run`."""
        return self.starts is not None and self.tasks is not None

    async def start(self, bio: Bio, plug: Plug | None = None) -> Pending:
        """Start ``bio`` (valid: checked at the edge) and call back on its completion: a READ
        or a WRITE whose range and extents are free at once without a task
        (``dst/mirror/started.py``), anything else in a task of :meth:`run` running
        :meth:`submit`."""
        if self._closed:
            raise closed_error("mirror")
        if self.starts is not None:
            started = await start_io(self, bio, plug)
            if started is not None:
                return started
        return await submit_in_task(self, bio, self.tasks, plug, "mirror")

    async def submit(self, bio: Bio) -> None:
        if self._closed:
            raise closed_error("mirror")
        # Checked here although the edge did: a malformed request must fail on its own, never
        # look like a leg's failure and drop a good leg.
        validate_bio(bio, self._limits, self._size)
        if bio.op is not Op.FLUSH and bio.length > self._limits.max_bytes:
            await submit_split(self, bio)  # pieces that fit come back here
        elif bio.op is Op.READ:
            await self._read(bio)
        elif bio.op is Op.FLUSH:
            await self._flush(bio)
        else:
            async with (
                self._locks.locked(bio.offset, bio.offset + bio.length),
                self._active.writing(bio.offset, bio.length),
            ):
                await self._write(bio)

    async def _leg_io(self, i: int, bio: Bio) -> BlockError | None:
        """Run ``bio`` on leg ``i`` under the leg rules; None on success, else the error."""
        while True:
            failfast = self.table.use_failfast(i)
            try:
                await self.legs[i].layer.submit(bio.with_failfast(failfast))
                return None
            except BlockError as exc:
                if not self._leg_failed(i, bio, exc, failfast):
                    return exc

    def _leg_failed(self, i: int, bio: Bio, exc: BlockError, failfast: bool) -> bool:
        """Leg ``i`` failed ``bio``: apply the leg rules (drop it, or keep it); True if the
        bio must go to it again, without FAILFAST (LAST_ERRED)."""
        leg = self.legs[i]
        leg.errors += 1
        was = self.table.states[i]
        verdict = self.table.on_error(i, failfast)
        if verdict is Verdict.RESUBMIT:
            log.warning(
                "event=leg_last_erred leg=%s op=%s offset=%d action=resubmit_without_failfast "
                "reason=%r",
                leg.name,
                bio.op.name,
                bio.offset,
                str(exc),
            )
            return True
        if verdict is Verdict.DROP and was is not LegState.ERRED:
            self._dropped(i, exc)
        return False

    def _dropped(self, i: int, exc: BlockError) -> None:
        leg = self.legs[i]
        leg.reason = str(exc)
        log.warning(
            "event=leg_erred leg=%s reason=%r in_sync=%d",
            leg.name,
            leg.reason,
            len(self.table.in_sync()),
        )
        self._note_change()

    async def _read(self, bio: Bio) -> None:
        while True:
            i = self.table.read_leg()
            error = await self._leg_io(i, bio)
            if error is None:
                return
            if self.table.states[i] is LegState.IN_SYNC:
                raise error  # the last good leg failed without FAILFAST: a real error
            # dropped: another IN_SYNC leg serves the read

    async def _on_all(self, bio: Bio) -> dict[int, BlockError | None]:
        """Run ``bio`` on every leg that takes writes; each leg's outcome by index."""
        results: dict[int, BlockError | None] = {}

        async def one(i: int) -> None:
            results[i] = await self._leg_io(i, bio)

        async with trio.open_nursery() as nursery:
            for i in self.table.writable():
                nursery.start_soon(one, i)
        return results

    def _outcome(self, results: dict[int, BlockError | None]) -> BlockError | None:
        """None if an IN_SYNC leg completed the I/O, else the error for the user."""
        if any(e is None and self.table.states[i] is LegState.IN_SYNC for i, e in results.items()):
            return None
        errors = [e for i, e in sorted(results.items()) if e is not None]
        return errors[-1] if errors else BlockError(errno.EIO, "no leg took the I/O")

    def _missed(self, i: int, results: dict[int, BlockError | None]) -> bool:
        """Leg ``i`` did not get the I/O and is not IN_SYNC: its bitmap must say so.  (The
        last IN_SYNC leg failing is the user's error, not something another leg can fix.)"""
        return self.table.states[i] is not LegState.IN_SYNC and (
            i not in results or results[i] is not None
        )

    async def _write(self, bio: Bio) -> None:
        try:
            results = await self._on_all(bio)
        except BaseException:
            self.interrupted()  # cancelled with the write on some legs and not others
            raise
        for bitmap in self._account(bio, results):  # durable before the write is acknowledged
            await trio.to_thread.run_sync(bitmap.flush)
        error = self._outcome(results)
        if error is not None:
            raise error

    def _account(self, bio: Bio, results: dict[int, BlockError | None]) -> list[DirtyBitmap]:
        """After a write: mark it in the bitmap of every leg that missed it (returned: those
        the marks changed, to flush before the write is acknowledged), and note it unflushed
        on every leg that completed it."""
        marked: list[DirtyBitmap] = []
        for i, leg in enumerate(self.legs):
            if self._missed(i, results):
                if leg.bitmap.mark(bio.offset, bio.length):
                    marked.append(leg.bitmap)
            elif results.get(i, 0) is None and not bio.flags & BioFlags.FUA:
                self._note_unflushed(leg, bio)
        return marked

    def _note_unflushed(self, leg: Leg, bio: Bio) -> None:
        if leg.unflushed_overflow:
            return
        step = leg.bitmap.extent_size
        leg.unflushed.update(range(bio.offset // step, (bio.offset + bio.length - 1) // step + 1))
        if len(leg.unflushed) > UNFLUSHED_CAP:
            leg.unflushed, leg.unflushed_overflow = set(), True

    async def _flush(self, bio: Bio) -> None:
        """FLUSH every leg; a leg whose FLUSH fails gets its unflushed extents marked."""
        taken = [(leg.unflushed, leg.unflushed_overflow) for leg in self.legs]
        for leg in self.legs:
            leg.unflushed, leg.unflushed_overflow = set(), False
        results = await self._on_all(bio)
        for i, leg in enumerate(self.legs):
            if not self._missed(i, results):
                continue
            extents, overflow = taken[i]
            if overflow:
                leg.bitmap.mark_all()
            step = leg.bitmap.extent_size
            for extent in extents:
                leg.bitmap.mark(extent * step, min(step, self._size - extent * step))
            if extents or overflow:
                await trio.to_thread.run_sync(leg.bitmap.flush)
        error = self._outcome(results)
        if error is not None:
            raise error

    # -- return and resync ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: bring ERRED legs back when they answer again; and hold the tasks that
        finish started bios (:meth:`start`)."""
        async with trio.open_nursery() as nursery:
            for i in range(len(self.legs)):
                nursery.start_soon(watch_leg, self, i)
            self.tasks = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.tasks = None

    def interrupted(self) -> None:
        """A write was cut short (cancelled) after some legs may have got it and before the
        others did, with nothing marked: the activity log, which has its extents, is kept at
        :meth:`aclose` as after a crash, so the next start resyncs them (:meth:`recover`)."""
        self._interrupted = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for leg in self.legs:
            await leg.layer.aclose()
        if self._active.al is None:
            return
        if self._interrupted:
            log.warning(
                "event=activity_log_kept reason='a write was interrupted on its way to the "
                "legs': the next start resyncs its extents"
            )
            return
        # A clean stop: nothing in flight, the bitmaps hold what any leg lacks.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._active.al.clear)
