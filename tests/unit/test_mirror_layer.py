"""The Mirror layer over in-memory legs, one of which misbehaves on command: failfast drops it
and the I/O completes on the others; the last good leg is retried without the flag; what a
leg missed is in its bitmap on disk; a returning leg gets exactly its dirty extents back."""

from __future__ import annotations

import errno
from pathlib import Path

import trio

from dst.block import Bio, BioFlags, BlockLayer, MemoryStore, Op
from dst.errors import BlockError
from dst.mirror import Leg, LegState, Mirror
from dst.replication.activity_log import ActivityLog
from dst.replication.bitmap import DirtyBitmap

SIZE = 8 << 20
EXTENT = 64 << 10


class FlakyLeg(MemoryStore):
    """A MemoryStore that fails every bio while ``failing``, and records the flags it saw."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.failing = 0  # how many more bios fail (-1: all)
        self.seen_flags: list[BioFlags] = []

    async def submit(self, bio: Bio) -> None:
        self.seen_flags.append(bio.flags)
        await trio.lowlevel.checkpoint()  # in flight together with the other legs' pieces
        if self.failing:
            self.failing -= 1 if self.failing > 0 else 0
            raise BlockError(errno.EIO, "injected")
        await super().submit(bio)


def legs(tmp_path: Path, n: int = 2) -> list[Leg]:
    return [
        Leg(f"leg{i}", FlakyLeg(SIZE), DirtyBitmap.open(tmp_path / f"leg{i}.bitmap", SIZE))
        for i in range(n)
    ]


def store(leg: Leg) -> FlakyLeg:
    assert isinstance(leg.layer, FlakyLeg)
    return leg.layer


async def write(mirror: Mirror, offset: int, data: bytes) -> None:
    await mirror.submit(Bio.from_buffer(Op.WRITE, offset, data))


async def read(mirror: BlockLayer, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await mirror.submit(Bio.from_buffer(Op.READ, offset, buf))
    return bytes(buf)


async def test_a_failing_leg_is_dropped_and_the_write_succeeds(tmp_path: Path) -> None:
    a, b = legs(tmp_path)
    mirror = Mirror([a, b])
    await write(mirror, 0, b"\x01" * 4096)
    assert all(f & BioFlags.FAILFAST for f in store(b).seen_flags), "two good legs: failfast"
    store(b).failing = -1
    await write(mirror, 3 * EXTENT, b"\x02" * 8192)
    assert mirror.state(1) is LegState.ERRED and "injected" in b.reason
    assert await read(mirror, 3 * EXTENT, 8192) == b"\x02" * 8192
    await write(mirror, 5 * EXTENT, b"\x03" * 4096)  # B is skipped now, and marked
    assert b.bitmap.dirty_bytes == 2 * EXTENT and a.bitmap.dirty_bytes == 0
    b.bitmap.close()
    # The marks were on disk before the writes were acknowledged: a new bridge sees them.
    again = DirtyBitmap.open(tmp_path / "leg1.bitmap", SIZE)
    assert list(again.dirty_extents()) == [(3 * EXTENT, EXTENT), (5 * EXTENT, EXTENT)]
    restarted = Mirror([Leg("a", FlakyLeg(SIZE), a.bitmap), Leg("b", FlakyLeg(SIZE), again)])
    assert restarted.state(1) is LegState.ERRED and restarted.state(0) is LegState.IN_SYNC


async def test_the_last_good_leg_is_resubmitted_without_failfast(tmp_path: Path) -> None:
    a, b = legs(tmp_path)
    mirror = Mirror([a, b])
    store(b).failing = -1
    await write(mirror, 0, b"\x01" * 4096)
    assert mirror.state(1) is LegState.ERRED
    store(a).seen_flags.clear()
    await write(mirror, 4096, b"\x02" * 4096)
    assert store(a).seen_flags == [BioFlags.NONE], "LAST_ERRED: no failfast to the last leg"
    # A real error of the last leg reaches the user, and the leg stays.
    store(a).failing = 1
    try:
        await write(mirror, 8192, b"\x03" * 4096)
    except BlockError as exc:
        assert exc.errno == errno.EIO
    else:
        raise AssertionError("the last leg's error was swallowed")
    assert mirror.state(0) is LegState.IN_SYNC


async def test_both_legs_failing_at_once_keeps_one_and_completes(tmp_path: Path) -> None:
    a, b = legs(tmp_path)
    mirror = Mirror([a, b])
    store(a).failing = 1  # one failfast error each, then healthy: "spurious" errors
    store(b).failing = 1
    await write(mirror, 0, b"\x05" * 4096)
    states = {mirror.state(0), mirror.state(1)}
    assert states == {LegState.IN_SYNC, LegState.ERRED}, "exactly one leg dropped"
    good = a if mirror.state(0) is LegState.IN_SYNC else b
    assert store(good).seen_flags[-1] == BioFlags.NONE, "resubmitted without the flag"
    assert await read(mirror, 0, 4096) == b"\x05" * 4096


async def test_a_returning_leg_gets_only_its_dirty_extents(tmp_path: Path) -> None:
    a, b = legs(tmp_path, 3)[:2]
    mirror = Mirror([a, b])
    store(b).failing = -1
    await write(mirror, 0, b"\x01" * 4096)
    for i in range(1, 6):
        await write(mirror, i * 16 * EXTENT + 512, bytes([i]) * 1024)
    assert mirror.state(1) is LegState.ERRED
    dirty = b.bitmap.dirty_bytes
    assert dirty == 6 * EXTENT
    store(b).failing = 0  # it answers again: the watcher resyncs it
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror.run)
        while mirror.state(1) is not LegState.IN_SYNC:
            await mirror.wait_changed()
        nursery.cancel_scope.cancel()
    assert b.resynced_bytes == dirty and b.bitmap.dirty_bytes == 0
    assert bytes(store(a)._data) == bytes(store(b)._data)
    store(b).seen_flags.clear()
    await write(mirror, 0, b"\x07" * 4096)
    assert store(b).seen_flags == [BioFlags.FAILFAST], "two good legs again: failfast is back"


async def test_after_a_bridge_crash_the_active_extents_are_resynced(tmp_path: Path) -> None:
    # A crashed run: a write's extent was active on disk, and it never ended.
    al = ActivityLog.open(tmp_path / "vol0.al", SIZE)
    al.begin(5 << 20, 4096)
    al.commit()
    al.close()
    al = ActivityLog.open(tmp_path / "vol0.al", SIZE)
    a, b = legs(tmp_path)
    await store(a).submit(Bio.from_buffer(Op.WRITE, 5 << 20, b"\x09" * 4096))  # A got it, B not
    mirror = Mirror([a, b], activity_log=al)
    await mirror.recover()
    assert mirror.state(0) is LegState.IN_SYNC and mirror.state(1) is LegState.ERRED
    extent = 4 << 20  # the activity log's extent
    assert list(b.bitmap.dirty_extents()) == [(extent, extent)] and not a.bitmap.dirty_bytes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror.run)
        while mirror.state(1) is not LegState.IN_SYNC:
            await mirror.wait_changed()
        nursery.cancel_scope.cancel()
    assert bytes(store(a)._data) == bytes(store(b)._data)
    await mirror.aclose()  # a clean stop empties the log
    al.close()
    assert ActivityLog.open(tmp_path / "vol0.al", SIZE).was_clean


async def test_a_bio_over_the_mirror_cap_is_split_not_refused(tmp_path: Path) -> None:
    a, b = legs(tmp_path)
    mirror = Mirror([a, b], activity_log=ActivityLog.open(tmp_path / "vol0.al", SIZE))
    await mirror.submit(Bio(Op.TRIM, 0, SIZE))
    data = bytes(range(256)) * (6 << 12)
    await write(mirror, 512, data)
    assert await read(mirror, 512, len(data)) == data
    assert mirror.limits.max_bytes < len(data)


async def test_a_write_interrupted_between_legs_keeps_the_activity_log(tmp_path: Path) -> None:
    # Cancelled with the write on leg A and not on B, nothing marked: a clean stop must not
    # clear the log, or the next start would trust legs that differ.
    a, b = legs(tmp_path)
    mirror = Mirror([a, b], activity_log=ActivityLog.open(tmp_path / "vol0.al", SIZE))
    await write(mirror, 0, b"\x01" * 4096)  # a write that completes leaves nothing to keep
    original = store(b).submit

    async def stuck(bio: Bio) -> None:
        if bio.op is Op.WRITE and bio.offset == 5 << 20:
            await trio.sleep_forever()
        await original(bio)

    store(b).submit = stuck  # type: ignore[method-assign]
    with trio.move_on_after(0.1) as scope:
        await write(mirror, 5 << 20, b"\x02" * 4096)
    assert scope.cancelled_caught
    assert await read(store(a), 5 << 20, 4096) == b"\x02" * 4096  # A has it, B does not
    await mirror.aclose()  # a clean stop, which clears the log when nothing was interrupted
    assert mirror._active.al is not None
    mirror._active.al.close()
    reopened = ActivityLog.open(tmp_path / "vol0.al", SIZE)
    assert not reopened.was_clean
    assert any(o <= 5 << 20 < o + n for o, n in reopened.recovered_extents)
