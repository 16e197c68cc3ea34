"""Bio: one block request, and the edge check that every bio passes once.

A :class:`Bio` is what flows down a dst block stack (``DESIGN.md``, "The shape"): an
operation, a contiguous byte range on the device, and for READ and WRITE a tuple of
:class:`Segment` — the ``bio_vec`` of Linux, a slice of one page-like buffer.  The device
range is contiguous; the memory is not: segments may live in different buffers, at odd
offsets, with holes between them (seed 000: Xen scatters its I/O buffers over many pages).

Bios are frozen values.  Layers never mutate one; :func:`dst.block.split.split` makes new bios
whose segments are new slices of the *same* buffers, so data is never copied on the way down
and a READ's data lands directly in the submitter's memory.

:func:`validate_bio` is the edge check.  It runs once, where a request enters a stack (the NBD
bridge, the server's request handler) and again in the stores at the bottom, which cannot
assume anybody above them did it.  Layers in between rely on it and do not re-check.  Errnos
follow the NBD specification: a range past the end is EINVAL for reads and ENOSPC for
anything that would write; every other malformed request is EINVAL.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from dst.errors import BlockError

if TYPE_CHECKING:
    from dst.block.limits import Limits

__all__ = ["SECTOR_SIZE", "Bio", "BioFlags", "Op", "Segment", "validate_bio"]

#: The unit of every segment length.  Linux has worked in 512-byte sectors since the start, and
#: holding segments to multiples of it is what lets the splitter meet any limit without
#: copying (see :mod:`dst.block.split`).
SECTOR_SIZE = 512

#: Offsets and lengths travel as unsigned 64-bit integers on the wire (NBD and dst frames);
#: a range that would overflow them is out of range whatever the device size.
_DEVICE_LIMIT = 2**64


class Op(enum.IntEnum):
    """The operation of a bio.  Values are stable: they go on the wire."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    TRIM = 3
    WRITE_ZEROES = 4


class BioFlags(enum.IntFlag):
    """Modifiers of a bio.  Values are stable: they go on the wire."""

    NONE = 0
    #: Forced unit access: the write is on stable storage when the bio completes.
    FUA = 1
    #: Flush everything completed before this bio, then do it (REQ_PREFLUSH).
    PREFLUSH = 2
    #: Fail at the first error rather than retrying (mirror legs, seed 004).
    FAILFAST = 4
    #: WRITE_ZEROES must leave the range allocated (NBD_CMD_FLAG_NO_HOLE).
    NO_HOLE = 8


_KNOWN_FLAGS = int(BioFlags.FUA | BioFlags.PREFLUSH | BioFlags.FAILFAST | BioFlags.NO_HOLE)

#: Operations that carry data in segments; the others carry a length and no segments.
DATA_OPS = frozenset({Op.READ, Op.WRITE})


_FAILFAST = int(BioFlags.FAILFAST)  # tested per bio: int & int, not IntFlag's slow __and__


@dataclass(frozen=True, slots=True)
class Segment:
    """A slice of one page-like buffer: ``buf[offset:offset + length]``.

    ``buf`` is a 1-d memoryview of format ``'B'``, writable when the segment belongs to a READ
    bio.  ``offset`` may be anything within ``buf``: the slice need not be aligned in memory.
    Construction does not check; :func:`validate_bio` does, once, at the edge.
    """

    buf: memoryview
    offset: int
    length: int

    def view(self) -> memoryview:
        """The segment's bytes, without copying."""
        return self.buf[self.offset : self.offset + self.length]


