"""Limits: validation at assembly time, and the stacking rules of Linux blk_stack_limits.

The boundary rule is the one with history: Linux stacked ``chunk_sectors`` with lcm and moved
to gcd after a regression.  The property tests pin why gcd is right — a piece that fits the
stacked limits fits every layer's own limits — and a counterexample shows lcm is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dst.block import UNLIMITED, Bio, Limits, Op, split
from dst.errors import ConfigError
from tests.unit.test_split import DEVICE_SIZE, bio_st, limits_st


def test_defaults_are_valid_and_unlimited() -> None:
    assert Limits().validate() == UNLIMITED
    assert UNLIMITED.logical_block_size == 512
    assert (UNLIMITED.max_bytes, UNLIMITED.max_segments) == (0, 0)
    assert (UNLIMITED.max_segment_size, UNLIMITED.boundary) == (0, 0)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"logical_block_size": 256}, "logical_block_size=256"),
        ({"logical_block_size": 1536}, "logical_block_size=1536"),
        ({"logical_block_size": 0}, "logical_block_size=0"),
        ({"page_size": 1000}, "page_size=1000"),
        ({"page_size": 256}, "page_size=256"),
        ({"max_bytes": -512}, "max_bytes=-512"),
        ({"max_bytes": 1000}, "max_bytes=1000"),
        ({"logical_block_size": 4096, "max_bytes": 2048}, "max_bytes=2048"),
        ({"logical_block_size": 4096, "max_bytes": 6144}, "max_bytes=6144"),
        ({"max_segments": -1}, "max_segments=-1"),
        ({"logical_block_size": 4096, "max_segments": 7}, "max_segments=7"),
        ({"max_segment_size": 100}, "max_segment_size=100"),
        ({"max_segment_size": -512}, "max_segment_size=-512"),
        ({"boundary": 1000}, "boundary=1000"),
        ({"logical_block_size": 4096, "boundary": 6144}, "boundary=6144"),
        ({"boundary": -4096}, "boundary=-4096"),
    ],
)
def test_validate_rejects_and_names_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Limits(**fields).validate()


@pytest.mark.parametrize(
    "limits",
    [
        Limits(logical_block_size=4096, max_segments=8, max_segment_size=512),
        Limits(max_segments=1, max_bytes=512),
        Limits(boundary=3 * 512),  # boundaries need not be powers of two
        Limits(logical_block_size=4096, page_size=65536, max_bytes=1 << 20, boundary=32768),
    ],
    ids=repr,
)
def test_validate_accepts_and_returns_self(limits: Limits) -> None:
    assert limits.validate() is limits


def test_stack_combines_like_blk_stack_limits() -> None:
    top = Limits(page_size=4096, max_bytes=65536, max_segments=0, max_segment_size=4096)
    below = Limits(
        logical_block_size=4096, page_size=16384, max_bytes=131072, max_segments=16, boundary=32768
    )
    assert top.stack(below) == Limits(
        logical_block_size=4096,  # granularity: max
        page_size=16384,  # max
        max_bytes=65536,  # caps: min not zero
        max_segments=16,
        max_segment_size=4096,
        boundary=32768,  # gcd not zero
    )


def test_stack_rounds_max_bytes_down_to_the_larger_block_size() -> None:
    top = Limits(max_bytes=6144)
    assert top.stack(Limits(logical_block_size=4096)).max_bytes == 4096


@pytest.mark.parametrize(
    ("top", "below", "named"),
    [
        # A cap below the block size of another layer: not even one block fits.
        (Limits(max_bytes=2048), Limits(logical_block_size=4096), "max_bytes"),
        # One segment cannot hold a 4 KiB block made of scattered sectors (no bouncing).
        (Limits(max_segments=1), Limits(logical_block_size=4096), "max_segments"),
        # gcd(1536, 4096) = 512: a 4 KiB block would cross it.
        (Limits(boundary=1536), Limits(logical_block_size=4096), "boundary"),
    ],
)
def test_impossible_stacks_are_config_errors(top: Limits, below: Limits, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        top.stack(below)


@settings(max_examples=300, deadline=None)
@given(limits_st())
def test_unlimited_is_the_identity(limits: Limits) -> None:
    expected = dataclasses.replace(limits, page_size=max(limits.page_size, 4096))
    assert limits.stack(UNLIMITED) == expected
    assert UNLIMITED.stack(limits) == expected


@settings(max_examples=300, deadline=None)
@given(limits_st(), limits_st(), limits_st())
def test_stack_is_commutative_and_associative(a: Limits, b: Limits, c: Limits) -> None:
    def stacked(x: Limits, y: Limits) -> Limits | None:
        try:
            return x.stack(y)
        except ConfigError:
            return None

    ab = stacked(a, b)
    assert ab == stacked(b, a)
    bc = stacked(b, c)
    left = stacked(ab, c) if ab is not None else None
    right = stacked(a, bc) if bc is not None else None
    if left is not None and right is not None:
        assert left == right
    # An impossible stack is impossible whichever way it is folded.
    if left is None and ab is not None:
        assert right is None


@st.composite
def two_layers_and_a_bio(draw: Any) -> tuple[Limits, Limits, Limits, Bio]:
    upper, lower = draw(limits_st()), draw(limits_st())
    try:
        stacked = upper.stack(lower)
    except ConfigError:
        assume(False)
        raise
    return upper, lower, stacked, draw(bio_st(stacked.logical_block_size))


@settings(max_examples=400, deadline=None)
@given(two_layers_and_a_bio())
def test_a_piece_that_fits_the_stack_fits_every_layer(
    case: tuple[Limits, Limits, Limits, Bio],
) -> None:
    """Seed 000 as a property: what the top advertises must be enough for every layer."""
    upper, lower, stacked, bio = case
    for piece in split(bio, stacked):
        assert stacked.fits(piece)
        assert upper.fits(piece), (upper.misfit(piece), upper)
        assert lower.fits(piece), (lower.misfit(piece), lower)


def crosses(offset: int, length: int, boundary: int) -> bool:
    return offset // boundary != (offset + length - 1) // boundary


@settings(max_examples=500, deadline=None)
@given(
    st.integers(1, 256).map(lambda k: k * 512),
    st.integers(1, 256).map(lambda k: k * 512),
    st.integers(0, 1 << 24).map(lambda k: k * 512),
    st.integers(1, 512).map(lambda k: k * 512),
)
def test_gcd_boundary_rule(a: int, b: int, offset: int, length: int) -> None:
    """Not crossing a multiple of gcd(a, b) implies crossing no multiple of a nor of b."""
    stacked = Limits(boundary=a).stack(Limits(boundary=b)).boundary
    assert stacked == math.gcd(a, b)
    if not crosses(offset, length, stacked):
        assert not crosses(offset, length, a)
        assert not crosses(offset, length, b)


def test_lcm_would_let_a_crossing_through() -> None:
    """Why Linux left lcm: with boundaries 8 KiB and 12 KiB, lcm is 24 KiB, and a request over
    [6 KiB, 10 KiB) crosses no multiple of 24 KiB yet crosses 8 KiB."""
    a, b = 8192, 12288
    offset, length = 6144, 4096
    assert not crosses(offset, length, math.lcm(a, b))
    assert crosses(offset, length, a)
    assert crosses(offset, length, math.gcd(a, b))  # gcd (4 KiB) splits it, as it must
    stacked = Limits(boundary=a).stack(Limits(boundary=b))
    bio = Bio(Op.TRIM, offset, length)
    pieces = split(bio, stacked)
    assert [(p.offset, p.length) for p in pieces] == [(6144, 2048), (8192, 2048)]
    assert all(Limits(boundary=a).fits(p) and Limits(boundary=b).fits(p) for p in pieces)


def test_fits_checks_every_limit() -> None:
    seg_bio = Bio.from_buffer(Op.WRITE, 4096, bytearray(8192), page_size=2048)
    assert Limits().fits(seg_bio)
    assert not Limits(max_bytes=4096).fits(seg_bio)
    assert not Limits(max_segments=3).fits(seg_bio)
    assert not Limits(max_segment_size=1024).fits(seg_bio)
    assert not Limits(boundary=8192).fits(seg_bio)
    assert Limits(boundary=16384).fits(seg_bio)
    assert not Limits(logical_block_size=8192).fits(seg_bio)
    flush = Bio(Op.FLUSH, 0, 0)
    assert Limits(max_bytes=512, boundary=512, max_segments=1).fits(flush)
    trim = Bio(Op.TRIM, 0, DEVICE_SIZE)
    assert Limits(max_segments=1, max_segment_size=512).fits(trim)
    assert not Limits(max_bytes=4096).fits(trim)
    assert Limits(max_bytes=4096).misfit(trim) == f"length={DEVICE_SIZE} exceeds max_bytes=4096"
