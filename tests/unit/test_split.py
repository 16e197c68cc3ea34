"""The generic splitter: any valid bio, any valid limits (seed 000's "cannot be split").

Hypothesis generates bios whose segments are carved at random offsets out of random buffers
(many of them tiny), at random sector-aligned device offsets, and limits of every kind; each
piece is then re-checked here against every limit independently of ``Limits.fits``, the data
must round-trip, and a READ's pieces must fill the caller's own buffers (no copies).  The
explicit shapes below are the ones the seeds name: 63-sector partition starts, 4 KiB bios of
scattered 512-byte segments across DRBD's 32 KiB boundary, writev with holes.

The strategies here (``limits_st``, ``bio_st``) are imported by ``test_limits.py``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.block import SECTOR_SIZE, Bio, BioFlags, Limits, Op, Segment, split, validate_bio

MiB = 1 << 20
#: A device big enough for every generated bio, for validate_bio.
DEVICE_SIZE = 4 * MiB
DATA_OPS = (Op.READ, Op.WRITE)
ALL_OPS = (Op.READ, Op.WRITE, Op.TRIM, Op.WRITE_ZEROES)
FLAG_CHOICES = [
    BioFlags.NONE,
    BioFlags.FUA,
    BioFlags.PREFLUSH,
    BioFlags.FUA | BioFlags.PREFLUSH | BioFlags.FAILFAST,
]

Draw = Callable[[st.SearchStrategy[Any]], Any]


def _cap(multiple: int, most: int) -> st.SearchStrategy[int]:
    """0 (no limit) or a multiple of ``multiple`` up to ``most`` times it."""
    return st.one_of(st.just(0), st.integers(1, most).map(lambda k: k * multiple))


@st.composite
def limits_st(draw: Draw, lbs: int | None = None) -> Limits:
    """Arbitrary valid limits (tight ones are likely, so splitting really happens)."""
    if lbs is None:
        lbs = draw(st.sampled_from([512, 1024, 4096]))
    min_segments = lbs // SECTOR_SIZE
    boundary = draw(
        st.one_of(
            _cap(lbs, 96),
            st.sampled_from([4096, 32768, 65536]).filter(lambda b: b % lbs == 0),
        )
    )
    return Limits(
        logical_block_size=lbs,
        page_size=draw(st.sampled_from([512, 4096, 16384, 65536])),
        max_bytes=draw(_cap(lbs, 48)),
        max_segments=draw(st.one_of(st.just(0), st.integers(min_segments, min_segments + 12))),
        max_segment_size=draw(_cap(SECTOR_SIZE, 12)),
        boundary=boundary,
    ).validate()


@st.composite
def bio_st(draw: Draw, lbs: int = 512, ops: Sequence[Op] = ALL_OPS) -> Bio:
    """An arbitrary valid bio for a device with this logical block size."""
    op = draw(st.sampled_from(ops))
    offset = draw(st.integers(0, MiB // lbs)) * lbs
    flags = draw(st.sampled_from(FLAG_CHOICES))
    if op not in DATA_OPS:
        return Bio(op, offset, draw(st.integers(1, 200)) * lbs, (), flags)
    # Segment sizes in sectors, mostly tiny; padded so the total is a multiple of lbs.
    sectors = draw(st.lists(st.one_of(st.just(1), st.integers(1, 20)), min_size=1, max_size=24))
    pad = -sum(sectors) % (lbs // SECTOR_SIZE)
    if pad:
        sectors.append(pad)
    # Carve each segment out of one of a few buffers, with random gaps before it, so segments
    # sit at odd buffer offsets and several share one buffer with holes between them.
    nbufs = draw(st.integers(1, 4))
    cursors = [draw(st.integers(0, 700)) for _ in range(nbufs)]
    layout: list[tuple[int, int, int]] = []
    for count in sectors:
        which = draw(st.integers(0, nbufs - 1))
        start = cursors[which] + draw(st.integers(0, 300))
        layout.append((which, start, count * SECTOR_SIZE))
        cursors[which] = start + count * SECTOR_SIZE
    rng = random.Random(draw(st.integers(0, 2**32)))
    readonly = op is Op.WRITE and draw(st.booleans())
    bufs: list[memoryview] = []
    for end in cursors:
        raw = rng.randbytes(end + draw(st.integers(0, 300)))
        bufs.append(memoryview(raw if readonly else bytearray(raw)))
    segments = tuple(Segment(bufs[which], start, length) for which, start, length in layout)
    return Bio(op, offset, sum(s.length for s in segments), segments, flags)


@st.composite
def bio_and_limits(draw: Draw) -> tuple[Bio, Limits]:
    limits = draw(limits_st())
    return draw(bio_st(limits.logical_block_size)), limits


def check_pieces(bio: Bio, limits: Limits, pieces: list[Bio]) -> None:
    """Every property a split must have, checked without trusting ``Limits.fits``."""
    lbs = limits.logical_block_size
    assert pieces, "no pieces"
    assert pieces[0].offset == bio.offset
    assert sum(p.length for p in pieces) == bio.length
    position = bio.offset
    original_bufs = {id(s.buf) for s in bio.segments}
    for index, piece in enumerate(pieces):
        where = f"piece {index} of {len(pieces)}: offset={piece.offset} length={piece.length}"
        assert piece.offset == position, where
        position += piece.length
        assert piece.op is bio.op, where
        assert piece.length > 0 and piece.length % lbs == 0 and piece.offset % lbs == 0, where
        if limits.max_bytes:
            assert piece.length <= limits.max_bytes, where
        if limits.boundary:
            first, last = piece.offset, piece.offset + piece.length - 1
            assert first // limits.boundary == last // limits.boundary, where
        if bio.op in DATA_OPS:
            assert sum(s.length for s in piece.segments) == piece.length, where
            if limits.max_segments:
                assert len(piece.segments) <= limits.max_segments, where
            for segment in piece.segments:
                assert segment.length > 0 and segment.length % SECTOR_SIZE == 0, where
                if limits.max_segment_size:
                    assert segment.length <= limits.max_segment_size, where
                # A slice of the caller's own buffer, not a copy.
                assert id(segment.buf) in original_bufs, where
        else:
            assert piece.segments == (), where
        expected = bio.flags if index == 0 else bio.flags & ~BioFlags.PREFLUSH
        assert piece.flags == expected, where
        assert limits.fits(piece), where
        validate_bio(piece, limits, DEVICE_SIZE)
    if bio.op in DATA_OPS:
        assert b"".join(p.data() for p in pieces) == bio.data()


def check_read_lands_in_place(bio: Bio, pieces: list[Bio]) -> None:
    """Filling the pieces' views fills the bio's segments, and nothing outside them."""
    bufs = {id(s.buf): s.buf for s in bio.segments}
    before = {key: bytes(buf) for key, buf in bufs.items()}
    blob = random.Random(bio.offset).randbytes(bio.length)
    position = 0
    for piece in pieces:
        for view in piece.views():
            view[:] = blob[position : position + len(view)]
            position += len(view)
    assert bio.data() == blob
    # Bytes outside the segments (the holes between them) are untouched: overlay the
    # segments' new bytes on the old buffer and it must equal the new buffer.
    expected = {key: bytearray(old) for key, old in before.items()}
    for s in bio.segments:
        expected[id(s.buf)][s.offset : s.offset + s.length] = s.view()
    for key, buf in bufs.items():
        assert bytes(buf) == bytes(expected[key])


@settings(max_examples=400, deadline=None)
@given(bio_and_limits())
def test_split_any_bio_any_limits(case: tuple[Bio, Limits]) -> None:
    bio, limits = case
    validate_bio(bio, limits, DEVICE_SIZE)
    pieces = split(bio, limits)
    check_pieces(bio, limits, pieces)
    if limits.fits(bio):
        assert len(pieces) == 1 and pieces[0] is bio
    if bio.op is Op.READ:
        check_read_lands_in_place(bio, pieces)


@settings(max_examples=100, deadline=None)
@given(limits_st())
def test_flush_is_never_split(limits: Limits) -> None:
    flush = Bio(Op.FLUSH, 0, 0, (), BioFlags.PREFLUSH)
    assert split(flush, limits) == [flush] and split(flush, limits)[0] is flush


def test_untouched_segments_are_reused() -> None:
    buf = memoryview(bytearray(8192))
    bio = Bio.from_buffer(Op.WRITE, 0, buf, page_size=4096)
    pieces = split(bio, Limits(max_segments=1))
    assert [p.segments[0] for p in pieces] == list(bio.segments)
    assert all(p.segments[0] is s for p, s in zip(pieces, bio.segments, strict=True))


def scattered_4k_bio(op: Op, offset: int) -> tuple[Bio, bytearray]:
    """Eight 512-byte segments on scattered pages of one buffer, at odd offsets in each page
    (Xen's scattered I/O buffers in seed 000)."""
    pages = [5, 2, 9, 0, 14, 7, 3, 11]
    buf = bytearray(random.Random(1).randbytes(16 * 4096))
    view = memoryview(buf)
    segments = tuple(
        Segment(view, page * 4096 + 1 + 371 * i, SECTOR_SIZE) for i, page in enumerate(pages)
    )
    return Bio(op, offset, 4096, segments), buf


@pytest.mark.parametrize("k", [0, 1, 7])
@pytest.mark.parametrize("op", DATA_OPS)
def test_seed_000_scattered_4k_at_sector_63_across_32k(op: Op, k: int) -> None:
    offset = (63 + 64 * k) * SECTOR_SIZE  # sector 63 of a 32 KiB chunk: 512 bytes before its end
    boundary = 32768 * (k + 1)
    assert offset < boundary < offset + 4096, "the bio must straddle the boundary"
    bio, _ = scattered_4k_bio(op, offset)
    limits = Limits(boundary=32768, max_segment_size=4096).validate()
    pieces = split(bio, limits)
    assert [(p.offset, p.length, len(p.segments)) for p in pieces] == [
        (offset, 512, 1),
        (boundary, 3584, 7),
    ]
    check_pieces(bio, limits, pieces)
    if op is Op.READ:
        check_read_lands_in_place(bio, pieces)


WRITEV_LIMITS = [
    Limits(),
    Limits(max_segments=1),
    Limits(max_bytes=1024),
    Limits(boundary=1024),
    Limits(boundary=4096),
    Limits(logical_block_size=1024, max_segments=2, boundary=2048),
    Limits(max_segment_size=512, max_segments=3),
]


@pytest.mark.parametrize("limits", WRITEV_LIMITS, ids=repr)
@pytest.mark.parametrize("offset", [0, 63 * 512, 4096 - 1024])
def test_writev_2k_with_three_holes(limits: Limits, offset: int) -> None:
    buf = bytearray(random.Random(2).randbytes(4096))
    view = memoryview(buf)
    starts = [0, 700, 1500, 2900]  # holes of 188, 288 and 388 bytes between the segments
    # A device with 1 KiB blocks has no sector 63: start at the block it falls in.
    offset -= offset % limits.logical_block_size
    bio = Bio(Op.WRITE, offset, 2048, tuple(Segment(view, s, 512) for s in starts))
    limits.validate()
    validate_bio(bio, limits, DEVICE_SIZE)
    pieces = split(bio, limits)
    check_pieces(bio, limits, pieces)
    assert b"".join(p.data() for p in pieces) == b"".join(buf[s : s + 512] for s in starts)


CASES_6K_9K = [
    # (length, offset, limits, expected pieces as (offset, length))
    (
        6144,
        29696,
        Limits(boundary=32768, max_segments=1),
        [(29696, 3072), (32768, 1024), (33792, 2048)],
    ),
    (6144, 29696, Limits(boundary=32768, max_bytes=4096), [(29696, 3072), (32768, 3072)]),
    (
        9216,
        32256,
        Limits(boundary=32768, max_segments=1),
        [(32256, 512), (32768, 3584), (36352, 4096), (40448, 1024)],
    ),
    (
        9216,
        32256,
        Limits(boundary=32768, max_bytes=4096),
        [(32256, 512), (32768, 4096), (36864, 4096), (40960, 512)],
    ),
]


@pytest.mark.parametrize(("length", "offset", "limits", "expected"), CASES_6K_9K)
@pytest.mark.parametrize("op", DATA_OPS)
def test_misaligned_6k_and_9k_across_32k(
    op: Op, length: int, offset: int, limits: Limits, expected: list[tuple[int, int]]
) -> None:
    assert offset % 4096, "the offset must not be 4 KiB aligned"
    buf = bytearray(random.Random(length).randbytes(length))
    bio = Bio.from_buffer(op, offset, buf)  # 4 KiB pages: segments 4096, 2048 / 4096, 4096, 1024
    pieces = split(bio, limits.validate())
    assert [(p.offset, p.length) for p in pieces] == expected
    check_pieces(bio, limits, pieces)
    if op is Op.READ:
        check_read_lands_in_place(bio, pieces)


@pytest.mark.parametrize("op", [Op.TRIM, Op.WRITE_ZEROES])
def test_trim_and_zeroes_cut_by_bytes_and_boundary_only(op: Op) -> None:
    bio = Bio(op, 32256, 70 * 1024, (), BioFlags.FUA | BioFlags.PREFLUSH | BioFlags.NO_HOLE)
    limits = Limits(boundary=32768, max_bytes=16384, max_segments=1, max_segment_size=512)
    pieces = split(bio, limits.validate())
    assert [(p.offset, p.length) for p in pieces] == [
        (32256, 512),
        (32768, 16384),
        (49152, 16384),
        (65536, 16384),
        (81920, 16384),
        (98304, 5632),
    ]
    check_pieces(bio, limits, pieces)
    assert all(p.flags & BioFlags.NO_HOLE for p in pieces)


def test_2000_tiny_segments_into_few_segments_per_piece() -> None:
    buf = bytearray(random.Random(3).randbytes(2000 * 1024))
    view = memoryview(buf)
    segments = tuple(Segment(view, i * 1024 + 3, 512) for i in range(2000))
    bio = Bio(Op.WRITE, 8192, 2000 * 512, segments, BioFlags.FUA)
    limits = Limits(logical_block_size=4096, max_segments=8).validate()
    pieces = split(bio, limits)
    assert len(pieces) == 250
    check_pieces(bio, limits, pieces)


@pytest.mark.parametrize("op", DATA_OPS)
def test_segment_slots_running_out_mid_block_end_the_piece_at_a_block(op: Op) -> None:
    """With 4 KiB blocks and 8 slots, 8 segments may hold 5 KiB: the piece keeps one block
    and hands the rest of its last segments back to the next piece."""
    lengths = [512] * 7 + [1536] + [512] * 7 + [3584]
    buf = bytearray(random.Random(4).randbytes(sum(lengths) + 100 * len(lengths)))
    view = memoryview(buf)
    segments, start = [], 7
    for length in lengths:
        segments.append(Segment(view, start, length))
        start += length + 93
    bio = Bio(op, 4096 * 5, sum(lengths), tuple(segments))
    limits = Limits(logical_block_size=4096, max_segments=8).validate()
    pieces = split(bio, limits)
    assert [(p.offset - bio.offset, p.length, len(p.segments)) for p in pieces] == [
        (0, 4096, 8),
        (4096, 4096, 7),
        (8192, 4096, 2),
    ]
    # The 1536-byte segment is shared: its first sector ends piece 1, the rest opens piece 2.
    assert pieces[0].segments[-1] == Segment(view, segments[7].offset, 512)
    assert pieces[1].segments[0] == Segment(view, segments[7].offset + 512, 1024)
    check_pieces(bio, limits, pieces)
    if op is Op.READ:
        check_read_lands_in_place(bio, pieces)
