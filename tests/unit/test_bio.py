"""Bio, Segment and the edge check validate_bio: every rejection names its field and errno."""

from __future__ import annotations

import errno
from typing import cast

import pytest

from dst.block import SECTOR_SIZE, Bio, BioFlags, Limits, Op, Segment, validate_bio
from dst.errors import BlockError

SIZE = 1 << 20
LIMITS = Limits()


def test_op_and_flag_values_are_wire_stable() -> None:
    assert [int(op) for op in Op] == [0, 1, 2, 3, 4]
    assert [int(flag) for flag in BioFlags] == [1, 2, 4, 8]
    assert SECTOR_SIZE == 512


def test_segment_view_is_a_slice_not_a_copy() -> None:
    buf = bytearray(4096)
    segment = Segment(memoryview(buf), 1001, 512)
    segment.view()[:] = b"\xab" * 512
    assert buf[1001:1513] == b"\xab" * 512
    assert buf[1000] == 0 and buf[1513] == 0


def test_from_buffer_chops_at_page_multiples_within_the_buffer() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    bio = Bio.from_buffer(Op.WRITE, 8192, data, page_size=4096, flags=BioFlags.FUA)
    assert [(s.offset, s.length) for s in bio.segments] == [(0, 4096), (4096, 4096), (8192, 2048)]
    assert (bio.op, bio.offset, bio.length, bio.flags) == (Op.WRITE, 8192, 10240, BioFlags.FUA)
    assert bio.data() == data
    assert [bytes(v) for v in bio.views()] == [data[:4096], data[4096:8192], data[8192:]]


def test_from_buffer_counts_pages_from_the_start_of_a_sliced_view() -> None:
    raw = bytearray(20000)
    view = memoryview(raw)[777 : 777 + 6144]
    bio = Bio.from_buffer(Op.READ, 0, view, page_size=4096)
    assert [(s.offset, s.length) for s in bio.segments] == [(0, 4096), (4096, 2048)]
    bio.segments[1].view()[:] = b"\x01" * 2048
    assert raw[777 + 4096 : 777 + 6144] == b"\x01" * 2048 and raw[777 + 4095] == 0
    validate_bio(bio, LIMITS, SIZE)


def test_from_buffer_casts_other_formats_to_bytes() -> None:
    words = memoryview(bytearray(4096)).cast("I")
    bio = Bio.from_buffer(Op.READ, 0, words)
    assert bio.length == 4096 and bio.segments[0].buf.format == "B"
    validate_bio(bio, LIMITS, SIZE)


@pytest.mark.parametrize("op", [Op.FLUSH, Op.TRIM, Op.WRITE_ZEROES])
def test_from_buffer_is_for_data_ops_only(op: Op) -> None:
    with pytest.raises(ValueError, match="READ or WRITE"):
        Bio.from_buffer(op, 0, bytes(512))


def ok_write(offset: int = 0, length: int = 4096) -> Bio:
    return Bio.from_buffer(Op.WRITE, offset, bytes(length))


def ro_view(n: int) -> memoryview:
    return memoryview(bytes(n))


def rw_view(n: int) -> memoryview:
    return memoryview(bytearray(n))


@pytest.mark.parametrize(
    "bio",
    [
        ok_write(),
        ok_write(SIZE - 4096),
        Bio.from_buffer(Op.READ, 512, bytearray(512)),
        Bio(Op.FLUSH, 0, 0),
        Bio(Op.FLUSH, 4096, 0, (), BioFlags.PREFLUSH),  # a FLUSH's offset is ignored
        Bio(Op.TRIM, 0, SIZE),
        Bio(Op.WRITE_ZEROES, 512, 1024, (), BioFlags.NO_HOLE | BioFlags.FUA),
        Bio(Op.WRITE, 0, 1024, (Segment(ro_view(600), 88, 512), Segment(rw_view(512), 0, 512))),
    ],
)
def test_valid_bios_pass(bio: Bio) -> None:
    validate_bio(bio, LIMITS, SIZE)


