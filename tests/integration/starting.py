"""A StartingLayer over any test layer, for the NBD bridge's started path (dst.nbd.bridge):
each started bio runs in a task of the test's nursery and calls back, the shape RemoteVolume
has, around the test layers that gate, slow or fail bios.  And TaskSteps, which counts the
scheduler passes each task takes."""

from __future__ import annotations

from collections import Counter

import trio

from dst.block import Bio, BlockLayer, Completion, Limits, Plug
from dst.block.layer import submit_in_task

__all__ = ["Starting", "TaskSteps"]


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

    async def start(self, bio: Bio, plug: Plug | None = None) -> Completion:
        return await submit_in_task(self.below, bio, self.nursery, plug, "test layer")

    async def aclose(self) -> None:
        await self.below.aclose()


class TaskSteps(trio.abc.Instrument):
    """A Trio instrument: how many steps each task (by name) ran while it was installed."""

    def __init__(self) -> None:
        self.steps: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1
