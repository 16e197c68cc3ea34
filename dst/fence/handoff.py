"""Handoff: a bridge's graceful release of its volume, so another bridge can claim it.

Migration (seed 002) done gently: bridge A is asked to stop (SIGTERM, or ``release()`` from a
program).  A refuses new requests at once (ESHUTDOWN to its NBD clients), lets the requests
already under way finish — each is acknowledged or fails as it would have — then FLUSHes and
detaches.  Bridge B's ordinary claim (``dst nbd`` without ``--takeover``) waits while A holds
the volume and succeeds as soon as A has let go, at the next epoch.

So dst's choice for requests A had in flight: they are **completed by A before it lets go**,
never handed to B and never left behind — every write A acknowledged is before B's first write,
and what A refused after the release began was never applied.  (The alternative, a shadow ring
handed from A to B, would need A and B to talk; a drain needs nothing but A.)  If A cannot
finish in ``timeout`` seconds (its server is gone), the remaining requests fail back to A's
clients and B must take over with ``--takeover``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

from dst.block import Bio, Limits, Op, Pending, Plug, StartingLayer
from dst.block.layer import BlockLayer
from dst.errors import BlockError

log = logging.getLogger("dst.bridge")

__all__ = ["Handoff"]


class Handoff:
    """A client-side layer that can drain its requests and let go of the volume."""

    def __init__(self, below: BlockLayer, name: str = "") -> None:
        self.below = below
        self.name = name
        self.releasing = False
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        # Looked up once: an isinstance check against a Protocol is slow on the data path.
        self._start_below: Callable[[Bio, Plug | None], Awaitable[Pending]] | None = None
        if isinstance(below, StartingLayer) and below.can_start:
            self._start_below = below.start

    @property
    def limits(self) -> Limits:
        return self.below.limits

    @property
    def size(self) -> int:
        return self.below.size

    async def submit(self, bio: Bio) -> None:
        self._enter()
        try:
            await self.below.submit(bio)
        finally:
            self._leave()

    @property
    def can_start(self) -> bool:
        return self._start_below is not None

    async def start(self, bio: Bio, plug: Plug | None = None) -> Pending:
        """The StartingLayer path (the bridge's): counted in flight until its callbacks run."""
        if self._start_below is None:
            raise TypeError(f"{type(self.below).__name__} cannot start a bio")
        self._enter()
        try:
            pending = await self._start_below(bio, plug)
        except BaseException:
            self._leave()
            raise
        pending.then(self._leave)
        return pending

    def _enter(self) -> None:
        if self.releasing:
            raise BlockError(errno.ESHUTDOWN, f"volume {self.name!r} is being handed over")
        if not self._in_flight:
            self._idle = trio.Event()
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def release(self, timeout_s: float = 30.0) -> bool:
        """Refuse new requests, finish those under way, FLUSH.  True if all finished."""
        self.releasing = True
        waiting = self._in_flight
        with trio.move_on_after(timeout_s):
            await self._idle.wait()
            await self.below.submit(Bio(Op.FLUSH, 0, 0))
            log.info("volume=%s event=released drained=%d", self.name, waiting)
            return True
        log.warning(
            "volume=%s event=release_timed_out in_flight=%d: take over with --takeover",
            self.name,
            self._in_flight,
        )
        return False

    async def aclose(self) -> None:
        await self.below.aclose()
