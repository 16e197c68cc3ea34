"""DirtyBitmap: bits, runs, persistence, and the crash rule "over-report, never under-report".

Crashes are simulated by copying the file while the bitmap is open (what a power cut would
leave: the last flushed state) and opening the copy.  Torn flushes are simulated sector by
sector: every mix of old and new 512-byte sectors of a page the flush rewrote must read back
with every bit that was set in both images, and the crc must turn any real mix into "all dirty".
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.errors import BlockError, ConfigError
from dst.replication.bitmap import (
    BITS_PER_PAGE,
    DEFAULT_EXTENT_SIZE,
    MAX_BITMAP_BYTES,
    MIN_EXTENT_SIZE,
    DirtyBitmap,
)
from dst.replication.pagefile import PAGE_SIZE, PageFile

KiB, MiB = 1 << 10, 1 << 20
ES = DEFAULT_EXTENT_SIZE
SECTOR = 512


def crash_copy(path: Path, name: str = "crashed.bitmap") -> Path:
    """What a power cut leaves: the file as it is on disk now (the bitmap stays open)."""
    copy = path.with_name(name)
    shutil.copyfile(path, copy)
    return copy


@contextlib.contextmanager
def opened(path: Path, size: int, extent_size: int = ES) -> Iterator[DirtyBitmap]:
    bitmap = DirtyBitmap.open(path, size, extent_size)
    try:
        yield bitmap
    finally:
        bitmap.close()


def on_disk(path: Path, extent: int) -> bool:
    """Read one extent's bit straight from the file, as a restarted node would."""
    payload = PAGE_SIZE - 4
    page, byte = divmod(extent >> 3, payload)
    with open(path, "rb") as f:
        f.seek((1 + page) * PAGE_SIZE + byte)
        return bool(f.read(1)[0] >> (extent & 7) & 1)


