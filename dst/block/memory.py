"""MemoryStore: a block layer over a bytearray — the reference store for tests.

It is the simplest thing that satisfies the :class:`~dst.block.layer.BlockLayer` contract,
like ``nbdkit memory``: tests of the layers above (replication, mirror, fence, the NBD bridge)
stack on it, and the conformance check runs on it beside :class:`~dst.block.file.FileStore`.

Each bio is applied whole between two checkpoints (there is no await inside), so concurrent
bios never interleave within one another; a FLUSH has nothing to make durable.  TRIM and
WRITE_ZEROES both zero the range, so a trimmed range reads as zeros, as on FileStore.

``strict=True`` makes the store reject (EINVAL, naming the limit) any bio that does not fit its
advertised limits, instead of serving it.  A store that can serve any shape never needs to
split, so strictness is not needed for correctness; it is a probe for the layers above: stack
them over a strict store with, say, a 32 KiB boundary, and a layer that hides or ignores the
boundary (seed 000's dm-linear) fails loudly in tests.
"""

from __future__ import annotations

import errno

import trio

from dst.block.bio import Bio, Op, validate_bio
from dst.block.layer import StoreCounters, StoreStatistics, closed_error
from dst.block.limits import UNLIMITED, Limits
from dst.errors import BlockError, ConfigError

__all__ = ["MemoryStore"]

#: Zeroing goes through one preallocated chunk, so trimming a large range allocates nothing.
_ZERO_CHUNK = memoryview(bytes(1 << 20))


class MemoryStore:
    """A :class:`~dst.block.layer.BlockLayer` over a bytearray of ``size`` bytes."""

    def __init__(self, size: int, limits: Limits = UNLIMITED, *, strict: bool = False) -> None:
        limits.validate()
        if not isinstance(size, int) or size <= 0 or size % limits.logical_block_size:
            raise ConfigError(
                f"size={size!r} must be a positive multiple of "
                f"logical_block_size={limits.logical_block_size}"
            )
        self._size = size
        self._limits = limits
        self._strict = strict
        self._data = bytearray(size)
        self._mem = memoryview(self._data)
        self._closed = False
        self._counters = StoreCounters()

    def __repr__(self) -> str:
        return f"MemoryStore(size={self._size}, limits={self._limits}, strict={self._strict})"

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def size(self) -> int:
        return self._size

    def statistics(self) -> StoreStatistics:
        """Counts of completed bios (``syncs`` stays 0: memory has nothing to sync)."""
        return self._counters.snapshot()

    def contents(self, offset: int = 0, length: int | None = None) -> bytes:
        """A copy of the stored bytes, for tests to compare stores directly."""
        if length is None:
            length = self._size - offset
        return bytes(self._mem[offset : offset + length])

    async def submit(self, bio: Bio) -> None:
        # A checkpoint first: every submit is a cancellation point and yields to other tasks,
        # as a real store's would, so concurrency bugs in layers above show up against it.
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise closed_error(repr(self))
        try:
            validate_bio(bio, self._limits, self._size)
            if self._strict:
                misfit = self._limits.misfit(bio)
                if misfit is not None:
                    raise BlockError(errno.EINVAL, f"strict store: {misfit}")
        except BlockError:
            self._counters.errors += 1
            raise
        self._apply(bio)
        self._counters.count(bio)

    def _apply(self, bio: Bio) -> None:
        position = bio.offset
        if bio.op is Op.READ:
            for segment in bio.segments:
                segment.view()[:] = self._mem[position : position + segment.length]
                position += segment.length
        elif bio.op is Op.WRITE:
            for segment in bio.segments:
                self._mem[position : position + segment.length] = segment.view()
                position += segment.length
        elif bio.op in (Op.TRIM, Op.WRITE_ZEROES):
            self._zero(bio.offset, bio.length)
        # FLUSH: everything is already as durable as memory gets.

    def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            count = min(len(_ZERO_CHUNK), end - offset)
            self._mem[offset : offset + count] = _ZERO_CHUNK[:count]
            offset += count

    async def aclose(self) -> None:
        # Keep the bytes: a test may still inspect contents() after closing the stack.
        self._closed = True
        await trio.lowlevel.checkpoint()
