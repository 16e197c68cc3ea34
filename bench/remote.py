"""First figures for the core: client → server → file on loopback.

    python3 -m bench.remote [--size 256M] [--seconds 5]

Starts ``dst serve`` as its own process on a temporary directory (so client and server each
have a core, as they would on two hosts), then measures from this process through
``open_remote``: sequential 1 MiB writes and reads, and 4 KiB random reads at queue depth 1
and 32.  Prints one line per workload with MiB/s, IOPS and latency percentiles.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import trio

from dst.block import Bio, Op
from dst.client import open_remote
from dst.server.volume import parse_size
from tests.integration.harness import server_process


def _report(name: str, count: int, nbytes: int, elapsed: float, lat: list[float]) -> None:
    lat.sort()
    p50 = lat[len(lat) // 2] * 1e6
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
    print(
        f"{name:<28} {nbytes / elapsed / 2**20:9.1f} MiB/s {count / elapsed:9.0f} IOPS"
        f"   p50 {p50:8.0f} us   p99 {p99:8.0f} us",
        flush=True,
    )


async def _sequential(vol: object, op: Op, size: int, depth: int = 4) -> None:
    block = 1 << 20
    bufs = [bytearray(random.randbytes(block)) for _ in range(depth)]
    lat: list[float] = []
    offsets = iter(range(0, size, block))

    async def worker(buf: bytearray) -> None:
        for off in offsets:
            t = time.perf_counter()
            await vol.submit(Bio.from_buffer(op, off, buf))  # type: ignore[attr-defined]
            lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for buf in bufs:
            nursery.start_soon(worker, buf)
    elapsed = time.perf_counter() - start
    _report(f"seq {op.name.lower()} 1MiB qd{depth}", len(lat), size, elapsed, lat)


async def _random_read(vol: object, size: int, depth: int, seconds: float) -> None:
    rng = random.Random(depth)
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        buf = bytearray(4096)
        while time.perf_counter() < deadline:
            off = rng.randrange(size // 4096) * 4096
            t = time.perf_counter()
            await vol.submit(Bio.from_buffer(Op.READ, off, buf))  # type: ignore[attr-defined]
            lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    _report(f"rand read 4KiB qd{depth}", len(lat), len(lat) * 4096, elapsed, lat)


async def run(size: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp), f"bench={size}") as sp:
        sp.start()
        async with open_remote(sp.address, "bench") as vol:
            await _sequential(vol, Op.WRITE, size)
            await _sequential(vol, Op.READ, size)
            await _random_read(vol, size, 1, seconds)
            await _random_read(vol, size, 32, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M", type=parse_size)
    parser.add_argument("--seconds", default=5.0, type=float)
    args = parser.parse_args()
    print(f"dst client -> dst serve -> file, loopback, volume {args.size >> 20} MiB")
    trio.run(run, args.size, args.seconds)


if __name__ == "__main__":
    main()
