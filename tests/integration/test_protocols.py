"""Replication protocols A, B and C: when a write is acknowledged, and that FLUSH still means
stable on both sides under every one of them.

The secondary's store is gated: its writes wait until the test opens the gate.  Under C a
write cannot complete while the gate is shut; under B (the peer said Received) and A (the
request is on the wire) it can, and a FLUSH then waits until the peer has finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from dst.block import Bio, BioFlags, Op
from dst.client import open_remote
from tests.integration.harness import same_files
from tests.integration.test_replication import running_pair

KiB = 1024


class Gate:
    """A layer whose writes wait for ``opened``."""

    def __init__(self, below: Any) -> None:
        self.below = below
        self.limits, self.size = below.limits, below.size
        self.opened = trio.Event()
        self.waiting = 0

    async def submit(self, bio: Bio) -> None:
        if bio.op is Op.WRITE:
            self.waiting += 1
            await self.opened.wait()
            self.waiting -= 1
        await self.below.submit(bio)

    async def aclose(self) -> None:
        await self.below.aclose()


def block(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(4 * KiB)


@pytest.mark.parametrize("protocol", ["A", "B"])
async def test_a_and_b_acknowledge_before_the_peer_is_done_and_flush_waits(
    tmp_path: Path, protocol: str
) -> None:
    async with running_pair(tmp_path, protocol) as (_, secondary, address, _):
        gate = Gate(secondary.volumes["vol0"].layer)
        secondary.volumes["vol0"].layer = gate
        async with open_remote(address, "vol0") as vol:
            with trio.fail_after(10):  # returns with the peer's write still held
                await vol.submit(Bio.from_buffer(Op.WRITE, 64 * KiB, b"w" * 4096))
            assert gate.waiting == 1
            assert block(tmp_path / "primary" / "vol0.img", 64 * KiB) == b"w" * 4096
            assert block(tmp_path / "secondary" / "vol0.img", 64 * KiB) == bytes(4096)
            flushed = trio.Event()

            async def flush() -> None:
                await vol.submit(Bio(Op.FLUSH, 0, 0))
                flushed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush)
                await trio.sleep(0.5)
                assert not flushed.is_set(), "FLUSH must wait for the peer's write"
                gate.opened.set()
            assert block(tmp_path / "secondary" / "vol0.img", 64 * KiB) == b"w" * 4096
        received = secondary.stats["received_acks"]
        assert received == (1 if protocol == "B" else 0)
        assert same_files(tmp_path / "primary" / "vol0.img", tmp_path / "secondary" / "vol0.img")


@pytest.mark.parametrize(
    ("protocol", "flags"), [("C", BioFlags.NONE), ("A", BioFlags.FUA)], ids=["C", "FUA-under-A"]
)
async def test_c_and_fua_acknowledge_only_when_the_peer_is_done(
    tmp_path: Path, protocol: str, flags: BioFlags
) -> None:
    """Under C every write, and under any protocol a FUA write, waits for the peer."""
    async with running_pair(tmp_path, protocol) as (_, secondary, address, _):
        gate = Gate(secondary.volumes["vol0"].layer)
        secondary.volumes["vol0"].layer = gate
        async with open_remote(address, "vol0") as vol:
            done = trio.Event()

            async def write() -> None:
                await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"c" * 4096, flags=flags))
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                await trio.sleep(0.5)
                assert gate.waiting == 1 and not done.is_set()
                gate.opened.set()
            assert block(tmp_path / "secondary" / "vol0.img", 0) == b"c" * 4096


async def test_a_peer_that_never_answers_a_write_degrades_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replicated write whose answer never comes (a lost frame, a stuck disk — pings still
    pass) breaks the replication link after the request timeout: the write is recorded in the
    bitmap and acknowledged instead of stalling the primary forever."""
    monkeypatch.setattr("dst.replication.peer.PEER_REQUEST_TIMEOUT_S", 1.0)
    async with running_pair(tmp_path) as (primary, secondary, address, _):
        gate = Gate(secondary.volumes["vol0"].layer)
        secondary.volumes["vol0"].layer = gate
        try:
            async with open_remote(address, "vol0") as vol:
                with trio.fail_after(30):
                    await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"s" * 4096))
            rep = primary.volumes["vol0"].replicated
            assert rep is not None and rep.statistics().degraded_writes == 1
            assert rep.statistics().out_of_sync_bytes > 0
        finally:
            gate.opened.set()
