"""The Mirror passes the conformance check: over strict in-memory legs with different limits
(the mirror must advertise what *both* take), and over two real servers through
RemoteVolumes with FAILFAST on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from dst.block import BlockLayer, Limits, MemoryStore
from dst.mirror import Leg, LegState, Mirror, open_mirror
from dst.replication.bitmap import DirtyBitmap
from tests.conformance.check import MIN_SIZE, check_block_device
from tests.integration.harness import running_server

SIZE = 2 * MIN_SIZE


async def test_mirror_over_strict_memory_legs(tmp_path: Path) -> None:
    count = 0

    @asynccontextmanager
    async def make() -> AsyncIterator[BlockLayer]:
        nonlocal count
        count += 1
        stores = [
            MemoryStore(SIZE, Limits(boundary=32768, max_bytes=65536), strict=True),
            MemoryStore(SIZE, Limits(max_segments=4, max_segment_size=4096), strict=True),
        ]
        legs = [
            Leg(f"m{i}", s, DirtyBitmap.open(tmp_path / f"{count}.{i}.bitmap", SIZE))
            for i, s in enumerate(stores)
        ]
        mirror = Mirror(legs)
        try:
            yield mirror
        finally:
            await mirror.aclose()
            assert all(mirror.state(i) is LegState.IN_SYNC for i in range(2)), "no leg dropped"

    await check_block_device(make)


async def test_mirror_over_two_servers(tmp_path: Path) -> None:
    volumes = (("vol0", SIZE),)
    async with (
        running_server(tmp_path / "a", volumes, node_id="a") as a,
        running_server(tmp_path / "b", volumes, node_id="b") as b,
    ):
        count = 0

        @asynccontextmanager
        async def make() -> AsyncIterator[BlockLayer]:
            nonlocal count
            count += 1
            assert a.listen_address is not None and b.listen_address is not None
            servers = (a.listen_address, b.listen_address)
            async with open_mirror(servers, "vol0", state_dir=tmp_path / f"s{count}") as mirror:
                yield mirror
                assert [mirror.state(i) for i in range(2)] == [LegState.IN_SYNC] * 2

        await check_block_device(make)
