"""Mirror I/O started without a task: the NBD bridge's started path over a mirror.

Over one server the bridge starts each READ and WRITE on the RemoteVolume and answers it from
the completion callback (``dst/nbd/bridge.py``).  Over a mirror, :func:`start_io` does what
``Mirror.submit`` does in a task, in the same order, without waiting for anything but the
legs' own sends:

- a READ is started on the next IN_SYNC leg (FAILFAST while another leg is IN_SYNC);
- a WRITE takes its range if no write in flight overlaps it (``RangeLocks.hold_nowait``) and
  its extents if they are active on disk already (``ActiveWrites.begin_nowait``), then is
  started on every leg that takes writes — each leg's commands wait in the caller's
  :class:`~dst.block.Plug` and leave with the rest of the pass in one gathered write per leg;
- when every leg has called back, a write whose legs all completed it is noted unflushed on
  each and completes at once.

The leg rules are applied in the callback, as ``Mirror._leg_io`` applies them when a leg's
submit raises (drop the leg, or resubmit to the last good one).  Whatever must wait — a resubmit
without FAILFAST, a read from another leg after a drop, a bitmap to flush before the write is
acknowledged — runs in a task of the mirror's (``Mirror.run``), and the bio completes after it.
If the range or the extents cannot be had at once, nothing was taken and :func:`start_io`
answers None: the caller runs the bio in a task, as ``Mirror.submit``.  So are FLUSH and bios
over the mirror's own cap.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import trio

from dst.block import Bio, Completion, Op, Pending, Plug
from dst.errors import BlockError
from dst.mirror.legs import LegState

if TYPE_CHECKING:
    from dst.mirror.layer import Mirror
    from dst.replication.bitmap import DirtyBitmap

__all__ = ["start_io"]


async def start_io(mirror: Mirror, bio: Bio, plug: Plug | None) -> Completion | None:
    """Start ``bio`` (valid: checked at the edge) on the legs, or None with nothing done
    (module docstring)."""
    if bio.op is Op.FLUSH or bio.length > mirror.limits.max_bytes:
        return None
    if bio.op is Op.READ:
        read = _Read(mirror, bio)
        await read.start(mirror.table.read_leg(), plug)
        mirror.started += 1
        return read
    offset, length = bio.offset, bio.length
    hold = mirror._locks.hold_nowait(offset, offset + length)
    if hold is None:
        return None
    if not mirror._active.begin_nowait(offset, length):
        mirror._locks.release(hold)
        return None
    write = _Write(mirror, bio, hold)
    try:
        for i in mirror.table.writable():
            await write.start(i, plug)
    except BaseException:
        mirror.interrupted()  # started on some legs, not on others
        raise
    finally:
        write.all_started()
    mirror.started += 1
    return write


class _LegIO(Completion):
    """A bio started on legs: each leg's outcome as the leg rules judge it."""

    __slots__ = ("_bio", "_for_legs", "_mirror")

    def __init__(self, mirror: Mirror, bio: Bio) -> None:
        super().__init__()
        self._mirror, self._bio = mirror, bio
        self._for_legs: tuple[bool, Bio] | None = None  # the last leg's bio made, reused

    async def start(self, i: int, plug: Plug | None) -> None:
        mirror = self._mirror
        assert mirror.starts is not None
        failfast = mirror.table.use_failfast(i)
        made = self._for_legs
        if made is None or made[0] is not failfast:
            made = self._for_legs = (failfast, self._bio.with_failfast(failfast))
        try:
            pending = await mirror.starts[i](made[1], plug)
        except BlockError as exc:
            self._began(i)
            self._leg_done(i, failfast, exc)
            return
        # Counted only once started (or refused): a start cut short by cancellation must
        # not leave the write waiting for a leg that never got it, holding its range.
        self._began(i)
        pending.then(partial(self._called_back, i, failfast, pending))

    def _called_back(self, i: int, failfast: bool, pending: Pending) -> None:
        self._leg_done(i, failfast, pending.error)

    def _began(self, i: int) -> None:
        """Leg ``i`` is about to get the bio."""

    def _leg_done(self, i: int, failfast: bool, error: BlockError | None) -> None:
        raise NotImplementedError

    def _behind(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` (which finishes this bio) in the mirror's task nursery; if the mirror
        is shutting down, the bio fails."""
        tasks = self._mirror.tasks
        if tasks is None:
            self._give_up(BlockError(errno.ESHUTDOWN, "mirror is shutting down"))
        else:
            tasks.start_soon(self._guarded, job)

    async def _guarded(self, job: Callable[[], Awaitable[None]]) -> None:
        error: BlockError | None = BlockError(errno.ESHUTDOWN, "mirror stopped")
        try:
            await job()
            error = None
        except BlockError as exc:
            error = exc
        except OSError as exc:  # a bitmap that cannot be flushed: the miss is not on disk
            error = BlockError(errno.EIO, f"dirty bitmap not flushed: {exc}")
        finally:
            if error is not None:
                self._give_up(error)

    def _give_up(self, error: BlockError) -> None:
        self.finish(error)


class _Read(_LegIO):
    __slots__ = ()

    def _leg_done(self, i: int, failfast: bool, error: BlockError | None) -> None:
        if error is None:
            self.finish()
            return
        again = self._mirror._leg_failed(i, self._bio, error, failfast)
        self._behind(partial(self._read_again, i, error, again))

    async def _read_again(self, i: int, error: BlockError | None, again: bool) -> None:
        """As ``Mirror._read`` goes on after leg ``i`` failed: the same leg again without
        FAILFAST (LAST_ERRED), the user's error if it stays IN_SYNC, another leg if not."""
        mirror = self._mirror
        if again:
            error = await mirror._leg_io(i, self._bio)
        if error is not None:
            if mirror.table.states[i] is LegState.IN_SYNC:
                raise error
            await mirror._read(self._bio)
        self.finish()


class _Write(_LegIO):
    """A started write, from its range lock until every leg has it (or misses it, marked)."""

    __slots__ = ("_again", "_hold", "_left", "_results")

    def __init__(self, mirror: Mirror, bio: Bio, hold: tuple[int, int, trio.Event]) -> None:
        super().__init__(mirror, bio)
        self._hold: tuple[int, int, trio.Event] | None = hold
        self._results: dict[int, BlockError | None] = {}
        self._again: list[int] = []  # legs to resubmit to without FAILFAST
        self._left = 1  # legs not yet called back, plus one until every leg is started

    def _began(self, i: int) -> None:
        self._left += 1

    def all_started(self) -> None:
        self._one_less()

    def _leg_done(self, i: int, failfast: bool, error: BlockError | None) -> None:
        if error is not None and self._mirror._leg_failed(i, self._bio, error, failfast):
            self._again.append(i)
        else:
            self._results[i] = error
        self._one_less()

    def _one_less(self) -> None:
        self._left -= 1
        if self._left:
            return
        mirror, bio = self._mirror, self._bio
        if self._again:
            self._behind(partial(self._settle, []))
            return
        marked = mirror._account(bio, self._results)
        if marked:
            self._behind(partial(self._settle, marked))
            return
        self._release()
        self.finish(mirror._outcome(self._results))

    async def _settle(self, marked: list[DirtyBitmap]) -> None:
        """What the write's completion must wait for: resubmits to the last good leg, then
        the bitmaps that now mark a leg's miss, on disk — as ``Mirror._write`` does."""
        mirror, bio = self._mirror, self._bio
        for i in self._again:
            self._results[i] = await mirror._leg_io(i, bio)
        if self._again:
            marked = mirror._account(bio, self._results)
        for bitmap in marked:
            await trio.to_thread.run_sync(bitmap.flush)
        self._release()
        self.finish(mirror._outcome(self._results))

    def _release(self) -> None:
        """Give back the range and the extents: the write is safe on every leg."""
        if self._hold is not None:
            self._mirror._locks.release(self._hold)
            self._mirror._active.end(self._bio.offset, self._bio.length)
            self._hold = None

    def _give_up(self, error: BlockError) -> None:
        self._release()
        self.finish(error)
