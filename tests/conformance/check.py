"""check_block_device: the one conformance check every block layer passes.

As trio's ``check_two_way_stream`` serves every stream, this serves every
:class:`~dst.block.BlockLayer` — the stores here, and Remote, Replicated, Mirror, Fence and the
NBD bridge as they arrive.  It drives the layer the way an edge does: ``validate_bio`` once,
then ``submit_split`` to the layer's advertised limits, so a layer is exercised with exactly
the bios its own limits promise it can take.

What it checks: round trips through single buffers and through scattered, misaligned
multi-segment bios (sector 63 across a 32 KiB boundary, seed 000) with guard bytes around every
segment; overwrites; FUA, PREFLUSH and FLUSH; TRIM and WRITE_ZEROES (with and without NO_HOLE)
reading back as zeros without touching their neighbours; out-of-range, misaligned and
malformed bios failing with the NBD errno and changing nothing; 32 concurrent writes (with
flushes among them) all landing; a long segment list; and ``aclose`` being idempotent, with a
later submit failing with BlockError.

Validation: ``validate_bio`` is the edge check and is always asserted here.  Layers that do
not validate for themselves (middle layers may rely on the edge, layer.py) pass
``validates=False``; the stores at the bottom validate in ``submit`` and are checked for it.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio

from dst.block import (
    SECTOR_SIZE,
    Bio,
    BioFlags,
    BlockLayer,
    Op,
    Segment,
    submit_split,
    validate_bio,
)
from dst.errors import BlockError

__all__ = ["MIN_SIZE", "LayerFactory", "check_block_device"]

KiB = 1024
#: The check lays its regions out in the first MiB (and touches the last blocks).
MIN_SIZE = 1024 * KiB
REGION = 128 * KiB
#: DRBD's replication boundary, the one seed 000 tripped over.
CHUNK = 32 * KiB

LayerFactory = Callable[[], AbstractAsyncContextManager[BlockLayer]]


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


async def edge(layer: BlockLayer, bio: Bio) -> None:
    """Submit as an edge does: validate once, split to the layer's limits, submit."""
    validate_bio(bio, layer.limits, layer.size)
    await submit_split(layer, bio)


async def write(
    layer: BlockLayer, offset: int, data: bytes, flags: BioFlags = BioFlags.NONE
) -> None:
    await edge(layer, Bio.from_buffer(Op.WRITE, offset, data, flags=flags))


