"""A StartingLayer over any test layer, for the NBD bridge's started path (dst.nbd.bridge):
each started bio runs in a task of the test's nursery and calls back, the shape RemoteVolume
has, around the test layers that gate, slow or fail bios."""

from __future__ import annotations

from collections.abc import Callable

import trio

from dst.block import Bio, BlockLayer, Limits, Plug
from dst.errors import BlockError

__all__ = ["Starting"]


class _Done:
    """A Pending: the outcome of one started bio."""

    def __init__(self) -> None:
        self.error: BlockError | None = None
        self.finished = False
        self.callbacks: list[Callable[[], None]] = []

    def then(self, callback: Callable[[], None]) -> None:
        if self.finished:
            callback()
        else:
            self.callbacks.append(callback)

    def finish(self) -> None:
        self.finished = True
        for callback in self.callbacks:
            callback()


class Starting:
    """A StartingLayer over ``below``; started bios run in ``nursery``."""

    can_start = True

    def __init__(self, below: BlockLayer, nursery: trio.Nursery) -> None:
        self.below, self.nursery = below, nursery

    @property
    def limits(self) -> Limits:
        return self.below.limits

    @property
    def size(self) -> int:
        return self.below.size

    async def submit(self, bio: Bio) -> None:
        await self.below.submit(bio)

    async def start(self, bio: Bio, plug: Plug | None = None) -> _Done:
        done = _Done()

        async def run() -> None:
            try:
                await self.below.submit(bio)
            except BlockError as exc:
                done.error = exc
            done.finish()

        self.nursery.start_soon(run)
        return done

    async def aclose(self) -> None:
        await self.below.aclose()
