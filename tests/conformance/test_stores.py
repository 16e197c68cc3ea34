"""The stores pass the conformance check; FileStore's own promises are checked beside it:
exact, sparse files, data kept across reopen, group-commit flushes, long iovecs."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dst.block import (
    IOV_MAX,
    Bio,
    BioFlags,
    BlockLayer,
    FileStore,
    Limits,
    MemoryStore,
    Op,
    Segment,
    submit_split,
)
from dst.block import file as file_module
from dst.errors import BlockError, ConfigError
from tests.conformance.check import MIN_SIZE, check_block_device, pattern

SIZE = 2 * MIN_SIZE
#: Limits like a DRBD-backed stack's: the 32 KiB boundary of seed 000, small requests.
DRBD_LIKE = Limits(boundary=32768, max_bytes=65536, max_segments=4, max_segment_size=4096)

STORE_LIMITS = [
    Limits(),
    DRBD_LIKE,
    Limits(logical_block_size=4096, max_segments=8, boundary=65536),
    Limits(max_segments=1, max_bytes=4096),
]


@pytest.mark.parametrize("limits", STORE_LIMITS, ids=repr)
async def test_memory_store(limits: Limits) -> None:
    @asynccontextmanager
    async def make() -> AsyncIterator[BlockLayer]:
        # strict: a bio the check submits that does not fit the limits fails loudly, so this
        # also proves the edge (validate_bio + submit_split) honours every limit.
        store = MemoryStore(SIZE, limits, strict=True)
        try:
            yield store
        finally:
            await store.aclose()

    await check_block_device(make)


@pytest.mark.parametrize("limits", [None, *STORE_LIMITS], ids=repr)
async def test_file_store(tmp_path: Path, limits: Limits | None) -> None:
    counter = iter(range(100))

    @asynccontextmanager
    async def make() -> AsyncIterator[BlockLayer]:
        store = FileStore.open(tmp_path / f"vol{next(counter)}.img", SIZE, limits=limits)
        try:
            yield store
        finally:
            await store.aclose()

    await check_block_device(make)


async def test_strict_memory_store_rejects_what_does_not_fit() -> None:
    store = MemoryStore(SIZE, DRBD_LIKE, strict=True)
    bio = Bio.from_buffer(Op.WRITE, 32768 - 512, bytes(4096))
    with pytest.raises(BlockError, match="boundary=32768") as info:
        await store.submit(bio)
    assert info.value.errno == errno.EINVAL
    await submit_split(store, bio)  # split at the edge, it goes through
    assert store.statistics().writes == 2 and store.statistics().errors == 1


def test_memory_store_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="size=1000"):
        MemoryStore(1000)
    with pytest.raises(ConfigError, match="size=0"):
        MemoryStore(0)


async def test_file_is_exactly_the_volume_size_and_sparse(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    store = FileStore.open(path, SIZE)
    st = os.stat(path)
    assert st.st_size == SIZE
    assert st.st_blocks == 0, "a new volume file must be sparse"
    assert store.size == SIZE and store.path == str(path)
    await store.aclose()


async def test_reopen_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    data = pattern(7, 64 * 1024)
    store = FileStore.open(path, SIZE)
    await submit_split(store, Bio.from_buffer(Op.WRITE, 4096, data, flags=BioFlags.FUA))
    await store.aclose()
    store = FileStore.open(path, SIZE, create=False)
    buf = bytearray(len(data))
    await store.submit(Bio.from_buffer(Op.READ, 4096, buf))
    assert buf == data
    await store.aclose()


def test_open_refuses_what_it_must(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    path.write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match=f"4096 bytes, not the volume size={SIZE}"):
        FileStore.open(path, SIZE)
    with pytest.raises(ConfigError, match="does not exist"):
        FileStore.open(tmp_path / "missing.img", SIZE, create=False)
    assert not (tmp_path / "missing.img").exists()
    with pytest.raises(ConfigError, match="size=1000"):
        FileStore.open(tmp_path / "odd.img", 1000)
    with pytest.raises(ConfigError, match="Is a directory"):
        FileStore.open(tmp_path, SIZE)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="not a regular file"):
        FileStore.open(tmp_path / "fifo", SIZE)
    with pytest.raises(ConfigError, match="max_segments=1"):
        FileStore.open(tmp_path / "x.img", SIZE, limits=Limits(4096, max_segments=1))


async def test_a_volume_file_is_locked_while_open(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    store = FileStore.open(path, SIZE)
    with pytest.raises(ConfigError, match="in use"):
        FileStore.open(path, SIZE)
    await store.aclose()
    await FileStore.open(path, SIZE).aclose()


class SyncCounter:
    """Stands in for os.fdatasync: counts calls and takes a while, like a real disk."""

    def __init__(self, delay_s: float, fail_with: int | None = None) -> None:
        self.calls = 0
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))


async def test_group_commit_shares_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = SyncCounter(delay_s=0.05)
    monkeypatch.setattr(os, "fdatasync", syncs)
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(store.submit, Bio(Op.FLUSH, 0, 0))
    # The first flush starts a sync; the 19 arriving while it runs share the next one.
    assert 1 <= syncs.calls <= 3, syncs.calls
    stats = store.statistics()
    assert stats.flushes == 20 and stats.syncs == syncs.calls
    await store.aclose()


async def test_flush_waits_for_a_sync_that_starts_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = SyncCounter(delay_s=0.05)
    monkeypatch.setattr(os, "fdatasync", syncs)
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.submit, Bio(Op.FLUSH, 0, 0))
        await trio.sleep(0.01)  # the first sync is running now
        await store.submit(Bio.from_buffer(Op.WRITE, 0, bytes(4096), flags=BioFlags.FUA))
    # The FUA write completed after the first sync started, so it needed a second one.
    assert syncs.calls == 2
    await store.aclose()


async def test_a_failed_fdatasync_poisons_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    monkeypatch.setattr(os, "fdatasync", SyncCounter(0, fail_with=errno.EIO))
    with pytest.raises(BlockError, match=r"FLUSH.*fdatasync failed") as info:
        await store.submit(Bio(Op.FLUSH, 0, 0))
    assert info.value.errno == errno.EIO
    monkeypatch.setattr(os, "fdatasync", SyncCounter(0))
    # fsyncgate: a later fdatasync may "succeed" after the kernel dropped the dirty pages.
    for bio in [Bio(Op.FLUSH, 0, 0), Bio.from_buffer(Op.WRITE, 0, bytes(512))]:
        with pytest.raises(BlockError, match="earlier fdatasync failed") as info:
            await store.submit(bio)
        assert info.value.errno == errno.EIO
    await store.submit(Bio.from_buffer(Op.READ, 0, bytearray(512)))  # reads still work
    await store.aclose()


async def test_segment_list_longer_than_iov_max(tmp_path: Path) -> None:
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    count = 2000
    assert count > IOV_MAX
    raw = bytearray(pattern(8, count * 1024))
    view = memoryview(raw)
    # Every other 512 bytes of the buffer: 2000 separate iovecs.
    segments = tuple(Segment(view, i * 1024 + 1, 512) for i in range(count))
    bio = Bio(Op.WRITE, 512, count * 512, segments)
    await store.submit(bio)
    out = bytearray(count * 1024)
    out_view = memoryview(out)
    into = tuple(Segment(out_view, i * 1024 + 3, 512) for i in range(count))
    await store.submit(Bio(Op.READ, 512, count * 512, into))
    assert b"".join(s.view() for s in into) == bio.data()
    with open(store.path, "rb") as f:
        f.seek(512)
        assert f.read(count * 512) == bio.data()
    assert store.statistics().bytes_written == count * 512
    await store.aclose()


def short_io(real: Callable[..., int], most: int) -> Any:
    """Wrap os.preadv/os.pwritev so each call moves at most ``most`` bytes, cutting the iovec
    list mid-buffer, as a signal or a full pipe can; the store must loop correctly."""

    def call(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        assert len(buffers) <= IOV_MAX
        cut: list[memoryview] = []
        room = most
        for buf in buffers:
            if room <= 0:
                break
            cut.append(memoryview(buf)[:room])
            room -= len(cut[-1])
        return real(fd, cut, offset, *flags)

    return call


async def test_short_reads_and_writes_are_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    monkeypatch.setattr(os, "pwritev", short_io(os.pwritev, 1000))
    monkeypatch.setattr(os, "preadv", short_io(os.preadv, 777))
    raw = bytearray(pattern(10, 64 * 1024))
    view = memoryview(raw)
    segments = tuple(Segment(view, i * 1536 + 5, 1024) for i in range(40))
    bio = Bio(Op.WRITE, 8192, 40 * 1024, segments)
    await store.submit(bio)
    out = bytearray(40 * 1024)
    await store.submit(Bio.from_buffer(Op.READ, 8192, out, page_size=1536))
    assert out == bio.data()
    await store.aclose()
    with open(store.path, "rb") as f:
        f.seek(8192)
        assert f.read(len(out)) == bio.data()


async def test_trim_punches_a_hole(tmp_path: Path) -> None:
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    await store.submit(Bio.from_buffer(Op.WRITE, 0, pattern(9, 1 << 20)))
    allocated = os.stat(store.path).st_blocks
    await store.submit(Bio(Op.TRIM, 0, 1 << 20))
    assert os.stat(store.path).st_blocks < allocated
    await store.submit(Bio.from_buffer(Op.WRITE, 0, pattern(9, 1 << 20)))
    await store.submit(Bio(Op.WRITE_ZEROES, 0, 1 << 20, (), BioFlags.NO_HOLE))
    # NO_HOLE keeps the range allocated (ZERO_RANGE), yet it reads as zeros.
    assert os.stat(store.path).st_blocks >= allocated
    buf = bytearray(1 << 20)
    await store.submit(Bio.from_buffer(Op.READ, 0, buf))
    assert buf == bytes(1 << 20)
    await store.aclose()


async def test_aclose_waits_for_bios_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fdatasync", SyncCounter(delay_s=0.1))
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    done: list[str] = []

    async def flush() -> None:
        await store.submit(Bio(Op.FLUSH, 0, 0))
        done.append("flush")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            await trio.sleep(0.02)
            with trio.CancelScope() as scope:
                scope.cancel()  # a cancelled closer still closes, after the flush
                await store.aclose()
            done.append("closed")
    assert done == ["flush", "closed"]
    with pytest.raises(BlockError) as info:
        await store.submit(Bio(Op.FLUSH, 0, 0))
    assert info.value.errno == errno.ESHUTDOWN


async def test_uncached_reads_fall_back_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached reads run on the event loop with RWF_NOWAIT; when the page cache cannot serve
    them (EAGAIN — simulated here, since dropping pages on demand is not reliable on a busy
    machine) they come from a worker thread instead, with the same bytes."""
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    raw = bytes(pattern(11, 256 * 1024))
    await store.submit(Bio.from_buffer(Op.WRITE, 0, raw, flags=BioFlags.FUA))
    outcomes: list[str] = []
    real = os.preadv
    uncached = True

    def spy(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        if flags and uncached:
            outcomes.append("eagain")
            raise BlockingIOError(errno.EAGAIN, "would block")
        outcomes.append("nowait" if flags else "thread")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", spy)
    out = bytearray(len(raw))
    await store.submit(Bio.from_buffer(Op.READ, 0, out))
    assert out == raw
    assert outcomes[0] == "eagain" and "thread" in outcomes, outcomes
    outcomes.clear()
    uncached = False
    out[:] = bytes(len(out))
    await store.submit(Bio.from_buffer(Op.READ, 0, out))
    assert out == raw
    assert outcomes and set(outcomes) == {"nowait"}, outcomes
    await store.aclose()


async def test_small_writes_go_inline_until_one_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 KiB write is a pwritev on the event loop's thread; one that takes too long (the
    kernel throttling dirty pages) sends the next writes to worker threads; large writes
    always go to threads."""
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    real, slow = os.pwritev, [False]
    threads: list[str] = []

    def pwritev(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        threads.append(threading.current_thread().name)
        if slow[0]:
            time.sleep(file_module.INLINE_WRITE_MAX_S * 3)
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "pwritev", pwritev)
    loop = threading.current_thread().name
    small = bytearray(pattern(1, 4096))
    await store.submit(Bio.from_buffer(Op.WRITE, 0, small))
    big = bytearray(pattern(2, file_module.INLINE_WRITE_BYTES + 4096))
    await store.submit(Bio.from_buffer(Op.WRITE, 8192, big))
    assert threads[0] == loop and threads[1] != loop
    slow[0] = True
    await store.submit(Bio.from_buffer(Op.WRITE, 0, small))  # inline, slow
    slow[0] = False
    await store.submit(Bio.from_buffer(Op.WRITE, 4096, small))  # paused: a thread
    assert threads[2] == loop and threads[3] != loop
    out = bytearray(4096)
    await store.submit(Bio.from_buffer(Op.READ, 4096, out))
    assert out == small
    await store.aclose()


async def test_nowait_completes_cached_reads_and_small_writes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submit_nowait (REQ_NOWAIT) completes a small plain WRITE and a cached READ on the
    spot; anything that would wait — FUA, a large write, FLUSH, a read the page cache cannot
    serve, writes after a failed fdatasync or while inline writes are paused — is declined
    with nothing changed, for submit to do."""
    store = FileStore.open(tmp_path / "vol.img", SIZE)
    small = pattern(21, 4096)
    assert store.submit_nowait(Bio.from_buffer(Op.WRITE, 0, small))
    assert store.statistics().writes == 1
    declined = [
        Bio.from_buffer(Op.WRITE, 8192, pattern(22, 4096), flags=BioFlags.FUA),
        Bio.from_buffer(Op.WRITE, 8192, pattern(23, file_module.INLINE_WRITE_BYTES + 4096)),
        Bio(Op.FLUSH, 0, 0),
        Bio(Op.TRIM, 0, 4096),
    ]
    for bio in declined:
        assert not store.submit_nowait(bio), bio
    out = bytearray(4096)
    assert store.submit_nowait(Bio.from_buffer(Op.READ, 0, out)) and out == small
    assert await read_back(store, 8192, 4096) == bytes(4096), "a declined WRITE landed"

    real = os.preadv

    def uncached(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        if flags:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", uncached)
    assert not store.submit_nowait(Bio.from_buffer(Op.READ, 0, bytearray(4096)))
    monkeypatch.setattr(os, "preadv", real)

    store._threads_until = trio.current_time() + 60  # as after a slow inline write
    assert not store.submit_nowait(Bio.from_buffer(Op.WRITE, 0, small))
    store._threads_until = 0.0

    monkeypatch.setattr(os, "fdatasync", SyncCounter(0, fail_with=errno.EIO))
    with pytest.raises(BlockError):
        await store.submit(Bio(Op.FLUSH, 0, 0))
    assert not store.submit_nowait(Bio.from_buffer(Op.WRITE, 0, small))  # submit says EIO
    assert store.submit_nowait(Bio.from_buffer(Op.READ, 0, bytearray(4096)))
    await store.aclose()
    with pytest.raises(BlockError) as info:
        store.submit_nowait(Bio.from_buffer(Op.READ, 0, bytearray(4096)))
    assert info.value.errno == errno.ESHUTDOWN


async def read_back(store: BlockLayer, offset: int, length: int) -> bytes:
    out = bytearray(length)
    await store.submit(Bio.from_buffer(Op.READ, offset, out))
    return bytes(out)