BAD = [
    # (bio, limits, errno, text the message must contain)
    (Bio(cast(Op, 9), 0, 512), LIMITS, errno.EINVAL, "op=9"),
    (Bio(Op.WRITE, 0, 0), LIMITS, errno.EINVAL, "length=0"),
    (Bio(Op.READ, 0, 0), LIMITS, errno.EINVAL, "length=0"),
    (Bio(Op.TRIM, 0, 0), LIMITS, errno.EINVAL, "length=0"),
    (Bio(Op.WRITE_ZEROES, 0, 0), LIMITS, errno.EINVAL, "length=0"),
    (ok_write(100, 512), LIMITS, errno.EINVAL, "offset=100"),
    (Bio(Op.TRIM, 0, 700), LIMITS, errno.EINVAL, "length=700"),
    (ok_write(2048), Limits(logical_block_size=4096), errno.EINVAL, "logical_block_size=4096"),
    (Bio(Op.TRIM, -512, 512), LIMITS, errno.EINVAL, "offset=-512"),
    (Bio.from_buffer(Op.READ, SIZE, bytearray(512)), LIMITS, errno.EINVAL, f"offset={SIZE}"),
    (Bio.from_buffer(Op.READ, SIZE - 512, bytearray(1024)), LIMITS, errno.EINVAL, "size="),
    (ok_write(SIZE - 512, 1024), LIMITS, errno.ENOSPC, f"size={SIZE}"),
    (Bio(Op.TRIM, SIZE, 512), LIMITS, errno.ENOSPC, "size="),
    (Bio(Op.WRITE_ZEROES, 0, SIZE + 512), LIMITS, errno.ENOSPC, "size="),
    # Past 2**64 even on a device that claims to be bigger: the wire cannot express it.
    (Bio(Op.WRITE_ZEROES, 2**64 - 512, 1024), LIMITS, errno.ENOSPC, "offset="),
    (Bio(Op.READ, 2**64 - 512, 1024), LIMITS, errno.EINVAL, "offset="),
    (Bio(Op.WRITE, 0, 1024, (Segment(ro_view(512), 0, 512),)), LIMITS, errno.EINVAL, "sum"),
    (Bio(Op.WRITE, 0, 512, (Segment(ro_view(1024), 0, 300),)), LIMITS, errno.EINVAL, "=300"),
    (Bio(Op.WRITE, 0, 512, (Segment(ro_view(1024), 0, 0),)), LIMITS, errno.EINVAL, "length=0"),
    (Bio(Op.WRITE, 0, 512, (Segment(ro_view(1024), 600, 512),)), LIMITS, errno.EINVAL, "outside"),
    (Bio(Op.WRITE, 0, 512, (Segment(ro_view(1024), -1, 512),)), LIMITS, errno.EINVAL, "offset=-1"),
    (Bio(Op.READ, 0, 512, (Segment(ro_view(512), 0, 512),)), LIMITS, errno.EINVAL, "read-only"),
    (
        Bio(Op.WRITE, 0, 512, (Segment(memoryview(bytearray(512)).cast("H"), 0, 512),)),
        LIMITS,
        errno.EINVAL,
        "format",
    ),
    (
        Bio(Op.WRITE, 0, 512, (Segment(cast(memoryview, bytes(512)), 0, 512),)),
        LIMITS,
        errno.EINVAL,
        "memoryview",
    ),
    (Bio(Op.FLUSH, 0, 512), LIMITS, errno.EINVAL, "length=512"),
    (Bio(Op.FLUSH, 0, 0, ok_write(0, 512).segments), LIMITS, errno.EINVAL, "segments=1"),
    (Bio(Op.TRIM, 0, 512, ok_write(0, 512).segments), LIMITS, errno.EINVAL, "segments=1"),
    (Bio(Op.WRITE, 0, 512, ok_write(0, 512).segments, BioFlags(16)), LIMITS, errno.EINVAL, "0x10"),
    (Bio(Op.FLUSH, 0, 0, (), BioFlags(0x40 | 1)), LIMITS, errno.EINVAL, "flags=0x40"),
]


@pytest.mark.parametrize(("bio", "limits", "code", "text"), BAD)
def test_invalid_bios_are_rejected_with_errno_and_field(
    bio: Bio, limits: Limits, code: int, text: str
) -> None:
    with pytest.raises(BlockError) as info:
        validate_bio(bio, limits, SIZE if bio.offset < 2**63 else 2**70)
    assert info.value.errno == code, str(info.value)
    assert text in str(info.value)