@dataclass(frozen=True, slots=True)
class Bio:
    """One block request.

    ``length`` is the number of bytes on the device.  For READ and WRITE it equals the sum of
    the segment lengths; FLUSH, TRIM and WRITE_ZEROES have no segments (and FLUSH no length).
    """

    op: Op
    offset: int
    length: int
    segments: tuple[Segment, ...] = ()
    flags: BioFlags = BioFlags.NONE
    #: The volume epoch a write was issued under (the Fence layer checks it); 0 for requests
    #: that no owner issued — reads, resync copies, a replication peer's writes.
    epoch: int = 0

    @classmethod
    def from_buffer(
        cls,
        op: Op,
        offset: int,
        buf: bytes | bytearray | memoryview,
        *,
        page_size: int = 4096,
        flags: BioFlags = BioFlags.NONE,
    ) -> Bio:
        """A READ or WRITE bio over one buffer, chopped into segments as if the buffer were
        made of pages: cuts fall at multiples of ``page_size`` counted from the start of
        ``buf`` (not from the device offset), the last segment taking what is left."""
        if op not in DATA_OPS:
            raise ValueError(f"from_buffer builds READ or WRITE bios, not op={op!r}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        length = view.nbytes
        segments = tuple(
            Segment(view, start, min(page_size, length - start))
            for start in range(0, length, page_size)
        )
        return cls(op, offset, length, segments, flags)

    def views(self) -> list[memoryview]:
        """The segments' bytes in device order, without copying."""
        return [segment.view() for segment in self.segments]

    def data(self) -> bytes:
        """A joined copy of the segments' bytes — for tests and debugging, not the data path."""
        return b"".join(self.views())

    def with_failfast(self, on: bool) -> Bio:
        """This bio with FAILFAST set or cleared (itself if it already is so): a mirror leg's
        rules decide it per leg, and a replication peer's link never takes a client's."""
        if bool(int(self.flags) & _FAILFAST) is on:
            return self
        flags = self.flags | BioFlags.FAILFAST if on else self.flags & ~BioFlags.FAILFAST
        return replace(self, flags=flags)


def _fail(message: str) -> BlockError:
    return BlockError(errno.EINVAL, message)


def _validate_segments(bio: Bio) -> None:
    total = 0
    read = bio.op is Op.READ
    for index, segment in enumerate(bio.segments):
        buf, start, length = segment.buf, segment.offset, segment.length
        if not isinstance(buf, memoryview) or buf.ndim != 1 or buf.format != "B":
            raise _fail(f"segment {index}: buf must be a 1-d memoryview of format 'B'")
        if length <= 0 or length % SECTOR_SIZE:
            raise _fail(
                f"segment {index}: length={length} is not a positive multiple of {SECTOR_SIZE}"
            )
        if start < 0 or start + length > buf.nbytes:
            raise _fail(
                f"segment {index}: offset={start} length={length} lies outside "
                f"its buffer of {buf.nbytes} bytes"
            )
        if read and buf.readonly:
            raise _fail(f"segment {index}: READ into a read-only buffer")
        total += length
    if total != bio.length:
        raise _fail(f"segment lengths sum to {total}, not length={bio.length}")


def validate_bio(bio: Bio, limits: Limits, size: int) -> None:
    """Check ``bio`` against a device of ``size`` bytes with ``limits``; raise
    :class:`~dst.errors.BlockError` naming the offending field and its value.

    This checks what makes a bio *valid* (alignment to the logical block size, range, segment
    shape, flags), not what makes it *fit* (max_bytes, max_segments, max_segment_size,
    boundary): a valid bio that does not fit is split, never rejected.
    """
    op = bio.op
    if op.__class__ is not Op:  # Op(x) is a slow call; a bio made by dst holds an Op already
        try:
            op = Op(op)
        except ValueError:
            raise _fail(f"unknown op={bio.op!r}") from None
    unknown = int(bio.flags) & ~_KNOWN_FLAGS
    if unknown:
        raise _fail(f"unknown flags=0x{unknown:x}")
    if op is Op.FLUSH:
        # The offset of a FLUSH means nothing; NBD clients send 0, so we do not insist.
        if bio.length or bio.segments:
            raise _fail(f"FLUSH carries no data: length={bio.length} segments={len(bio.segments)}")
        return
    lbs = limits.logical_block_size
    if bio.offset < 0 or bio.offset % lbs:
        raise _fail(f"offset={bio.offset} is not a multiple of logical_block_size={lbs}")
    if bio.length <= 0 or bio.length % lbs:
        raise _fail(f"length={bio.length} is not a positive multiple of logical_block_size={lbs}")
    end = bio.offset + bio.length
    if end > size or end > _DEVICE_LIMIT:
        # NBD: reads past the end are EINVAL; writes, trims and zeroing are ENOSPC.
        code = errno.EINVAL if op is Op.READ else errno.ENOSPC
        raise BlockError(
            code, f"offset={bio.offset} length={bio.length} ends past the device size={size}"
        )
    if op in DATA_OPS:
        _validate_segments(bio)
    elif bio.segments:
        raise _fail(f"{op.name} carries no data, got segments={len(bio.segments)}")
