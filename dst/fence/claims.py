"""Ownership: who may write a volume, at which epoch — the attach rules of fencing.

An owner (a bridge, or any client that claims) attaches with ``claim``:

- ``share``: no claim; the session writes at the epoch current when it attached, so a later
  takeover fences it like any owner.  Readers, tests, ``dst verify`` and replication peers.
- ``own``: a fresh claim (epoch 0) raises the epoch by one — the previous owner's late writes
  are fenced — provided no session of *another* node holds the volume (EBUSY otherwise: the
  operator decides, with ``--takeover``).  A claim naming the epoch the node already holds is
  a reconnect and keeps it; an older epoch means the node was taken over: ESTALE.
- ``takeover``: raises the epoch past everything, whoever holds the volume; the old owner's
  sessions stay connected, and every write they still send is refused (ESTALE).

Every raise goes through :meth:`Fence.advance` (fence, drain, persist) before the Attached
answer, which is what makes it safe to write at once.
"""

from __future__ import annotations

import errno
import logging

from dst import chaos
from dst.errors import BlockError, FencedError
from dst.fence.layer import Fence
from dst.wire import CLAIMS

log = logging.getLogger("dst.fence")

__all__ = ["CLAIMS", "Ownership"]


class Ownership:
    def __init__(self, fence: Fence, name: str = "") -> None:
        self.fence = fence
        self.name = name
        self.node: str | None = None  # the owner, once someone claimed
        self.sessions = 0  # its live sessions

    async def claim(self, node: str, mode: str, epoch: int) -> int:
        """Grant ``node``'s attach; the epoch it writes at.  BlockError if refused."""
        current = self.fence.epoch
        if epoch and epoch < current:
            raise FencedError(
                f"claim at epoch {epoch}, but volume {self.name!r} is at epoch {current}: "
                "it was taken over"
            )
        if mode == "share":
            return current
        if mode == "own" and self.sessions and self.node != node:
            raise BlockError(
                errno.EBUSY,
                f"volume {self.name!r} is held by {self.node} at epoch {current}; "
                "take it over explicitly (dst nbd --takeover) if that owner is gone",
            )
        if mode == "takeover":
            wanted = max(current, epoch) + 1
        elif epoch and self.node in (None, node):
            wanted = epoch  # a reconnect (or a failover to this replica) keeps its epoch
        else:
            wanted = current + 1  # a new claim moves on
        granted = await self.fence.advance(wanted)
        if chaos.ARMED and granted > current:
            # Fenced, drained and persisted (here and on the peer); the claimant not told.
            chaos.crash_point("takeover.mid")
        if self.node != node:
            if self.node is not None:
                log.warning(
                    "volume=%s event=owner_changed from=%s to=%s mode=%s epoch=%d",
                    self.name,
                    self.node,
                    node,
                    mode,
                    granted,
                )
            self.node, self.sessions = node, 0
        self.sessions += 1
        return granted

    def release(self, node: str) -> None:
        """One of ``node``'s claiming sessions ended."""
        if self.node == node and self.sessions:
            self.sessions -= 1
