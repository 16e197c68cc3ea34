"""ActivityLog: the hot set, LRU eviction, and recovery after a crash at any point.

The property that matters: whenever a write is in flight (issued after ``begin`` and, if asked,
``commit``; not yet ``end``-ed), the log on disk — opened as a restarted primary would open it —
names its extent.  It is checked after every step of random schedules by opening a copy of the
file, and for torn commits by splicing the first bytes of the record being written over the file
as it was before the commit.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.errors import BlockError, ConfigError
from dst.replication.activity_log import (
    MAX_SLOTS,
    RING_RECORDS,
    ActivityLog,
    ActivityLogFullError,
)
from dst.replication.pagefile import PAGE_SIZE, PageFile

MiB = 1 << 20
ES = 4 * MiB
SIZE = 64 * ES + 512  # a short last extent


def extents_of(ranges: list[tuple[int, int]], es: int = ES) -> set[int]:
    return {
        e for offset, length in ranges for e in range(offset // es, -(-(offset + length) // es))
    }


def reopen(path: Path, image: bytes | None = None, size: int = SIZE, es: int = ES) -> set[int]:
    """The extents a primary restarted on this file (or on ``image``) would resync."""
    copy = path.with_name("restarted.al")
    copy.write_bytes(path.read_bytes() if image is None else image)
    log = ActivityLog.open(copy, size, es)
    try:
        return extents_of(log.active_extents(), es)
    finally:
        log.close()


def test_a_new_log_is_clean_and_the_first_write_needs_a_commit(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    log = ActivityLog.open(path, SIZE)
    assert log.was_clean and log.active_extents() == [] and log.recovered_extents == []
    assert path.stat().st_size == (1 + RING_RECORDS) * PAGE_SIZE
    assert log.begin(ES + 10, 4096) is True
    assert reopen(path) == set()  # not yet committed: the write must wait
    log.commit()
    assert reopen(path) == {1}
    assert log.begin(ES, 4096) is False  # already durable: no commit, no I/O
    log.end(ES + 10, 4096)
    log.end(ES, 4096)
    assert log.active_extents() == [(ES, ES)]  # stays hot until evicted
    stats = log.statistics()
    assert (stats.active, stats.in_use, stats.commits) == (1, 0, 1)
    log.close()
    log.close()


def test_a_write_across_extents_and_the_short_last_extent(tmp_path: Path) -> None:
    log = ActivityLog.open(tmp_path / "v.al", SIZE)
    assert log.begin(2 * ES - 512, 1024) is True
    assert log.begin(SIZE - 512, 512) is True
    log.commit()
    assert log.active_extents() == [(ES, 2 * ES), (64 * ES, 512)]
    assert log.begin(0, 0) is False  # a FLUSH touches no extent
    log.close()


def test_lru_eviction_needs_a_commit_and_skips_extents_in_use(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    log = ActivityLog.open(path, SIZE, slots=3)
    for e in (0, 1, 2):
        log.begin(e * ES, 1)
    log.commit()
    log.end(0, 1)
    log.end(2 * ES, 1)
    log.begin(0, 1)  # touch 0: now 2 is the least recently used idle extent (1 is busy)
    log.end(0, 1)
    assert log.begin(5 * ES, 1) is True
    assert extents_of(log.active_extents()) == {0, 1, 5}
    assert reopen(path) == {0, 1, 2}  # until the commit, the evicted extent stays on disk
    log.commit()
    assert reopen(path) == {0, 1, 5}
    assert log.statistics().evictions == 1
    log.close()


def test_a_full_log_refuses_and_changes_nothing(tmp_path: Path) -> None:
    log = ActivityLog.open(tmp_path / "v.al", SIZE, slots=2)
    log.begin(0, 1)
    log.begin(ES, 1)
    with pytest.raises(ActivityLogFullError, match="slots=2"):
        log.begin(2 * ES, 1)
    with pytest.raises(ActivityLogFullError):
        log.begin(ES, 2 * ES)  # needs extents 1 and 2; only 1 is held
    assert log.statistics().active == 2
    log.end(0, 1)
    assert log.begin(2 * ES, 1) is True  # now extent 0 can go
    log.close()


def test_end_without_begin_is_a_bug(tmp_path: Path) -> None:
    log = ActivityLog.open(tmp_path / "v.al", SIZE)
    with pytest.raises(ValueError, match="without a matching begin"):
        log.end(0, 1)
    log.begin(0, 1)
    log.end(0, 1)
    with pytest.raises(ValueError, match="without a matching begin"):
        log.end(0, 1)
    with pytest.raises(ValueError, match="outside volume"):
        log.begin(SIZE, 1)
    log.close()


def test_clear_commits_an_empty_set_for_a_clean_restart(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    log = ActivityLog.open(path, SIZE)
    log.begin(0, 1)
    log.commit()
    with pytest.raises(ValueError, match="in flight"):
        log.clear()
    log.end(0, 1)
    log.clear()
    log.close()
    again = ActivityLog.open(path, SIZE)
    assert again.was_clean and again.active_extents() == []
    again.close()


def test_reopen_after_a_crash_recovers_the_set(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    log = ActivityLog.open(path, SIZE)
    log.begin(3 * ES, 1)
    log.begin(7 * ES, ES + 1)
    seq = log.commit()
    log.close()  # a crash: no clear
    again = ActivityLog.open(path, SIZE)
    assert not again.was_clean
    assert again.recovered_extents == again.active_extents() == [(3 * ES, ES), (7 * ES, 2 * ES)]
    assert again.statistics().sequence == seq and again.statistics().recovered == 3
    # The recovered extents are idle: they go when room is needed, and recovered_extents keeps
    # saying what the crash left, for the caller that marks the bitmap.
    assert again.begin(0, 1) is True
    again.commit()
    assert again.recovered_extents == [(3 * ES, ES), (7 * ES, 2 * ES)]
    again.close()


def test_the_ring_wraps_and_the_newest_record_wins(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    log = ActivityLog.open(path, SIZE, slots=1)
    for i in range(3 * RING_RECORDS + 3):
        log.begin(i % 64 * ES, 1)
        last = log.commit()
        log.end(i % 64 * ES, 1)
        assert reopen(path) == {i % 64}
    log.close()
    again = ActivityLog.open(path, SIZE, slots=1)
    assert again.statistics().sequence == last
    again.close()


def test_a_torn_record_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    log = ActivityLog.open(path, SIZE, slots=2)
    log.begin(0, 1)
    log.begin(ES, 1)
    log.commit()
    log.end(ES, 1)  # extent 0 still has a write in flight; extent 1 is done
    before = path.read_bytes()
    assert log.begin(2 * ES, 1) is True  # evicts 1, adds 2
    seq = log.commit()
    after = path.read_bytes()
    at = (1 + seq % RING_RECORDS) * PAGE_SIZE
    assert before[:at] == after[:at] and before[at + PAGE_SIZE :] == after[at + PAGE_SIZE :]
    for cut in range(0, PAGE_SIZE + 1, 512):
        torn = before[:at] + after[at : at + cut] + before[at + cut :]
        got = reopen(path, torn)
        assert 0 in got  # the write in flight is covered whatever survived
        assert got == ({0, 2} if cut == PAGE_SIZE else {0, 1})
    garbage = before[:at] + bytes(random.Random(1).randbytes(PAGE_SIZE)) + before[at + PAGE_SIZE :]
    assert reopen(path, garbage) == {0, 1}
    log.close()


def test_no_valid_record_means_the_whole_volume(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    ActivityLog.open(path, SIZE).close()
    data = bytearray(path.read_bytes())
    data[PAGE_SIZE:] = bytes(len(data) - PAGE_SIZE)
    path.write_bytes(data)
    log = ActivityLog.open(path, SIZE)
    assert not log.was_clean
    assert log.active_extents() == log.recovered_extents == [(0, SIZE)]
    assert log.begin(0, 1) is True
    log.commit()
    assert log.active_extents() == [(0, ES)]
    log.close()


def test_a_commit_in_flight_does_not_cover_an_extent_it_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Extent 0 is idle and in the durable record.  A commit evicting it is being written when a
    # write to extent 0 begins: the durable record still lists 0, but the record landing now
    # does not — so that write must wait for another commit.
    log = ActivityLog.open(tmp_path / "v.al", SIZE, slots=2)
    log.begin(0, 1)
    log.begin(ES, 1)
    log.commit()
    log.end(0, 1)
    log.end(ES, 1)
    log.begin(ES, 1)  # touch 1, so 0 is the LRU victim
    log.end(ES, 1)
    assert log.begin(2 * ES, 1) is True  # evicts 0
    answers: list[bool] = []
    real_write = PageFile.write

    def write_with_a_racing_begin(self: PageFile, pages: list[tuple[int, bytes]]) -> None:
        answers.append(log.begin(0, 1))  # re-activates 0, evicting idle 1
        real_write(self, pages)

    monkeypatch.setattr(PageFile, "write", write_with_a_racing_begin)
    log.commit()
    monkeypatch.undo()
    assert answers == [True]
    log.commit()
    assert reopen(tmp_path / "v.al") == {0, 2}
    log.close()


def test_a_failed_commit_poisons_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = ActivityLog.open(tmp_path / "v.al", SIZE)
    log.begin(0, 1)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(BlockError) as info:
        log.commit()
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    # What reached the disk is unknown: no write may rely on the log any more.
    for call in (log.commit, lambda: log.begin(ES, 1)):
        with pytest.raises(BlockError, match="failed"):
            call()
    log.close()
    with pytest.raises(BlockError) as closed:
        log.begin(0, 1)
    assert closed.value.errno == errno.ESHUTDOWN


def test_slots_may_shrink_between_runs(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    log = ActivityLog.open(path, SIZE, slots=8)
    for e in range(8):
        log.begin(e * ES, 1)
    log.commit()
    log.close()
    small = ActivityLog.open(path, SIZE, slots=2)
    assert len(extents_of(small.active_extents())) == 8
    assert small.begin(20 * ES, 1) is True  # evicts down to the new bound
    assert small.statistics().active == 2
    small.commit()
    small.close()
    assert reopen(path) == {7, 20}


@pytest.mark.parametrize(
    ("size", "extent_size", "slots", "field"),
    [
        (SIZE, 3 * MiB, 64, "extent_size=3145728"),
        (SIZE, 2048, 64, "extent_size=2048"),
        (0, ES, 64, "volume_size=0"),
        (SIZE, ES, 0, "slots=0"),
        (SIZE, ES, MAX_SLOTS + 1, f"slots={MAX_SLOTS + 1}"),
        ((1 << 32) * 4096 + 4096, 4096, 64, "MAX_EXTENTS"),
    ],
)
def test_bad_geometry_is_a_config_error(
    tmp_path: Path, size: int, extent_size: int, slots: int, field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        ActivityLog.open(tmp_path / "v.al", size, extent_size, slots)


def test_a_log_of_another_geometry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.al"
    ActivityLog.open(path, SIZE).close()
    with pytest.raises(ConfigError, match="made for extent_size=4194304"):
        ActivityLog.open(path, SIZE, 8 * MiB)
    with pytest.raises(ConfigError, match=f"volume_size={SIZE}"):
        ActivityLog.open(path, SIZE + 512)
    first = ActivityLog.open(path, SIZE)
    try:
        with pytest.raises(ConfigError, match="in use"):
            ActivityLog.open(path, SIZE)
    finally:
        first.close()


# -- random schedules, crash at every step -----------------------------------------------------

STEPS = st.lists(
    st.tuples(st.sampled_from(["write", "write", "complete", "clear"]), st.integers(0, 15)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(STEPS, st.integers(1, 6))
def test_every_write_in_flight_is_on_disk_at_every_step(
    steps: list[tuple[str, int]], slots: int
) -> None:
    es, size = 64 << 10, 16 * (64 << 10)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.al"
        log = ActivityLog.open(path, size, es, slots)
        in_flight: list[tuple[int, int]] = []  # issued writes: (offset, length)
        try:
            for op, n in steps:
                if op == "write":
                    offset, length = n * es + es // 2, es if n % 3 == 0 else 512
                    length = min(length, size - offset)
                    try:
                        must_commit = log.begin(offset, length)
                    except ActivityLogFullError:
                        continue
                    if must_commit:
                        before = path.read_bytes()
                        seq = log.commit()
                        after = path.read_bytes()
                        # A crash mid-commit: any prefix of the new record over the old file.
                        at = (1 + seq % RING_RECORDS) * PAGE_SIZE
                        for cut in (0, 512, PAGE_SIZE - 4, PAGE_SIZE):
                            torn = before[:at] + after[at : at + cut] + before[at + cut :]
                            got = reopen(path, torn, size, es)
                            assert extents_of(in_flight, es) <= got
                    in_flight.append((offset, length))
                elif op == "complete" and in_flight:
                    log.end(*in_flight.pop(n % len(in_flight)))
                elif op == "clear" and not in_flight:
                    log.clear()
                assert extents_of(in_flight, es) <= reopen(path, None, size, es)
                assert log.statistics().active <= max(slots, log.statistics().recovered)
        finally:
            log.close()
