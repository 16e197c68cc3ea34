"""The Fence layer (epochs and the takeover interlock), Ownership's attach rules and the
ReplayWindow, over a MemoryStore."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from dst.block import Bio, Completion, MemoryStore, Op, Plug
from dst.errors import BlockError, FencedError
from dst.fence import Fence, Ownership
from dst.fence.replay import ReplayWindow

MiB = 1 << 20


class Gated(MemoryStore):
    """Writes wait for ``opened``."""

    def __init__(self) -> None:
        super().__init__(MiB)
        self.opened = trio.Event()

    async def submit(self, bio: Bio) -> None:
        if bio.op is Op.WRITE:
            await self.opened.wait()
        await super().submit(bio)


def write(offset: int, data: bytes, epoch: int) -> Bio:
    bio = Bio.from_buffer(Op.WRITE, offset, data)
    return Bio(bio.op, bio.offset, bio.length, bio.segments, bio.flags, epoch)


async def test_advance_fences_at_once_drains_then_persists() -> None:
    store = Gated()
    persisted: list[int] = []

    async def persist(epoch: int) -> None:
        persisted.append(epoch)

    fence = Fence(store, 1, persist, name="v")
    advanced = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fence.submit, write(0, b"o" * 512, 1))  # the old owner's write
        await trio.testing.wait_all_tasks_blocked()

        async def advance() -> None:
            assert await fence.advance(2) == 2
            advanced.set()

        nursery.start_soon(advance)
        await trio.testing.wait_all_tasks_blocked()
        assert fence.epoch == 2 and not advanced.is_set() and persisted == []
        with pytest.raises(FencedError) as info:  # refused at the door, at once
            await fence.submit(write(0, b"l" * 512, 1))
        assert info.value.errno == errno.ESTALE
        store.opened.set()
    assert advanced.is_set() and persisted == [2]
    await fence.submit(write(0, b"n" * 512, 2))
    out = bytearray(512)
    await fence.submit(Bio.from_buffer(Op.READ, 0, out))
    assert out == b"n" * 512
    assert fence.statistics().stale_rejected == 1 and fence.statistics().advances == 1


async def test_unfenced_requests_pass() -> None:
    async def persist(epoch: int) -> None:
        pass

    fence = Fence(MemoryStore(MiB), 5, persist)
    await fence.submit(write(0, b"r" * 512, 0))  # a replication peer's or a resync's write
    await fence.submit(Bio.from_buffer(Op.READ, 0, bytearray(512)))
    await fence.submit(Bio(Op.FLUSH, 0, 0))
    assert await fence.advance(3) == 5  # never backwards


async def test_ownership_rules() -> None:
    async def persist(epoch: int) -> None:
        pass

    own = Ownership(Fence(MemoryStore(MiB), 1, persist), "v")
    assert await own.claim("reader", "share", 0) == 1
    assert await own.claim("a", "own", 0) == 2  # a fresh claim moves the epoch on
    with pytest.raises(BlockError) as busy:
        await own.claim("b", "own", 0)
    assert busy.value.errno == errno.EBUSY and "held by a" in str(busy.value)
    assert await own.claim("a", "own", 2) == 2  # a reconnect keeps its epoch
    assert await own.claim("b", "takeover", 0) == 3
    with pytest.raises(FencedError):
        await own.claim("a", "own", 2)  # a was taken over
    with pytest.raises(BlockError):
        await own.claim("c", "own", 0)  # b holds it now
    own.release("b")
    assert await own.claim("c", "own", 0) == 4  # free: b's session is gone


def test_replay_window() -> None:
    window = ReplayWindow(capacity=3)
    assert window.admit(1, 0) and window.admit(1, 1) and window.admit(2, 0)
    assert not window.admit(1, 0)
    assert window.admit(3, 0) and window.admit(4, 0)  # (1, 0) and (1, 1) fall out
    assert not window.admit(1, 1)  # below the window: old by definition
    assert not window.admit(3, 0) and window.admit(5, 0)
    with pytest.raises(ValueError):
        ReplayWindow(0)


class Inline(MemoryStore):
    """A store that completes every bio at once (submit_nowait)."""

    def submit_nowait(self, bio: Bio) -> bool:
        self._apply(bio)
        return True


async def test_nowait_passes_the_current_epoch_and_refuses_an_older_one() -> None:
    async def persist(epoch: int) -> None:
        pass

    store = Inline(MiB)
    fence = Fence(store, 2, persist, name="v")
    assert fence.submit_nowait(write(0, b"n" * 512, 2))
    assert fence.submit_nowait(write(512, b"z" * 512, 0))  # a peer's or resync write
    with pytest.raises(FencedError) as info:
        fence.submit_nowait(write(0, b"o" * 512, 1))
    assert info.value.errno == errno.ESTALE and fence.stale_rejected == 1
    assert store.contents(0, 1024) == b"n" * 512 + b"z" * 512
    fence.below = MemoryStore(MiB)  # a layer that cannot: declined, for submit
    assert not fence.submit_nowait(write(0, b"n" * 512, 2))


class Started(MemoryStore):
    """Starts every bio and completes it when the test says (``finish``)."""

    can_start = True

    def __init__(self) -> None:
        super().__init__(MiB)
        self.started: list[tuple[Bio, Completion]] = []

    async def start(self, bio: Bio, plug: Plug | None = None) -> Completion:
        done = Completion()
        self.started.append((bio, done))
        return done

    def finish(self) -> None:
        for bio, done in self.started:
            self._apply(bio)
            done.finish()
        self.started.clear()


async def test_a_started_write_is_fenced_and_in_flight_until_its_callbacks() -> None:
    """Fence.start refuses an older epoch as submit does, and an advance waits for a write
    started before it until that write's completion — not just until start returned."""
    persisted: list[int] = []

    async def persist(epoch: int) -> None:
        persisted.append(epoch)

    store = Started()
    fence = Fence(store, 2, persist, name="v")
    assert fence.can_start
    with pytest.raises(FencedError):
        await fence.start(write(0, b"o" * 512, 1))
    pending = await fence.start(write(0, b"n" * 512, 2))
    assert fence.statistics().in_flight == 1 and store.started
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fence.advance, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert fence.epoch == 3 and persisted == []  # fenced at once, draining
        with pytest.raises(FencedError):
            await fence.start(write(0, b"x" * 512, 2))
        store.finish()
    assert pending.error is None and persisted == [3]
    assert fence.statistics().in_flight == 0 and store.contents(0, 512) == b"n" * 512
    fence.below = MemoryStore(MiB)
    assert not fence.can_start
