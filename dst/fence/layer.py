"""Fence: the top of a server's volume stack — no write from a previous owner lands late.

Seed 002 (Xen live migration): writes the old host still had in flight reached the disk after
the new host had written the same blocks, silently undoing them.  dst closes that window with
a volume *epoch*: every owner claims the volume for an epoch, every write carries it, and

- a write whose epoch is older than the volume's is refused with ESTALE — *definitely not
  applied* — and counted;
- :meth:`Fence.advance` (a takeover) raises the epoch in memory first, so from that instant
  every older write is refused at the door; then it waits until the older writes already past
  the door have finished (applied or failed: none is left in any queue below); then it
  persists the new epoch (on this server, and through ``persist`` wherever the caller keeps
  it — the replication peer too).  Only then is the new owner told it holds the volume, so no
  write of the old owner can land after the new owner's first write.

Writes with epoch 0 are not an owner's (resync copies, a replication peer's writes, which its
primary has fenced already) and pass.  Reads and FLUSH pass: they change nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import trio

from dst import chaos
from dst.block import Bio, Limits, Op
from dst.block.layer import BlockLayer, Pending, Plug, StartingLayer
from dst.errors import FencedError

log = logging.getLogger("dst.fence")

#: Ops that change data and so must come from the current owner.
FENCED_OPS = frozenset({Op.WRITE, Op.TRIM, Op.WRITE_ZEROES})


@dataclass(frozen=True, slots=True)
class FenceStatistics:
    epoch: int
    stale_rejected: int
    advances: int
    in_flight: int


class Fence:
    """A BlockLayer that admits writes of the current epoch only (module docstring)."""

    def __init__(
        self,
        below: BlockLayer,
        epoch: int,
        persist: Callable[[int], Awaitable[None]],
        *,
        name: str = "",
    ) -> None:
        if epoch < 1:
            raise ValueError(f"epoch {epoch}: epochs start at 1")
        self.below = below
        self.name = name
        self._epoch = epoch
        self._persist = persist
        self._in_flight: Counter[int] = Counter()  # epoch -> writes past the door
        self._changed = trio.Event()
        self._lock = trio.Lock()
        self.stale_rejected = 0
        self.advances = 0

    @property
    def limits(self) -> Limits:
        return self.below.limits

    @property
    def size(self) -> int:
        return self.below.size

    @property
    def epoch(self) -> int:
        return self._epoch

    async def submit(self, bio: Bio) -> None:
        if bio.op not in FENCED_OPS or bio.epoch == 0:
            await self.below.submit(bio)
            return
        self._admit(bio)
        self._in_flight[bio.epoch] += 1
        try:
            await self.below.submit(bio)
        finally:
            self._landed(bio.epoch)

    @property
    def can_start(self) -> bool:
        """True where the layer below can start bios (a replication primary's)."""
        return bool(getattr(self.below, "can_start", False))

    async def start(self, bio: Bio, plug: Plug | None = None) -> Pending:
        """Start ``bio`` on the layer below (a StartingLayer): fenced as in submit, a write
        counted in flight until its callbacks run."""
        below = cast(StartingLayer, self.below)
        if bio.op not in FENCED_OPS or bio.epoch == 0:
            return await below.start(bio, plug)
        self._admit(bio)
        epoch = bio.epoch
        self._in_flight[epoch] += 1
        try:
            pending = await below.start(bio, plug)
        except BaseException:
            self._landed(epoch)
            raise
        pending.then(lambda: self._landed(epoch))
        return pending

    def _landed(self, epoch: int) -> None:
        """A write of ``epoch`` past the door has finished (applied or failed)."""
        self._in_flight[epoch] -= 1
        if not self._in_flight[epoch]:
            del self._in_flight[epoch]
        self._changed.set()
        self._changed = trio.Event()

    def submit_nowait(self, bio: Bio) -> bool:
        """Complete ``bio`` now if the layer below can without waiting (``submit_nowait``,
        Linux's ``REQ_NOWAIT``); False if it cannot.  A write of an older epoch is refused
        here as in submit; one completed here is never in flight when an advance looks."""
        below = getattr(self.below, "submit_nowait", None)
        if below is None:
            return False
        if bio.op in FENCED_OPS and bio.epoch:
            self._admit(bio)
        return bool(below(bio))

    def _admit(self, bio: Bio) -> None:
        """Refuse (FencedError) a write of an epoch older than the volume's."""
        if bio.epoch < self._epoch and not (chaos.BROKEN and chaos.broken("no-epoch-check")):
            self.stale_rejected += 1
            log.warning(
                "volume=%s event=stale_write_rejected epoch=%d volume_epoch=%d offset=%d length=%d",
                self.name,
                bio.epoch,
                self._epoch,
                bio.offset,
                bio.length,
            )
            raise FencedError(
                f"epoch {bio.epoch} is older than volume epoch {self._epoch}: "
                "the volume was taken over; this write was not applied"
            )

    async def advance(self, epoch: int) -> int:
        """Make ``epoch`` (or the current one, if higher) the volume's: fence, drain, persist.
        Returns the epoch now in force."""
        async with self._lock:
            if epoch <= self._epoch:
                return self._epoch
            old, self._epoch = self._epoch, epoch  # the door shuts for older writes now
            while any(e < epoch for e in self._in_flight):
                await self._changed.wait()
            await self._persist(epoch)
            self.advances += 1
            log.warning("volume=%s event=epoch_advanced epoch=%d->%d", self.name, old, epoch)
            return epoch

    def statistics(self) -> FenceStatistics:
        return FenceStatistics(
            epoch=self._epoch,
            stale_rejected=self.stale_rejected,
            advances=self.advances,
            in_flight=sum(self._in_flight.values()),
        )

    async def aclose(self) -> None:
        await self.below.aclose()