async def read(layer: BlockLayer, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await edge(layer, Bio.from_buffer(Op.READ, offset, buf))
    return bytes(buf)


async def expect(layer: BlockLayer, offset: int, data: bytes, what: str) -> None:
    got = await read(layer, offset, len(data))
    if got != data:
        first = next(i for i in range(len(data)) if got[i] != data[i])
        raise AssertionError(
            f"{what}: read at offset={offset} length={len(data)} differs first at device "
            f"offset {offset + first} (sector {(offset + first) // SECTOR_SIZE})"
        )


def scattered(op: Op, offset: int, lengths: list[int], seed: int) -> tuple[Bio, bytearray, bytes]:
    """A bio whose segments (of the given lengths) sit at odd offsets in one buffer, with
    guard bytes between them; returns the bio, the buffer and the buffer's initial bytes."""
    rng = random.Random(seed)
    starts = []
    position = rng.randrange(1, 600)
    for length in lengths:
        starts.append(position)
        position += length + rng.randrange(1, 600)
    buf = bytearray(pattern(seed + 1, position + 97))
    view = memoryview(buf)
    segments = tuple(Segment(view, s, n) for s, n in zip(starts, lengths, strict=True))
    return Bio(op, offset, sum(lengths), segments), buf, bytes(buf)


def scattered_lengths(total_sectors: int, lbs: int, seed: int) -> list[int]:
    """Random 512-multiple segment lengths, mostly single sectors, totalling a multiple of lbs."""
    rng = random.Random(seed)
    lengths: list[int] = []
    remaining = total_sectors
    while remaining:
        n = min(remaining, rng.choice([1, 1, 1, 2, 3, 7, 8]))
        lengths.append(n * SECTOR_SIZE)
        remaining -= n
    pad = -sum(lengths) % lbs
    if pad:
        lengths.append(pad)
    return lengths


async def check_shape(layer: BlockLayer) -> None:
    limits = layer.limits
    assert limits.validate() is limits
    lbs = limits.logical_block_size
    assert layer.size > 0 and layer.size % lbs == 0, f"size={layer.size} lbs={lbs}"
    assert layer.size >= MIN_SIZE, f"the check needs size >= {MIN_SIZE}, got {layer.size}"
    await expect(layer, 0, bytes(2 * REGION), "a fresh device reads as zeros")


async def check_round_trips(layer: BlockLayer) -> None:
    data = pattern(1, REGION)
    await write(layer, 0, data)
    await expect(layer, 0, data, "single-buffer round trip")
    lbs = layer.limits.logical_block_size
    # Reads of odd lengths at odd offsets see the same bytes.
    for offset, length in [(lbs, 3 * lbs), (7 * lbs, 9 * KiB), (CHUNK - lbs, 2 * lbs)]:
        length -= length % lbs
        await expect(layer, offset, data[offset : offset + length], "partial read")
    # An overwrite in the middle replaces exactly its range.
    patch = pattern(2, 5 * lbs)
    await write(layer, 11 * lbs, patch)
    expected = data[: 11 * lbs] + patch + data[16 * lbs :]
    await expect(layer, 0, expected, "overwrite")
    # The last blocks of the device.
    tail = pattern(3, 4 * lbs)
    await write(layer, layer.size - len(tail), tail, BioFlags.FUA)
    await expect(layer, layer.size - len(tail), tail, "last blocks")


async def check_scattered_misaligned(layer: BlockLayer) -> None:
    """Seed 000's bio: scattered sectors at sector 63 of a chunk, across the 32 KiB boundary."""
    lbs = layer.limits.logical_block_size
    for case, (start, sectors) in enumerate([(CHUNK - lbs, 8), (3 * CHUNK - lbs, 12), (0, 90)]):
        offset = REGION + start
        bio, _, _ = scattered(Op.WRITE, offset, scattered_lengths(sectors, lbs, case), case)
        await edge(layer, bio)
        await expect(layer, offset, bio.data(), f"scattered write {case}")
        # Read it back through another scattered bio: data lands in the segments, and the
        # guard bytes between and around them are untouched.
        lengths = scattered_lengths(bio.length // SECTOR_SIZE, lbs, case + 100)
        into, buf, before = scattered(Op.READ, offset, lengths, case + 200)
        await edge(layer, into)
        assert into.data() == bio.data(), f"scattered read {case}"
        guarded = bytearray(before)
        for s in into.segments:
            guarded[s.offset : s.offset + s.length] = s.view()
        assert buf == guarded, f"scattered read {case} wrote outside its segments"


async def check_flags_and_flush(layer: BlockLayer) -> None:
    offset = 3 * REGION
    for index, flags in enumerate(
        [BioFlags.FUA, BioFlags.PREFLUSH, BioFlags.FUA | BioFlags.PREFLUSH, BioFlags.FAILFAST]
    ):
        data = pattern(10 + index, 16 * KiB)
        await write(layer, offset + index * 16 * KiB, data, flags)
        await expect(layer, offset + index * 16 * KiB, data, f"write with {flags!r}")
    await edge(layer, Bio(Op.FLUSH, 0, 0))
    await edge(layer, Bio(Op.FLUSH, 0, 0, (), BioFlags.FUA | BioFlags.PREFLUSH))


async def check_zeroing(layer: BlockLayer, trim_reads_zeros: bool) -> None:
    lbs = layer.limits.logical_block_size
    offset = 2 * REGION
    cases = [
        (Op.TRIM, BioFlags.NONE),
        (Op.WRITE_ZEROES, BioFlags.NONE),
        (Op.WRITE_ZEROES, BioFlags.NO_HOLE),
        (Op.WRITE_ZEROES, BioFlags.FUA),
        (Op.TRIM, BioFlags.FUA),
    ]
    for index, (op, flags) in enumerate(cases):
        data = pattern(20 + index, REGION)
        await write(layer, offset, data)
        # One block in (off page alignment when blocks are small), across a chunk boundary.
        start, length = lbs, CHUNK + 5 * lbs
        await edge(layer, Bio(op, offset + start, length, (), flags))
        what = f"{op.name} {flags!r}"
        await expect(layer, offset, data[:start], f"{what}: before the range")
        await expect(layer, offset + start + length, data[start + length :], f"{what}: after")
        if trim_reads_zeros or op is Op.WRITE_ZEROES:
            await expect(layer, offset + start, bytes(length), f"{what} reads as zeros")


def bad_bios(layer: BlockLayer) -> list[tuple[str, Bio, int]]:
    lbs, size = layer.limits.logical_block_size, layer.size
    block = bytes(lbs)
    odd = memoryview(bytearray(lbs))
    return [
        ("read past the end", Bio.from_buffer(Op.READ, size, bytearray(lbs)), errno.EINVAL),
        (
            "read across the end",
            Bio.from_buffer(Op.READ, size - lbs, bytearray(2 * lbs)),
            errno.EINVAL,
        ),
        (
            "write across the end",
            Bio.from_buffer(Op.WRITE, size - lbs, bytes(2 * lbs)),
            errno.ENOSPC,
        ),
        ("trim past the end", Bio(Op.TRIM, size, lbs), errno.ENOSPC),
        ("zeroes across the end", Bio(Op.WRITE_ZEROES, size - lbs, 2 * lbs), errno.ENOSPC),
        (
            "write overflowing 2**64",
            Bio.from_buffer(Op.WRITE, 2**64 - lbs, bytes(2 * lbs)),
            errno.ENOSPC,
        ),
        ("misaligned offset", Bio.from_buffer(Op.WRITE, lbs + 256, block), errno.EINVAL),
        ("misaligned length", Bio(Op.TRIM, 0, lbs + 256), errno.EINVAL),
        ("write of length 0", Bio(Op.WRITE, 0, 0), errno.EINVAL),
        ("trim of length 0", Bio(Op.TRIM, 0, 0), errno.EINVAL),
        (
            "segment not a multiple of 512",
            Bio(Op.WRITE, 0, lbs, (Segment(odd, 0, 300), Segment(odd, 300, lbs - 300))),
            errno.EINVAL,
        ),
        (
            "segments not summing to length",
            Bio(Op.WRITE, 0, 2 * lbs, (Segment(odd, 0, lbs),)),
            errno.EINVAL,
        ),
        ("read into read-only memory", Bio.from_buffer(Op.READ, 0, block), errno.EINVAL),
        ("flush with a length", Bio(Op.FLUSH, 0, lbs), errno.EINVAL),
        ("unknown flag", Bio(Op.TRIM, 0, lbs, (), BioFlags(0x100)), errno.EINVAL),
    ]


async def check_errors(layer: BlockLayer, validates: bool) -> None:
    lbs, size = layer.limits.logical_block_size, layer.size
    tail = pattern(30, 2 * lbs)
    await write(layer, size - len(tail), tail)
    for what, bio, code in bad_bios(layer):
        try:
            validate_bio(bio, layer.limits, size)
        except BlockError as exc:
            assert exc.errno == code, f"{what}: validate_bio gave {exc}, expected errno {code}"
        else:
            raise AssertionError(f"{what}: validate_bio accepted it")
        if validates:
            try:
                await layer.submit(bio)
            except BlockError as exc:
                assert exc.errno == code, f"{what}: submit gave {exc}, expected errno {code}"
            else:
                raise AssertionError(f"{what}: submit accepted it")
    # Nothing of a refused bio landed, and the layer still serves.
    await expect(layer, size - len(tail), tail, "the end of the device after refused bios")


async def check_concurrency(layer: BlockLayer) -> None:
    lbs = layer.limits.logical_block_size
    base, each = 4 * REGION, 8 * KiB
    bios = []
    for i in range(32):
        lengths = scattered_lengths(each // SECTOR_SIZE, lbs, 300 + i)
        bio, _, _ = scattered(Op.WRITE, base + i * each, lengths, 300 + i)
        flags = BioFlags.FUA if i % 4 == 0 else BioFlags.NONE
        bios.append(Bio(bio.op, bio.offset, bio.length, bio.segments, flags))
    async with trio.open_nursery() as nursery:
        for bio in bios:
            nursery.start_soon(edge, layer, bio)
        for _ in range(4):
            nursery.start_soon(edge, layer, Bio(Op.FLUSH, 0, 0))
    results: dict[int, bytes] = {}

    async def read_one(i: int) -> None:
        results[i] = await read(layer, base + i * each, each)

    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(read_one, i)
    for i, bio in enumerate(bios):
        assert results[i] == bio.data(), f"concurrent write {i} at offset={bio.offset} was lost"


async def check_long_segment_list(layer: BlockLayer) -> None:
    lbs = layer.limits.logical_block_size
    count = 300 - 300 % (lbs // SECTOR_SIZE)
    bio, _, _ = scattered(Op.WRITE, 6 * REGION, [SECTOR_SIZE] * count, 400)
    await edge(layer, bio)
    await expect(layer, 6 * REGION, bio.data(), f"{count} single-sector segments")


async def check_nowait(layer: BlockLayer, validates: bool) -> None:
    """Where the layer offers ``submit_nowait``: a bio it completes is complete (a WRITE
    reads back, a READ is filled) and one it declines changed nothing; bad bios fail with
    the errno submit gives, if it does not decline them."""
    nowait = getattr(layer, "submit_nowait", None)
    if nowait is None:
        return
    lbs, offset = layer.limits.logical_block_size, 7 * REGION
    for i, length in enumerate([lbs, 4 * KiB, 64 * KiB, REGION]):
        length -= length % lbs
        before = await read(layer, offset, length)
        data = pattern(500 + i, length)
        for flags in (BioFlags.FUA, BioFlags.NONE):
            bio = Bio.from_buffer(Op.WRITE, offset, data, flags=flags)
            if not layer.limits.misfit(bio) and nowait(bio):
                await expect(layer, offset, data, f"a WRITE of {length} completed by nowait")
                break
            await expect(layer, offset, before, f"a WRITE of {length} nowait declined")
        else:
            await write(layer, offset, data)
        buf = bytearray(length)
        bio = Bio.from_buffer(Op.READ, offset, buf)
        if not layer.limits.misfit(bio) and nowait(bio):
            assert buf == data, f"a READ of {length} completed by nowait differs"
    if validates:
        for what, bio, code in bad_bios(layer):
            try:  # declined (for submit to refuse) or refused, never done
                assert not nowait(bio), f"{what}: submit_nowait completed it"
            except BlockError as exc:
                assert exc.errno == code, f"{what}: submit_nowait gave {exc}, expected {code}"


async def check_close(layer: BlockLayer) -> None:
    await layer.aclose()
    await layer.aclose()  # idempotent
    try:
        await layer.submit(Bio.from_buffer(Op.READ, 0, bytearray(layer.limits.logical_block_size)))
    except BlockError:
        pass
    else:
        raise AssertionError("submit after aclose succeeded")
    nowait = getattr(layer, "submit_nowait", None)
    if nowait is not None:
        try:
            nowait(Bio.from_buffer(Op.READ, 0, bytearray(layer.limits.logical_block_size)))
        except BlockError:
            pass
        else:
            raise AssertionError("submit_nowait after aclose succeeded")


async def check_block_device(
    make_layer: LayerFactory, *, validates: bool = True, trim_reads_zeros: bool = True
) -> None:
    """Run every check on fresh layers from ``make_layer`` (an async context manager factory
    whose exit closes the layer; it must tolerate the layer being closed already).

    ``validates``: the layer itself rejects invalid bios (stores and network peers do).
    ``trim_reads_zeros``: a trimmed range reads back as zeros (NBD allows anything; dst's
    stores give zeros).
    """
    async with make_layer() as layer:
        await check_shape(layer)
        await check_round_trips(layer)
        await check_scattered_misaligned(layer)
        await check_flags_and_flush(layer)
        await check_zeroing(layer, trim_reads_zeros)
        await check_errors(layer, validates)
        await check_long_segment_list(layer)
        await check_nowait(layer, validates)
    async with make_layer() as layer:
        await check_concurrency(layer)
        await check_close(layer)
