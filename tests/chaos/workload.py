"""A chaos workload process: random self-describing writes, reads checked as they go,
flushes, at queue depth > 1, every operation logged to a history (tests/chaos/history.py).

    python3 -m tests.chaos.workload --target dst://127.0.0.1:7000,127.0.0.1:7001/vol0 \\
        --writer 1 --seed 7 --history h1.jsonl --duration 10 [--ops N] [--depth 4]

Writes are 1..64 sectors inside ``--region`` bytes at the volume's start, so they overlap
often; one in four is placed across a 32 KiB boundary (the one the chaos servers declare,
tests/chaos/core.py: the splitter cuts such a write into two commands).  A write's sectors
carry (writer, seq = history id, epoch), so every sector read back names the write it came
from.  The dst:// target lists one or two servers: the
client follows the primary after a failover.  The nbd://HOST:PORT/EXPORT target goes through
a dst bridge with tests/chaos/nbdclient.py; requests the bridge's death left unanswered stay
unknown in the history, and the client reconnects.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from dst.block import Bio, Op
from dst.client import open_remote
from dst.errors import BlockError
from tests.chaos.history import HistoryWriter
from tests.chaos.nbdclient import Lost, NbdVolume
from tests.chaos.sectors import SECTOR, Kind, decode_run, encode_run

EXTENT = 32 << 10


def parse_target(target: str) -> tuple[str, list[str], str]:
    scheme, sep, rest = target.partition("://")
    if not sep or scheme not in ("dst", "nbd"):
        raise SystemExit(
            f"workload: target {target!r}: dst://HOST:PORT[,HOST:PORT]/VOLUME or nbd://HOST:PORT/EXPORT"
        )
    hosts, _, volume = rest.partition("/")
    return scheme, hosts.split(","), volume


class Workload:
    def __init__(self, args: argparse.Namespace, vol: Any) -> None:
        self.args = args
        self.vol = vol
        self.rng = random.Random(args.seed * 1000 + args.writer)
        self.history = HistoryWriter(Path(args.history), args.writer)
        self.sectors = args.region // SECTOR
        self.counts = {"ok": 0, "failed": 0, "unknown": 0, "corrupt_seen": 0}
        self.issued = 0

    def pick_write(self) -> tuple[int, int]:
        n = self.rng.randint(1, 64)
        if self.rng.random() < 0.25:  # straddle a 32 KiB boundary
            boundary = self.rng.randrange(1, self.args.region // EXTENT) * (EXTENT // SECTOR)
            first = boundary - self.rng.randint(1, n) if n > 1 else boundary - 1
            return max(first, 0), n
        return self.rng.randrange(0, self.sectors - n), n

    async def one(self) -> None:
        roll = self.rng.random()
        if roll < 0.65:
            first, n = self.pick_write()
            epoch = self.args.epoch
            if epoch is None:
                epoch = int(getattr(self.vol, "epoch", 0))
            rid = self.history.invoke("write", first * SECTOR, n, epoch=epoch)
            data = encode_run(self.args.volume_id, first, n, self.args.writer, rid, epoch)
            await self.run(rid, Bio.from_buffer(Op.WRITE, first * SECTOR, data))
        elif roll < 0.95:
            n = self.rng.randint(1, 64)
            first = self.rng.randrange(0, self.sectors - n)
            buf = bytearray(n * SECTOR)
            rid = self.history.invoke("read", first * SECTOR, n)
            await self.run(rid, Bio.from_buffer(Op.READ, first * SECTOR, buf), buf, first)
        else:
            rid = self.history.invoke("flush")
            await self.run(rid, Bio(Op.FLUSH, 0, 0))

    async def run(self, rid: int, bio: Bio, buf: bytearray | None = None, first: int = 0) -> None:
        try:
            await self.vol.submit(bio)
        except Lost:
            self.counts["unknown"] += 1  # the bridge died: no answer, outcome unknown
            await trio.sleep(0.05)
            return
        except BlockError as exc:
            self.counts["failed"] += 1
            self.history.complete(rid, errno=exc.errno)
            await trio.sleep(0.05)
            return
        self.counts["ok"] += 1
        if buf is None:
            self.history.complete(rid)
            return
        seen: list[object] = []
        for d in decode_run(buf, first):
            if d.kind is Kind.NEVER:
                seen.append(0)
            elif d.kind is Kind.CORRUPT or d.stamp is None:
                seen.append("corrupt")
            elif d.kind is Kind.MISDIRECTED or d.stamp.volume != self.args.volume_id:
                seen.append(["misdirected", d.stamp.writer, d.stamp.seq])
            else:
                seen.append([d.stamp.writer, d.stamp.seq])
            if seen[-1] == "corrupt" or (
                isinstance(seen[-1], list) and seen[-1][0] == "misdirected"
            ):
                self.counts["corrupt_seen"] += 1
        self.history.complete(rid, sectors=seen)

    async def worker(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.args.ops and self.issued >= self.args.ops:
                return
            self.issued += 1
            await self.one()


async def drive(args: argparse.Namespace, vol: Any) -> Workload:
    wl = Workload(args, vol)
    deadline = time.monotonic() + args.duration
    async with trio.open_nursery() as nursery:
        for _ in range(args.depth):
            nursery.start_soon(wl.worker, deadline)
    wl.history.close()
    return wl


async def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.chaos.workload")
    p.add_argument("--target", required=True)
    p.add_argument("--writer", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", required=True)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--ops", type=int, default=0)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--region", type=int, default=2 << 20)
    p.add_argument("--volume-id", type=int, default=0)
    p.add_argument(
        "--epoch",
        type=int,
        help="the epoch an nbd:// target's bridge writes at (a dst:// client knows its own)",
    )
    p.add_argument("--tls", type=Path, help="an nbd:// target over STARTTLS: a `dst certs` dir")
    args = p.parse_args(argv)
    scheme, servers, volume = parse_target(args.target)
    if scheme == "nbd":
        host, _, port = servers[0].rpartition(":")
        nbd = NbdVolume(host, int(port), volume, args.tls)
        async with trio.open_nursery() as outer:
            await nbd.connect(outer)
            wl = await drive(args, nbd)
            await nbd.aclose()
    else:
        async with open_remote(
            servers, volume, keepalive_s=0.2, dead_after_s=1.0, max_retries=40
        ) as vol:
            wl = await drive(args, vol)
    print(json.dumps({"writer": args.writer, **wl.counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
