"""Self-describing 512-byte sectors, like fio's verify header.

Every sector a chaos workload writes names itself: which volume, which sector number, which
writer and write sequence, which epoch — and carries a crc32c over all of it.  A sector read
back therefore maps to exactly one write in the histories, so the checker needs no search, and
a torn, corrupt or misdirected sector cannot pass for a good one.

Layout (big-endian): magic 8 | volume u32 | sector u64 | writer u32 | seq u64 | epoch u64 |
crc32c u32 | filler.  The filler is derived from the fields (so a sector whose header survived
but whose tail came from another write is caught) and the crc covers header and filler.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

import crc32c

SECTOR = 512
MAGIC = b"DSTCHAOS"
_HEAD = struct.Struct(">8sIQIQQ")  # everything before the crc
_CRC = struct.Struct(">I")
_FILL_AT = _HEAD.size + _CRC.size
_FILL_LEN = SECTOR - _FILL_AT
_ZEROS = bytes(SECTOR)


class Kind(enum.Enum):
    NEVER = "never"  # all zeros: never written
    VALID = "valid"
    CORRUPT = "corrupt"  # bad magic, bad crc or bad filler: torn or damaged
    MISDIRECTED = "misdirected"  # a good sector, written for another sector number


@dataclass(frozen=True)
class Stamp:
    """What a sector says about itself."""

    volume: int
    sector: int
    writer: int
    seq: int
    epoch: int


@dataclass(frozen=True)
class Decoded:
    kind: Kind
    stamp: Stamp | None = None


def _filler(head: bytes) -> bytes:
    seed = hashlib.blake2b(head, digest_size=64).digest()
    return (seed * (_FILL_LEN // len(seed) + 1))[:_FILL_LEN]


def encode(stamp: Stamp) -> bytes:
    head = _HEAD.pack(MAGIC, stamp.volume, stamp.sector, stamp.writer, stamp.seq, stamp.epoch)
    fill = _filler(head)
    crc = crc32c.crc32c(fill, crc32c.crc32c(head))
    return head + _CRC.pack(crc) + fill


def encode_run(volume: int, first: int, count: int, writer: int, seq: int, epoch: int) -> bytes:
    """The ``count`` sectors of one write starting at sector ``first``."""
    return b"".join(encode(Stamp(volume, first + i, writer, seq, epoch)) for i in range(count))


def decode(buf: bytes | bytearray | memoryview, sector: int) -> Decoded:
    """Classify one 512-byte sector read from sector number ``sector``."""
    raw = bytes(buf)
    if len(raw) != SECTOR:
        raise ValueError(f"sector of {len(raw)} bytes, not {SECTOR}")
    if raw == _ZEROS:
        return Decoded(Kind.NEVER)
    head = raw[: _HEAD.size]
    magic, volume, number, writer, seq, epoch = _HEAD.unpack(head)
    (crc,) = _CRC.unpack_from(raw, _HEAD.size)
    fill = raw[_FILL_AT:]
    if magic != MAGIC or crc != crc32c.crc32c(fill, crc32c.crc32c(head)) or fill != _filler(head):
        return Decoded(Kind.CORRUPT)
    stamp = Stamp(volume, number, writer, seq, epoch)
    if number != sector:
        return Decoded(Kind.MISDIRECTED, stamp)
    return Decoded(Kind.VALID, stamp)


def decode_run(buf: bytes | bytearray | memoryview, first: int) -> list[Decoded]:
    view = memoryview(buf)
    return [decode(view[i : i + SECTOR], first + i // SECTOR) for i in range(0, len(view), SECTOR)]
