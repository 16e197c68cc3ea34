"""The Mirror's started path (dst/mirror/started.py) over in-memory legs that start bios
(tests/integration/starting.py), one of which fails on command: the leg rules are those of
``Mirror.submit`` — a FAILFAST failure drops the leg and the write completes on the other,
marked in the dropped leg's bitmap on disk before the completion; the last good leg is
resubmitted without the flag; a read a leg fails is served by another — and a write whose
range is busy waits for it, in a task, and lands after."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dst.block import Bio, BioFlags, BlockLayer, Op, Pending, Plug
from dst.errors import BlockError
from dst.mirror import Leg, LegState, Mirror
from dst.mirror import layer as mirror_layer
from dst.replication.activity_log import ActivityLog
from tests.integration.starting import Starting
from tests.unit.test_mirror_layer import EXTENT, FlakyLeg, legs

GUARD_S = 10


def flaky(leg: Leg) -> FlakyLeg:
    assert isinstance(leg.layer, Starting) and isinstance(leg.layer.below, FlakyLeg)
    return leg.layer.below


@pytest.fixture(autouse=True)
def no_return(monkeypatch: pytest.MonkeyPatch) -> None:
    """No return and resync here (test_mirror_layer.py has them): a dropped leg stays."""
    monkeypatch.setattr(mirror_layer, "watch_leg", lambda mirror, i: trio.sleep_forever())


@asynccontextmanager
async def started_mirror(
    tmp_path: Path, activity_log: ActivityLog | None = None
) -> AsyncIterator[Mirror]:
    """A running Mirror over two FlakyLegs that start bios (each in a task, calling back)."""
    async with trio.open_nursery() as nursery:
        a, b = legs(tmp_path)
        for leg in (a, b):
            leg.layer = Starting(leg.layer, nursery)
        mirror = Mirror([a, b], activity_log=activity_log)
        await nursery.start(mirror.run)
        assert mirror.can_start
        with trio.fail_after(GUARD_S):
            yield mirror
        nursery.cancel_scope.cancel()


async def start(mirror: Mirror, bio: Bio) -> Pending:
    plug = Plug()
    pending = await mirror.start(bio, plug)
    await plug.flush()
    return pending


async def outcome(pending: Pending) -> BlockError | None:
    done = trio.Event()
    pending.then(done.set)
    await done.wait()
    return pending.error


async def write(mirror: Mirror, offset: int, data: bytes) -> BlockError | None:
    return await outcome(await start(mirror, Bio.from_buffer(Op.WRITE, offset, data)))


async def read(layer: BlockLayer, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await layer.submit(Bio.from_buffer(Op.READ, offset, buf))
    return bytes(buf)


async def test_a_write_and_a_read_start_on_the_legs_with_failfast(tmp_path: Path) -> None:
    async with started_mirror(tmp_path) as mirror:
        a, b = mirror.legs
        assert await write(mirror, EXTENT, b"\x01" * 8192) is None
        buf = bytearray(8192)
        assert await outcome(await start(mirror, Bio.from_buffer(Op.READ, EXTENT, buf))) is None
        assert buf == b"\x01" * 8192
        assert mirror.started == 2, "neither went to a task"
        for leg in (a, b):
            assert await read(leg.layer, EXTENT, 8192) == b"\x01" * 8192
        assert flaky(a).seen_flags[0] & BioFlags.FAILFAST, "two good legs: failfast"
        assert flaky(b).seen_flags[0] & BioFlags.FAILFAST


async def test_a_dropped_leg_is_marked_on_disk_before_the_write_completes(
    tmp_path: Path,
) -> None:
    async with started_mirror(tmp_path) as mirror:
        a, b = mirror.legs
        flaky(b).failing = -1
        pending = await start(mirror, Bio.from_buffer(Op.WRITE, 3 * EXTENT, b"\x02" * 4096))
        seen: list[tuple[bool, int]] = []
        pending.then(
            lambda: seen.append(
                (b.bitmap.is_dirty(3 * EXTENT, 4096), b.bitmap.statistics().pending_pages)
            )
        )
        assert await outcome(pending) is None, "the write completes on the good leg"
        assert seen == [(True, 0)], "marked, and flushed, when the write completed"
        assert mirror.state(1) is LegState.ERRED and "injected" in b.reason
        assert a.bitmap.dirty_bytes == 0
        # B gets no more writes: the next ones are marked in its bitmap, A has them.
        assert await write(mirror, 5 * EXTENT, b"\x03" * 4096) is None
        assert list(b.bitmap.dirty_extents()) == [(3 * EXTENT, EXTENT), (5 * EXTENT, EXTENT)]


async def test_the_last_good_leg_is_resubmitted_without_failfast(tmp_path: Path) -> None:
    async with started_mirror(tmp_path) as mirror:
        a, b = mirror.legs
        flaky(a).failing = 1  # one failfast error each, then healthy: "spurious" errors
        flaky(b).failing = 1
        assert await write(mirror, 0, b"\x05" * 4096) is None
        states = {mirror.state(0), mirror.state(1)}
        assert states == {LegState.IN_SYNC, LegState.ERRED}, "exactly one leg dropped"
        good = a if mirror.state(0) is LegState.IN_SYNC else b
        assert flaky(good).seen_flags[-1] == BioFlags.NONE, "resubmitted without the flag"
        assert await read(mirror, 0, 4096) == b"\x05" * 4096
        # A real error of the last leg reaches the user, and the leg stays.
        flaky(good).failing = 1
        error = await write(mirror, 8192, b"\x06" * 4096)
        assert error is not None and error.errno == errno.EIO
        assert good.reason == "" and mirror.state(mirror.legs.index(good)) is LegState.IN_SYNC


async def test_a_read_a_leg_fails_is_served_by_the_other(tmp_path: Path) -> None:
    async with started_mirror(tmp_path) as mirror:
        assert await write(mirror, 0, b"\x07" * 4096) is None
        flaky(mirror.legs[1]).failing = -1
        results = []
        for _ in range(2):  # round-robin: one of the two reads goes to B
            buf = bytearray(4096)
            results.append(await outcome(await start(mirror, Bio.from_buffer(Op.READ, 0, buf))))
            assert buf == b"\x07" * 4096
        assert results == [None, None]
        assert mirror.state(1) is LegState.ERRED and mirror.state(0) is LegState.IN_SYNC


async def test_a_write_over_a_busy_range_waits_in_a_task_and_lands_after(
    tmp_path: Path,
) -> None:
    async with started_mirror(tmp_path) as mirror:
        gate = trio.Event()
        slow = flaky(mirror.legs[0])
        original = slow.submit

        async def gated(bio: Bio) -> None:
            if bio.op is Op.WRITE and bytes(bio.segments[0].view())[:1] == b"\x08":
                await gate.wait()
            await original(bio)

        slow.submit = gated  # type: ignore[method-assign]
        first = await start(mirror, Bio.from_buffer(Op.WRITE, 0, b"\x08" * 8192))
        second = await start(mirror, Bio.from_buffer(Op.WRITE, 4096, b"\x09" * 4096))
        assert mirror.started == 1, "the overlapping write was not started"
        second_done = trio.Event()
        second.then(second_done.set)
        await trio.sleep(0.05)
        assert not second_done.is_set(), "it waits for the first"
        gate.set()
        assert await outcome(first) is None and await outcome(second) is None
        for leg in mirror.legs:
            data = await read(leg.layer, 0, 8192)
            assert data == b"\x08" * 4096 + b"\x09" * 4096


async def test_a_write_cancelled_while_starting_on_a_leg_gives_its_range_back(
    tmp_path: Path,
) -> None:
    al = ActivityLog.open(tmp_path / "vol0.al", 8 << 20)
    async with started_mirror(tmp_path, al) as mirror:
        assert mirror.starts is not None
        start_b = mirror.starts[1]
        assert await write(mirror, 65536, b"\x09" * 4096) is None  # the extent active on disk

        async def stuck(bio: Bio, plug: Plug | None = None) -> Pending:
            await trio.sleep_forever()  # a leg whose start waits (for a slot, say)
            return await start_b(bio, plug)

        mirror.starts[1] = stuck
        with trio.move_on_after(0.1) as scope:
            await start(mirror, Bio.from_buffer(Op.WRITE, 0, b"\x0a" * 4096))
        assert scope.cancelled_caught
        mirror.starts[1] = start_b
        # Leg A got the write and completed it: its range is free for the next one.
        assert await write(mirror, 0, b"\x0b" * 4096) is None
        assert await read(mirror.legs[0].layer, 0, 4096) == b"\x0b" * 4096
        # B never got the first: the activity log outlives this stop (test_mirror_layer.py).
        await mirror.aclose()
    al.close()
    assert not ActivityLog.open(tmp_path / "vol0.al", 8 << 20).was_clean
