"""Write latency while a mirror leg freezes: failfast on vs off (seed 004).

    python3 -m bench.failfast [--size 256M] [--depth 4] [--after 2] [--timeout 1.0]

Two ``dst serve`` processes are the legs; this process runs the Mirror over them (as the
``dst nbd --mirror`` bridge does) and a 4 KiB random-write load at queue depth ``--depth``.
After ``--after`` seconds one leg is frozen with SIGSTOP — a hung server whose connection stays
open, the case that matters most.  Printed per mode: latency of the writes that completed from
the freeze until two seconds after the leg was dropped (p50, p99, max; those in flight at the
freeze included), how long the drop took, write errors (must be 0), then the resync when the
leg is resumed (bytes and seconds).

"on": failfast with a ``--timeout`` s deadline.  "off": no deadline — the frozen leg is found
only when keepalive declares its link dead (dead_after_s = 10 s), and writes wait until then.
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import time
from pathlib import Path

import trio

from dst.block import Bio, Op
from dst.mirror import LegState, Mirror, open_mirror
from dst.server.volume import parse_size
from tests.integration.harness import ServerProcess, free_port

#: Writes go on this long after the frozen leg was dropped (the load over one leg).
AFTER_DROP_S = 2.0


def _percentiles(lat: list[float]) -> str:
    lat = sorted(lat)
    p50 = lat[len(lat) // 2] * 1e3
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
    return f"p50 {p50:8.1f} ms   p99 {p99:8.1f} ms   max {lat[-1] * 1e3:8.1f} ms"


async def _wait_state(mirror: Mirror, leg: int, state: LegState) -> None:
    while mirror.state(leg) is not state:
        await mirror.wait_changed()


async def _measure(
    name: str, size: int, depth: int, after_s: float, timeout_s: float | None
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        legs = [
            ServerProcess(root / n, free_port(), f"bench={size}", root / f"{n}.log") for n in "ab"
        ]
        try:
            for leg in legs:
                leg.start()
            servers = [leg.address for leg in legs]
            async with open_mirror(
                servers, "bench", state_dir=root / "state", failfast_timeout_s=timeout_s
            ) as mirror:
                return await _load(name, mirror, legs[1], size, depth, after_s)
        finally:
            for leg in legs:
                leg.stop()


async def _load(
    name: str, mirror: Mirror, frozen: ServerProcess, size: int, depth: int, after_s: float
) -> float:
    rng = random.Random(4)
    frozen_at = dropped_at = float("inf")
    during: list[float] = []
    errors = 0
    done = False

    async def writer() -> None:
        nonlocal errors
        buf = bytearray(rng.randbytes(4096))
        while not done:
            offset = rng.randrange(size // 4096) * 4096
            started = time.monotonic()
            try:
                await mirror.submit(Bio.from_buffer(Op.WRITE, offset, buf))
            except Exception:  # counted: the figure says whether any write failed
                errors += 1
            finished = time.monotonic()
            if finished >= frozen_at:  # in flight at the freeze, or issued after it
                during.append(finished - started)

    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(writer)
        await trio.sleep(after_s)
        frozen.kill(signal.SIGSTOP)
        frozen_at = time.monotonic()
        await _wait_state(mirror, 1, LegState.ERRED)
        dropped_at = time.monotonic()
        await trio.sleep(AFTER_DROP_S)
        done = True
    print(
        f"failfast {name:<4} frozen leg: {len(during):6d} writes   {_percentiles(during)}"
        f"   dropped after {dropped_at - frozen_at:5.2f} s   errors {errors}",
        flush=True,
    )
    frozen.kill(signal.SIGCONT)
    dirty = mirror.legs[1].bitmap.dirty_bytes
    resumed = time.monotonic()
    await _wait_state(mirror, 1, LegState.IN_SYNC)
    print(
        f"failfast {name:<4} resumed: resynced {mirror.legs[1].resynced_bytes >> 10} KiB "
        f"({dirty >> 10} KiB dirty of {size >> 20} MiB) in {time.monotonic() - resumed:.2f} s",
        flush=True,
    )
    return max(during)


async def run(size: int, depth: int, after_s: float, timeout_s: float) -> None:
    worst_on = await _measure("on", size, depth, after_s, timeout_s)
    worst_off = await _measure("off", size, depth, after_s, None)
    print(f"slowest write while a leg freezes: off/on = {worst_off / worst_on:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M", type=parse_size)
    parser.add_argument("--depth", default=4, type=int)
    parser.add_argument("--after", default=2.0, type=float, help="seconds before the freeze")
    parser.add_argument("--timeout", default=1.0, type=float, help="failfast deadline, s")
    args = parser.parse_args()
    print(
        f"mirror of 2 dst serve legs, loopback, 4 KiB random writes qd{args.depth}, "
        f"volume {args.size >> 20} MiB; one leg SIGSTOPped after {args.after} s"
    )
    trio.run(run, args.size, args.depth, args.after, args.timeout)


if __name__ == "__main__":
    main()
