"""split: the one generic splitter that cuts any valid bio to fit any valid limits.

Seed 000 ends with "we did not write a multi_bio_split thing yet": Linux's ``bio_split``
could only cut single-segment bios, so a misaligned multi-segment bio crossing DRBD's 32 KiB
boundary failed with "bio would need to, but cannot, be split".  This is that thing.  Every
layer with a limit calls :func:`split`, and no layer rejects a valid bio because of its shape.

Why it can always succeed, without ever copying data into a bounce buffer:

- Every segment length is a multiple of 512 (``SECTOR_SIZE``; checked by ``validate_bio``),
  and ``max_segment_size`` is a multiple of 512, so any segment can be cut at any 512-byte
  multiple and the parts are again legal segments.
- Cut points on the device are multiples of ``logical_block_size``; ``max_bytes`` and
  ``boundary`` are multiples of it too, so the byte caps never force an unaligned cut.
- ``max_segments`` is at least ``logical_block_size // 512`` (``Limits.validate``).  Every
  segment of a piece holds at least 512 bytes, so whenever the segment slots run out the
  piece already holds at least one logical block, and the piece can end at the last
  logical-block multiple it reached: each piece makes progress.

Pieces are new :class:`Bio` values whose segments are new slices (an adjusted ``offset`` and
``length`` over the *same* ``buf``): a WRITE's data is not copied, and a READ's pieces fill the
submitter's buffers directly.  A segment is cut where a piece ends inside it and where it
exceeds ``max_segment_size``; untouched segments are reused as they are.

Flags: FUA goes on every piece (each piece must be durable when it completes — the bio is
durable when all are); PREFLUSH only on the first piece (one flush before the bio's data is
enough; the later pieces need nothing flushed before them that the first did not flush).
Everything else (FAILFAST, NO_HOLE) is kept on every piece.

The splitter trusts its input: the bio is valid (``validate_bio`` ran at the edge) and the
limits validate; on the splitting path it re-validates the limits, which costs a few integer
comparisons next to building the pieces.
"""

from __future__ import annotations

import errno

from dst.block.bio import DATA_OPS, Bio, BioFlags, Op, Segment
from dst.block.limits import Limits
from dst.errors import BlockError

__all__ = ["split"]


def _piece_caps(position: int, end: int, limits: Limits) -> int:
    """The furthest device offset a piece starting at ``position`` may reach."""
    cap = end
    if limits.max_bytes:
        cap = min(cap, position + limits.max_bytes)
    if limits.boundary:
        cap = min(cap, (position // limits.boundary + 1) * limits.boundary)
    return cap


def _piece_flags(flags: BioFlags, first: bool) -> BioFlags:
    if first:
        return flags
    return flags & ~BioFlags.PREFLUSH


class _Cursor:
    """A position in a bio's segment list: segment ``index``, ``skip`` bytes into it."""

    __slots__ = ("index", "segments", "skip")

    def __init__(self, segments: tuple[Segment, ...]) -> None:
        self.segments = segments
        self.index = 0
        self.skip = 0

    def take(self, want: int, max_segments: int, max_segment_size: int) -> list[Segment]:
        """Up to ``want`` bytes as at most ``max_segments`` segments (0: any number), each at
        most ``max_segment_size`` (0: any size).  Returns fewer bytes only when the segment
        slots run out; the caller then trims to a logical block multiple via :meth:`give_back`.
        """
        out: list[Segment] = []
        taken = 0
        while taken < want and (not max_segments or len(out) < max_segments):
            segment = self.segments[self.index]
            count = min(segment.length - self.skip, want - taken)
            if max_segment_size:
                count = min(count, max_segment_size)
            if self.skip == 0 and count == segment.length:
                out.append(segment)  # whole and within limits: reuse the same object
            else:
                out.append(Segment(segment.buf, segment.offset + self.skip, count))
            taken += count
            self.skip += count
            if self.skip == segment.length:
                self.index += 1
                self.skip = 0
        return out

    def give_back(self, out: list[Segment], excess: int) -> None:
        """Return the last ``excess`` bytes of ``out`` (a result of :meth:`take`) to the
        cursor, dropping or shortening the trailing segments."""
        while excess:
            last = out.pop()
            # Step the cursor back over ``last``: it ends where the cursor stands now.
            if self.skip == 0:
                self.index -= 1
                self.skip = self.segments[self.index].length
            self.skip -= last.length
            if last.length > excess:
                keep = last.length - excess
                out.append(Segment(last.buf, last.offset, keep))
                self.skip += keep
                excess = 0
            else:
                excess -= last.length


def split(bio: Bio, limits: Limits) -> list[Bio]:
    """Cut ``bio`` into pieces, in device order, each satisfying every limit in ``limits``.

    A bio that already fits (and every FLUSH) comes back as ``[bio]``, the same object.
    TRIM and WRITE_ZEROES have no segments and are cut by ``max_bytes`` and ``boundary``.
    """
    if bio.op is Op.FLUSH or limits.fits(bio):
        return [bio]
    limits.validate()
    lbs = limits.logical_block_size
    end = bio.offset + bio.length
    position = bio.offset
    pieces: list[Bio] = []
    cursor = _Cursor(bio.segments)
    has_data = bio.op in DATA_OPS
    while position < end:
        cap = _piece_caps(position, end, limits)
        want = cap - position
        segments: tuple[Segment, ...] = ()
        if has_data:
            out = cursor.take(want, limits.max_segments, limits.max_segment_size)
            taken = sum(segment.length for segment in out)
            if taken < want:
                # The segment slots ran out before the byte caps: end at a block multiple.
                excess = taken % lbs
                if excess == taken:
                    # Cannot happen with validated limits and a valid bio (see the module
                    # docstring); a loud error beats looping forever.
                    raise BlockError(
                        errno.EINVAL,
                        f"cannot split offset={bio.offset} length={bio.length}: "
                        f"segment {cursor.index} does not fit max_segments="
                        f"{limits.max_segments} (segment lengths must be multiples of 512)",
                    )
                cursor.give_back(out, excess)
                want = taken - excess
            segments = tuple(out)
        flags = _piece_flags(bio.flags, first=not pieces)
        pieces.append(Bio(bio.op, position, want, segments, flags, bio.epoch))
        position += want
    return pieces
