"""Limits: what a block layer can take in one request, and how limits fold down a stack.

Every layer advertises a :class:`Limits`.  A layer that wraps ``below`` advertises
``own.stack(below.limits)``, so the top of a stack advertises what the *whole* stack can take
and the edge splits once, to fit everything.  Seed 000 is why this matters: dm-linear sat
between the filesystem and DRBD, advertised only "4 KiB max segment size" and hid DRBD's
32 KiB boundary, so misaligned multi-segment bios reached DRBD that it "would need to, but
cannot, split".  Here the boundary survives stacking, and the splitter can cut anything anyway.

The combine rules follow Linux ``blk_stack_limits``:

- granularities (``logical_block_size``, ``page_size``) take the maximum;
- caps (``max_bytes``, ``max_segments``, ``max_segment_size``) take the minimum that is not
  zero (zero means "no limit", which makes :data:`UNLIMITED` the stacking identity);
- ``boundary`` takes the gcd of the non-zero values.  Linux first used lcm for
  ``chunk_sectors`` and moved to gcd after a regression: a request that does not cross a
  multiple of ``gcd(a, b)`` crosses no multiple of ``a`` nor of ``b`` (both are multiples of
  the gcd), while lcm lets through requests that cross a multiple of one of them
  (``tests/unit/test_limits.py`` pins the rule with a property test and a counterexample).

Limits are plain frozen values: construct them freely, call :meth:`Limits.validate` where a
stack is assembled (:meth:`Limits.stack` validates its result), so an impossible combination
is a :class:`~dst.errors.ConfigError` at assembly time, never a stuck request later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dst.block.bio import DATA_OPS, SECTOR_SIZE, Bio, Op
from dst.errors import ConfigError

__all__ = ["UNLIMITED", "Limits"]


def _min_not_zero(a: int, b: int) -> int:
    if a and b:
        return min(a, b)
    return a or b


def _gcd_not_zero(a: int, b: int) -> int:
    if a and b:
        return math.gcd(a, b)
    return a or b


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class Limits:
    """The shape of request a layer can take.  Zero in a cap means "no limit"."""

    #: The device's addressing granularity: every offset and length is a multiple of it.
    logical_block_size: int = 512
    #: The node's page size.  Informational for segment layout (DESIGN: peers announce it so
    #: the server can lay client pages onto its own); it constrains nothing in :meth:`fits`.
    page_size: int = 4096
    #: Most bytes in one request.
    max_bytes: int = 0
    #: Most segments in one READ or WRITE request.
    max_segments: int = 0
    #: Largest single segment.
    max_segment_size: int = 0
    #: A request never crosses a multiple of this (DRBD's 32 KiB, a RAID chunk).
    boundary: int = 0

    def validate(self) -> Limits:
        """Return ``self`` if the combination is possible; raise ConfigError naming the field."""
        lbs = self.logical_block_size
        for name in ("logical_block_size", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < SECTOR_SIZE or not _is_power_of_two(value):
                raise ConfigError(f"{name}={value!r} must be a power of two >= {SECTOR_SIZE}")
        for name in ("max_bytes", "max_segments", "max_segment_size", "boundary"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0 (0 = no limit)")
        if self.max_bytes and self.max_bytes % lbs:
            # Also catches 0 < max_bytes < logical_block_size: no request could ever fit.
            raise ConfigError(
                f"max_bytes={self.max_bytes} is not a multiple of logical_block_size={lbs}"
            )
        if self.max_segments and self.max_segments < lbs // SECTOR_SIZE:
            # One logical block may arrive as lbs/512 separate sectors; fewer slots than that
            # and some valid bio could only be served by copying it into a bounce buffer.
            raise ConfigError(
                f"max_segments={self.max_segments} is less than logical_block_size/"
                f"{SECTOR_SIZE}={lbs // SECTOR_SIZE}: one logical block must always fit"
            )
        if self.max_segment_size and self.max_segment_size % SECTOR_SIZE:
            raise ConfigError(
                f"max_segment_size={self.max_segment_size} is not a multiple of {SECTOR_SIZE}"
            )
        if self.boundary and self.boundary % lbs:
            raise ConfigError(
                f"boundary={self.boundary} is not a multiple of logical_block_size={lbs}"
            )
        return self

    def stack(self, below: Limits) -> Limits:
        """Combine this layer's own limits with those of the layer below it; validated."""
        lbs = max(self.logical_block_size, below.logical_block_size)
        max_bytes = _min_not_zero(self.max_bytes, below.max_bytes)
        if max_bytes:
            # A larger block size above may leave the cap unaligned; round it down (as Linux
            # does for max_sectors) so it still respects both layers.
            max_bytes -= max_bytes % lbs
            if not max_bytes:
                raise ConfigError(
                    f"cannot stack: max_bytes={_min_not_zero(self.max_bytes, below.max_bytes)}"
                    f" is smaller than logical_block_size={lbs}"
                )
        stacked = Limits(
            logical_block_size=lbs,
            page_size=max(self.page_size, below.page_size),
            max_bytes=max_bytes,
            max_segments=_min_not_zero(self.max_segments, below.max_segments),
            max_segment_size=_min_not_zero(self.max_segment_size, below.max_segment_size),
            boundary=_gcd_not_zero(self.boundary, below.boundary),
        )
        try:
            return stacked.validate()
        except ConfigError as exc:
            raise ConfigError(f"cannot stack {self} over {below}: {exc}") from None

    def fits(self, bio: Bio) -> bool:
        """Whether ``bio`` (already valid) satisfies every limit, so needs no split."""
        return self.misfit(bio) is None

    def misfit(self, bio: Bio) -> str | None:
        """``None`` if ``bio`` fits; otherwise which limit it violates, naming the field and
        the values (for strict stores and test failures that must say what went wrong)."""
        if bio.op is Op.FLUSH:
            return None
        lbs = self.logical_block_size
        if bio.offset % lbs or bio.length % lbs:
            return (
                f"offset={bio.offset} length={bio.length} not multiples of logical_block_size={lbs}"
            )
        if self.max_bytes and bio.length > self.max_bytes:
            return f"length={bio.length} exceeds max_bytes={self.max_bytes}"
        if self.boundary and bio.length:
            first, last = bio.offset, bio.offset + bio.length - 1
            if first // self.boundary != last // self.boundary:
                return (
                    f"offset={bio.offset} length={bio.length} crosses a multiple of "
                    f"boundary={self.boundary}"
                )
        if bio.op in DATA_OPS:
            if self.max_segments and len(bio.segments) > self.max_segments:
                return f"segments={len(bio.segments)} exceeds max_segments={self.max_segments}"
            if self.max_segment_size:
                for index, segment in enumerate(bio.segments):
                    if segment.length > self.max_segment_size:
                        return (
                            f"segment {index} length={segment.length} exceeds "
                            f"max_segment_size={self.max_segment_size}"
                        )
        return None


#: No caps, no boundary: the identity of :meth:`Limits.stack` for the caps, the boundary and
#: the logical block size.  (Its page_size is the default 4096, so stacking it over a layer
#: with smaller pages raises the page size; page_size constrains nothing in :meth:`fits`.)
UNLIMITED = Limits()