def dirty_set(bitmap: DirtyBitmap) -> set[int]:
    es = bitmap.extent_size
    return {
        e
        for offset, length in bitmap.dirty_extents()
        for e in range(offset // es, -(-(offset + length) // es))
    }


def test_new_bitmap_is_clean_and_sized_in_pages(tmp_path: Path) -> None:
    path = tmp_path / "vol.bitmap"
    with_size = 10 * MiB + 4 * KiB  # a short last extent
    bm = DirtyBitmap.open(path, with_size)
    assert bm.dirty_bytes == 0 and list(bm.dirty_extents()) == []
    assert not bm.is_dirty(0, with_size)
    assert path.stat().st_size == 2 * PAGE_SIZE  # header + one page of bits
    stats = bm.statistics()
    assert (stats.extents, stats.dirty_extents, stats.torn_pages) == (161, 0, 0)
    bm.close()
    bm.close()  # idempotent


def test_mark_merges_runs_and_clips_the_short_last_extent(tmp_path: Path) -> None:
    size = 10 * ES + 4 * KiB
    bm = DirtyBitmap.open(tmp_path / "v.bitmap", size)
    bm.mark(ES + 1, 1)  # one byte dirties its whole extent
    bm.mark(2 * ES - 512, 1024)  # straddles extents 1 and 2
    bm.mark(5 * ES, ES)
    bm.mark(size - 512, 512)  # the short last extent
    assert list(bm.dirty_extents()) == [(ES, 2 * ES), (5 * ES, ES), (10 * ES, 4 * KiB)]
    assert bm.dirty_bytes == 3 * ES + 4 * KiB
    assert bm.is_dirty(ES, 1) and bm.is_dirty(0, ES + 1) and not bm.is_dirty(0, ES)
    assert not bm.is_dirty(3 * ES, 2 * ES) and bm.is_dirty(3 * ES, 2 * ES + 1)
    bm.close()


def test_clear_drops_only_whole_extents(tmp_path: Path) -> None:
    size = 8 * ES + 4 * KiB
    bm = DirtyBitmap.open(tmp_path / "v.bitmap", size)
    bm.mark_all()
    assert bm.dirty_bytes == size and list(bm.dirty_extents()) == [(0, size)]
    assert bm.clear(ES // 2, ES) == 0  # covers no extent whole
    assert bm.clear(ES // 2, 2 * ES) == 1  # extent 1 only
    assert bm.clear(3 * ES, 2 * ES - 1) == 1  # extent 3; extent 4 misses a byte
    assert bm.clear(8 * ES, 4 * KiB) == 1  # the short last extent, up to the volume's end
    assert bm.clear(ES, ES) == 0  # already clean
    assert list(bm.dirty_extents()) == [(0, ES), (2 * ES, ES), (4 * ES, 4 * ES)]
    bm.close()


def test_mark_says_when_a_flush_is_needed(tmp_path: Path) -> None:
    bm = DirtyBitmap.open(tmp_path / "v.bitmap", 64 * ES)
    assert bm.mark(0, 4096) is True  # newly set
    assert bm.mark(0, 4096) is True  # set, but its page is not on disk yet
    assert bm.flush() == 1
    assert bm.mark(0, 4096) is False  # dirty on disk already: acknowledge without a flush
    assert bm.mark(ES, 1) is True
    assert bm.flush() == 1 and bm.flush() == 0  # nothing changed: no I/O
    assert bm.mark(0, 0) is False
    bm.close()


def test_a_page_being_flushed_still_needs_a_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second write to an extent whose page another flush is writing right now must not be
    # acknowledged on the strength of that flush: the bit is not on disk until it returns.
    path = tmp_path / "v.bitmap"
    bm = DirtyBitmap.open(path, 64 * ES)
    bm.mark(0, 1)
    seen: list[tuple[bool, bool]] = []
    real_write = PageFile.write

    def write_with_a_racing_mark(self: PageFile, pages: list[tuple[int, bytes]]) -> None:
        seen.append((bm.mark(0, 1), on_disk(path, 0)))
        real_write(self, pages)

    monkeypatch.setattr(PageFile, "write", write_with_a_racing_mark)
    bm.flush()
    assert seen == [(True, False)]
    monkeypatch.undo()
    assert bm.flush() == 0 and bm.mark(0, 1) is False  # the first flush covered it after all
    bm.close()


def test_flushed_marks_survive_a_crash_and_unflushed_ones_do_not(tmp_path: Path) -> None:
    path = tmp_path / "v.bitmap"
    bm = DirtyBitmap.open(path, 64 * ES)
    bm.mark(3 * ES, 10)
    bm.flush()
    bm.mark(9 * ES, 10)  # never flushed: this is why the caller flushes before acknowledging
    with opened(crash_copy(path), 64 * ES) as after:
        assert dirty_set(after) == {3}
    bm.close()  # close flushes
    with opened(path, 64 * ES) as after:
        assert dirty_set(after) == {3, 9}


def test_clears_are_lazy_and_a_lost_clear_only_over_reports(tmp_path: Path) -> None:
    path = tmp_path / "v.bitmap"
    bm = DirtyBitmap.open(path, 64 * ES)
    bm.mark(0, 4 * ES)
    bm.flush()
    bm.clear(0, 2 * ES)
    assert dirty_set(bm) == {2, 3}
    with opened(crash_copy(path), 64 * ES) as after:
        assert dirty_set(after) == {0, 1, 2, 3}  # a redundant resync, nothing lost
    bm.flush()
    with opened(crash_copy(path, "again.bitmap"), 64 * ES) as after:
        assert dirty_set(after) == {2, 3}
    bm.close()


def test_every_torn_page_over_reports(tmp_path: Path) -> None:
    # 3 pages of bits at 4 KiB extents.  Page 1 carries acknowledged bits (on disk, kept),
    # bits being set by the flush that tears, and bits being cleared by it.
    size = 3 * BITS_PER_PAGE * 4 * KiB
    path = tmp_path / "v.bitmap"
    bm = DirtyBitmap.open(path, size, MIN_EXTENT_SIZE)
    base = BITS_PER_PAGE
    kept = {base + 1, base + 5000, base + 30000}
    cleared = {base + 100, base + 20000}
    for e in kept | cleared:
        bm.mark(e * 4 * KiB, 1)
    bm.flush()
    old = path.read_bytes()
    for e in cleared:
        bm.clear(e * 4 * KiB, 4 * KiB)
    added = {base + 7, base + 12000, base + 32000}
    for e in added:
        bm.mark(e * 4 * KiB, 1)
    bm.flush()
    new = path.read_bytes()
    bm.close()
    page_at = 2 * PAGE_SIZE  # file page 2 = data page 1
    page_end = page_at + PAGE_SIZE
    assert old[:page_at] == new[:page_at] and old[page_end:] == new[page_end:]
    tears = 0
    for mix in itertools.product((False, True), repeat=PAGE_SIZE // SECTOR):
        image = bytearray(old)
        for i, take_new in enumerate(mix):
            if take_new:
                at = page_at + i * SECTOR
                image[at : at + SECTOR] = new[at : at + SECTOR]
        torn = tmp_path / "torn.bitmap"
        torn.write_bytes(image)
        with opened(torn, size, MIN_EXTENT_SIZE) as after:
            got = dirty_set(after)
            assert kept <= got  # never under-report an acknowledged write
            if image == new:
                assert got == kept | added
            elif image == old:
                assert got == kept | cleared
            else:  # a real tear: the crc catches it, the whole page reads back dirty
                tears += 1
                assert got == set(range(base, 2 * base))
                assert after.statistics().torn_pages == 1
    assert tears > 0


def test_a_torn_page_is_rewritten_clean_at_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "v.bitmap"
    with opened(path, 64 * ES) as bm:
        bm.mark(0, 1)
    data = bytearray(path.read_bytes())
    data[PAGE_SIZE + 100] ^= 0xFF
    path.write_bytes(data)
    bm = DirtyBitmap.open(path, 64 * ES)
    assert dirty_set(bm) == set(range(64)) and bm.statistics().torn_pages == 1
    assert bm.statistics().pending_pages == 1
    bm.clear(ES, 63 * ES)
    bm.close()
    with opened(path, 64 * ES) as again:
        assert dirty_set(again) == {0} and again.statistics().torn_pages == 0


def test_a_truncated_file_reads_back_all_dirty(tmp_path: Path) -> None:
    path = tmp_path / "v.bitmap"
    DirtyBitmap.open(path, 64 * ES).close()
    os.truncate(path, PAGE_SIZE + 10)
    with opened(path, 64 * ES) as bm:
        assert bm.dirty_bytes == 64 * ES


def test_only_changed_pages_are_written(tmp_path: Path) -> None:
    size = 4 * BITS_PER_PAGE * 4 * KiB
    path = tmp_path / "v.bitmap"
    bm = DirtyBitmap.open(path, size, MIN_EXTENT_SIZE)
    before = path.read_bytes()
    bm.mark(0, 1)  # page 0
    bm.mark(2 * BITS_PER_PAGE * 4 * KiB, 1)  # page 2
    assert bm.flush() == 2
    after = path.read_bytes()
    pages = [slice((1 + i) * PAGE_SIZE, (2 + i) * PAGE_SIZE) for i in range(4)]
    assert [before[p] == after[p] for p in pages] == [False, True, False, True]
    # A run that crosses a page's and a scan chunk's boundary comes back whole.
    start = (BITS_PER_PAGE - 3) * 4 * KiB
    bm.mark(start, 10 * 4 * KiB)
    assert list(bm.dirty_extents())[1] == (start, 10 * 4 * KiB)
    assert bm.statistics().pages_written == 2
    bm.close()
    assert bm.statistics().pages_written == 4


def test_create_dirty_and_mark_all(tmp_path: Path) -> None:
    size = 5 * ES + 512
    with opened(tmp_path / "a.bitmap", size) as clean:
        assert clean.dirty_bytes == 0
    dirty = DirtyBitmap.open(tmp_path / "b.bitmap", size, create_dirty=True)
    assert list(dirty.dirty_extents()) == [(0, size)] and dirty.dirty_bytes == size
    dirty.close()
    # create_dirty applies to a new file only.
    with opened(tmp_path / "a.bitmap", size) as reopened:
        assert reopened.dirty_bytes == 0


@pytest.mark.parametrize(
    ("extent_size", "volume_size"),
    [(ES * 2, 64 * ES), (ES, 65 * ES)],
)
def test_a_bitmap_of_another_geometry_is_refused(
    tmp_path: Path, extent_size: int, volume_size: int
) -> None:
    path = tmp_path / "v.bitmap"
    DirtyBitmap.open(path, 64 * ES).close()
    with pytest.raises(ConfigError, match="made for extent_size=65536 volume_size=4194304"):
        DirtyBitmap.open(path, volume_size, extent_size)


def test_damaged_headers_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.bitmap"
    DirtyBitmap.open(path, 64 * ES).close()
    good = path.read_bytes()
    for at, message in [(0, "not this kind of file"), (20, "header crc32c mismatch")]:
        bad = bytearray(good)
        bad[at] ^= 1
        path.write_bytes(bad)
        with pytest.raises(ConfigError, match=message):
            DirtyBitmap.open(path, 64 * ES)
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="not this kind of file"):
        DirtyBitmap.open(path, 64 * ES)


@pytest.mark.parametrize(
    ("volume_size", "extent_size", "field"),
    [
        (MiB, 3 * KiB, "extent_size=3072"),
        (MiB, 2 * KiB, "extent_size=2048"),
        (MiB, 2 << 30, "extent_size=2147483648"),
        (MiB, 96 * KiB, "extent_size=98304"),
        (0, ES, "volume_size=0"),
        ((MAX_BITMAP_BYTES * 8 + 8) * 4 * KiB, 4 * KiB, "MAX_BITMAP_BYTES"),
    ],
)
def test_bad_geometry_is_a_config_error(
    tmp_path: Path, volume_size: int, extent_size: int, field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        DirtyBitmap.open(tmp_path / "v.bitmap", volume_size, extent_size)
    assert not (tmp_path / "v.bitmap").exists()


def test_a_second_opener_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.bitmap"
    with opened(path, 64 * ES), pytest.raises(ConfigError, match="in use"):
        DirtyBitmap.open(path, 64 * ES)


def test_out_of_range_and_closed(tmp_path: Path) -> None:
    bm = DirtyBitmap.open(tmp_path / "v.bitmap", 64 * ES)
    for offset, length in [(-1, 1), (64 * ES, 1), (0, 64 * ES + 1), (5, -1)]:
        with pytest.raises(ValueError, match="outside volume"):
            bm.mark(offset, length)
    bm.close()
    with pytest.raises(BlockError) as info:
        bm.mark(0, 1)
    assert info.value.errno == errno.ESHUTDOWN


def test_a_failed_fdatasync_poisons_the_bitmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bm = DirtyBitmap.open(tmp_path / "v.bitmap", 64 * ES)
    bm.mark(0, 1)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(BlockError) as info:
        bm.flush()
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    # Linux may have dropped the pages and would report success now: never trust it again.
    for call in (bm.flush, lambda: bm.mark(ES, 1)):
        with pytest.raises(BlockError, match="failed"):
            call()
    assert bm.statistics().pending_pages == 1
    bm.close()  # releases the file without trying again


def test_concurrent_marks_and_flushes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v.bitmap"
    size = 2 * BITS_PER_PAGE * 4 * KiB
    bm = DirtyBitmap.open(path, size, MIN_EXTENT_SIZE)
    errors: list[BaseException] = []

    def writer(first: int) -> None:
        try:
            for e in range(first, 2 * BITS_PER_PAGE, 997):
                if bm.mark(e * 4 * KiB, 4 * KiB):
                    bm.flush()
                # The rule under test: once mark (and the flush it asked for) returned, the
                # bit is on disk — even if another thread's flush was writing its page.
                assert on_disk(path, e), e
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = dirty_set(bm)
    with opened(crash_copy(path), size, MIN_EXTENT_SIZE) as after:
        assert dirty_set(after) == expected
    bm.close()


OPS = st.lists(
    st.tuples(
        st.sampled_from(["mark", "clear", "flush", "crash"]),
        st.integers(0, 40 * 4 * KiB - 1),
        st.integers(0, 12 * 4 * KiB),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(1, 4 * KiB).map(lambda k: 36 * 4 * KiB + k))
def test_random_operations_match_a_model(ops: list[tuple[str, int, int]], size: int) -> None:
    es = 4 * KiB
    extents = -(-size // es)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.bitmap"
        bm = DirtyBitmap.open(path, size, es)
        memory: set[int] = set()
        disk: set[int] = set()
        try:
            for op, offset, length in ops:
                offset = min(offset, size - 1)
                length = min(length, size - offset)
                if op == "mark" and length:
                    bm.mark(offset, length)
                    memory |= set(range(offset // es, (offset + length - 1) // es + 1))
                elif op == "clear" and length:
                    end = offset + length
                    last = extents if end == size else end // es
                    memory -= set(range(-(-offset // es), last))
                    bm.clear(offset, length)
                elif op == "flush":
                    bm.flush()
                    disk = set(memory)
                elif op == "crash":
                    with opened(crash_copy(path), size, es) as after:
                        assert dirty_set(after) == disk
                assert dirty_set(bm) == memory
                clipped = sum(min((e + 1) * es, size) - e * es for e in memory)
                assert bm.dirty_bytes == clipped == bm.statistics().dirty_bytes
        finally:
            bm.close()
        with opened(path, size, es) as reopened:
            assert dirty_set(reopened) == memory
