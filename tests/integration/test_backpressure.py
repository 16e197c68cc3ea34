"""Bounded memory on the server: a tiny page pool and a small in-flight cap still serve a
flood of large concurrent writes — by making the clients wait, never by buffering more."""

from __future__ import annotations

import random
from pathlib import Path

import trio
import trio.testing

from dst.block import Bio, BioFlags, Op
from dst.client import open_remote
from dst.server.pool import PagePool
from tests.integration.harness import running_server

MiB = 1 << 20


async def test_small_pool_and_inflight_cap_serve_a_flood(tmp_path: Path) -> None:
    rng = random.Random(5)
    async with running_server(
        tmp_path, max_bytes=MiB, max_inflight=4, pool_bytes=2 * MiB
    ) as server:
        pool = server.pool
        low_water = pool.statistics().pages_free
        sample_stop = trio.Event()

        async def sample() -> None:
            nonlocal low_water
            while not sample_stop.is_set():
                low_water = min(low_water, pool.statistics().pages_free)
                await trio.sleep(0)

        blocks = {i: rng.randbytes(MiB) for i in range(24)}
        async with trio.open_nursery() as outer:
            outer.start_soon(sample)
            async with (
                open_remote(server.listen_address, "vol0") as a,  # type: ignore[arg-type]
                open_remote(server.listen_address, "vol0") as b,  # type: ignore[arg-type]
            ):
                async with trio.open_nursery() as nursery:
                    for i, data in blocks.items():
                        vol = a if i % 2 else b
                        # FUA: each write holds its pages across an fdatasync in a thread, so
                        # the pool runs dry whatever the speed of this run (plain writes go to
                        # the page cache inline and may each be done before the next arrives).
                        bio = Bio.from_buffer(Op.WRITE, i * MiB, data, flags=BioFlags.FUA)
                        nursery.start_soon(vol.submit, bio)
                for i, data in blocks.items():
                    out = bytearray(MiB)
                    await a.submit(Bio.from_buffer(Op.READ, i * MiB, out))
                    assert out == data
            sample_stop.set()
        stats = pool.statistics()
        assert stats.pages_total * stats.page_size == 2 * MiB
        assert low_water == 0, "the pool was exhausted at some point: backpressure was exercised"
        assert stats.pages_free == stats.pages_total, "every page came back"


async def test_pool_grants_in_order_and_survives_cancellation() -> None:
    pool = PagePool(4096, 4 * 4096)
    first = await pool.acquire(3 * 4096)
    order: list[str] = []

    async def want(name: str, nbytes: int) -> None:
        pages = await pool.acquire(nbytes)
        order.append(name)
        pages.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want, "big", 4 * 4096)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(want, "small", 4096)  # fits now, but must not overtake "big"
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire(4096)  # cancelled waiter leaves no trace
        assert order == []
        first.release()
    assert order == ["big", "small"]
    assert pool.statistics().pages_free == 4


async def test_adjacent_pages_come_back_as_one_view() -> None:
    pool = PagePool(4096, 16 * 4096)
    pages = await pool.acquire(3 * 4096 + 100)
    assert [len(v) for v in pages.views] == [3 * 4096 + 100]
    pages.release()
    again = await pool.acquire(5 * 4096)
    assert [len(v) for v in again.views] == [5 * 4096]
    empty = await pool.acquire(0)
    assert empty.views == []
