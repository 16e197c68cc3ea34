"""The primary's started write path (dst/replication/started.py) through a real in-process
pair: which writes are started without a task, that a burst of them leaves for the peer in
one send, that those that cannot start at once still land on both sides, and that a started
write the peer fails is degraded — acknowledged only once marked in the bitmap."""

from __future__ import annotations

import errno
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from dst.block import Bio, BioFlags, MemoryStore, Op, Plug
from dst.client import open_remote
from dst.client.remote import RemoteVolume
from dst.errors import BlockError
from dst.replication.layer import Replicated
from dst.server import Server
from tests.integration.starting import TaskSteps
from tests.integration.test_replication import running_pair

KiB, MiB = 1 << 10, 1 << 20


def blocks(n: int, seed: int = 0) -> list[bytes]:
    return [random.Random(seed * 1000 + i).randbytes(4 * KiB) for i in range(n)]


async def burst(vol: RemoteVolume, writes: Sequence[tuple[int, bytes, BioFlags]]) -> None:
    """Send ``writes`` in one client send (a plug), then wait for all of them."""
    plug = Plug()
    txns = []
    for offset, data, flags in writes:
        bio = Bio.from_buffer(Op.WRITE, offset, data, flags=flags)
        txns.append(await vol.start(bio, plug))
    await plug.flush()
    for txn in txns:
        await txn.wait()


def replicated(server: Server) -> Replicated:
    rep = server.volumes["vol0"].replicated
    assert rep is not None
    return rep


def image(server_dir: Path, length: int) -> bytes:
    with open(server_dir / "vol0.img", "rb") as f:
        return f.read(length)


def count_peer_sends(rep: Replicated) -> list[int]:
    """Frames per Link.send_many on the replication link, from now on."""
    link = rep.peer.link
    assert link is not None
    sends: list[int] = []
    real = link.send_many

    async def send_many(frames: Sequence[Any]) -> None:
        sends.append(len(frames))
        await real(frames)

    link.send_many = send_many  # type: ignore[method-assign]
    return sends


async def test_a_burst_of_writes_is_started_and_leaves_for_the_peer_together(
    tmp_path: Path,
) -> None:
    """32 WRITEs in one client send: the primary starts every one from its reader (no task)
    and their commands reach the secondary in a few gathered sends, not 32."""
    data = blocks(32)
    async with running_pair(tmp_path) as (primary, secondary, p_addr, _):
        rep = replicated(primary)
        async with open_remote(p_addr, "vol0") as vol:
            await burst(vol, [(0, data[0], BioFlags(0))])  # the extent's activity log commit
            before = rep.writes_started
            sends = count_peer_sends(rep)
            await burst(vol, [(i * 4 * KiB, b, BioFlags(0)) for i, b in enumerate(data)])
            assert rep.writes_started - before == 32
            # in passes of up to 8 (dst.net.stream), cut short where a payload was still on its
            # way: a handful of sends, where a send per write would be 32
            assert sum(sends) == 32 and len(sends) <= 8, sends
            assert len(rep._locks) == 0
        assert secondary.stats["write"] == 33
        assert image(tmp_path / "secondary", 128 * KiB) == b"".join(data)
        assert image(tmp_path / "primary", 128 * KiB) == b"".join(data)


async def test_writes_that_cannot_start_at_once_run_in_a_task_and_land_on_both(
    tmp_path: Path,
) -> None:
    """A write to an extent not yet in the activity log (a commit first), a FUA write and a
    write overlapping one in flight are not started from the reader: each runs in a task —
    and each lands on both sides, in the same order."""
    a, b, c, d = blocks(4, seed=1)
    async with running_pair(tmp_path) as (primary, _, p_addr, _):
        rep = replicated(primary)
        async with open_remote(p_addr, "vol0") as vol:
            await burst(vol, [(8 * MiB, a, BioFlags(0))])  # a cold extent: commit, task
            assert rep.writes_started == 0 and rep.al is not None
            await burst(vol, [(8 * MiB, b, BioFlags.FUA)])  # FUA: task
            assert rep.writes_started == 0
            # The same block twice in one send: the second waits for the first's range.
            await burst(vol, [(8 * MiB, c, BioFlags(0)), (8 * MiB, d, BioFlags(0))])
            assert rep.writes_started == 1
        for side in ("primary", "secondary"):
            with open(tmp_path / side / "vol0.img", "rb") as f:
                f.seek(8 * MiB)
                assert f.read(4 * KiB) == d, side


class Failing(MemoryStore):
    """The secondary's store for one test: every write fails with EIO."""

    async def submit(self, bio: Bio) -> None:
        if bio.op is Op.WRITE:
            raise BlockError(errno.EIO, "injected: the secondary's disk failed")
        await super().submit(bio)


async def test_a_started_write_the_peer_fails_is_marked_before_it_is_acknowledged(
    tmp_path: Path,
) -> None:
    """The peer answers a started write with EIO: the primary marks the range in its
    bitmap, durably, then acknowledges the write (a degraded write, as in a task) and lets
    go of the range — a second write to it starts again."""
    data = blocks(2, seed=2)
    async with running_pair(tmp_path) as (primary, secondary, p_addr, _):
        rep = replicated(primary)
        async with open_remote(p_addr, "vol0") as vol:
            await burst(vol, [(0, data[0], BioFlags(0))])
            assert rep.statistics().out_of_sync_bytes == 0
            secondary.volumes["vol0"].fence.below = Failing(64 * MiB)
            before = rep.writes_started
            await burst(vol, [(4 * KiB, data[1], BioFlags(0))])
            stats = rep.statistics()
            assert rep.writes_started - before == 1
            assert stats.degraded_writes == 1 and stats.out_of_sync_bytes > 0
            assert rep.bitmap.is_dirty(4 * KiB, 4 * KiB)
            assert rep.bitmap.statistics().pending_pages == 0  # flushed before the ack
            await burst(vol, [(4 * KiB, data[0], BioFlags(0))])
            assert rep.writes_started - before == 2 and len(rep._locks) == 0
        assert image(tmp_path / "primary", 8 * KiB) == data[0] * 2


async def test_at_depth_one_a_started_write_is_answered_without_the_answering_task(
    tmp_path: Path,
) -> None:
    """One write at a time: the peer's completion sends the reply itself (nothing could join
    its batch), and the primary's answering task is never woken for it."""
    count = TaskSteps()
    data = blocks(64, seed=3)
    async with running_pair(tmp_path) as (primary, _secondary, p_addr, _):
        rep = replicated(primary)
        async with open_remote(p_addr, "vol0") as vol:
            await burst(vol, [(0, data[0], BioFlags(0))])  # the extent's activity log commit
            before = rep.writes_started
            trio.lowlevel.add_instrument(count)
            try:
                for i, block in enumerate(data):
                    await burst(vol, [(i * 4 * KiB, block, BioFlags(0))])
            finally:
                trio.lowlevel.remove_instrument(count)
            assert rep.writes_started - before == 64
    answering = sum(n for name, n in count.steps.items() if name.endswith("Session._answer"))
    assert answering <= 2, count.steps
    assert image(tmp_path / "secondary", 64 * 4 * KiB) == b"".join(data)
