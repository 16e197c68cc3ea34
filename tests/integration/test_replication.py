"""Synchronous replication (protocol C) between two servers: writes land on both data files,
nothing sent to the peer crosses the 32 KiB boundary its store advertises, a secondary
killed under load is resynced with only the extents written while it was away, and the two
files end byte for byte identical."""

from __future__ import annotations

import errno
import json
import random
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dst.admin import fetch_status
from dst.block import Bio, BioFlags, Limits, MemoryStore, Op, Segment
from dst.client import open_remote
from dst.errors import BlockError
from dst.net.endpoints import Address
from dst.replication import peer as peer_module
from dst.replication import sync as sync_module
from dst.replication.sync import ReplicaState
from dst.server import Server
from dst.server import server as server_module
from tests.integration.harness import (
    ServerProcess,
    free_port,
    pair_processes,
    running_server,
    same_files,
    wait_in_sync,
)
from tests.integration.nbdtools import run, text

MiB = 1 << 20
HOT = 8 * MiB
VOLUME = (("vol0", 64 * MiB),)


@asynccontextmanager
async def running_pair(
    tmp_path: Path, protocol: str = "C"
) -> AsyncIterator[tuple[Server, Server, Address, Address]]:
    """An in-process replicated pair, its replication link up: (primary, secondary, their
    addresses)."""
    async with running_server(
        tmp_path / "secondary", VOLUME, peer=Address("127.0.0.1", 1), role="secondary"
    ) as secondary:
        assert secondary.listen_address is not None
        async with running_server(
            tmp_path / "primary",
            VOLUME,
            peer=secondary.listen_address,
            role="primary",
            protocol=protocol,
        ) as primary:
            rep = primary.volumes["vol0"].replicated
            assert rep is not None and primary.listen_address is not None
            with trio.fail_after(10):
                await rep.peer.wait_connected()
            yield primary, secondary, primary.listen_address, secondary.listen_address


async def test_writes_land_on_both_and_no_peer_request_crosses_32k(tmp_path: Path) -> None:
    rng = random.Random(1)
    async with running_server(
        tmp_path / "secondary",
        VOLUME,
        peer=Address("127.0.0.1", 1),
        role="secondary",
        node_id="secondary",
    ) as secondary:
        # Seed 000: the secondary's store refuses (EINVAL) any bio crossing a 32 KiB multiple,
        # and advertises that boundary when the primary's link attaches.
        strict = MemoryStore(64 * MiB, Limits(boundary=32768), strict=True)
        secondary.volumes["vol0"].layer = strict
        assert secondary.listen_address is not None
        async with running_server(
            tmp_path / "primary",
            VOLUME,
            peer=secondary.listen_address,
            role="primary",
            node_id="primary",
        ) as primary:
            replicated = primary.volumes["vol0"].replicated
            assert replicated is not None
            with trio.fail_after(10):
                await replicated.peer.wait_connected()
            assert replicated.peer.limits.boundary == 32768  # stacked from the Attached limits
            assert primary.listen_address is not None
            async with open_remote(primary.listen_address, "vol0") as vol:
                # The primary takes any shape and splits for its peer itself: clients send
                # bios across 32 KiB multiples, which the strict peer would refuse.
                assert vol.limits.boundary == 0
                written: list[tuple[int, bytes]] = []
                # a scattered, misaligned multi-segment bio at sector 63 crossing 32 KiB
                offset = (63 + 64 * 7) * 512
                segs = []
                for size in [512] * 8:
                    buf = bytearray(rng.randbytes(size + 700))
                    segs.append(Segment(memoryview(buf), 311, size))
                bio = Bio(Op.WRITE, offset, 4096, tuple(segs))
                await vol.submit(bio)
                written.append((offset, bio.data()))
                for _ in range(20):
                    off = rng.randrange(0, 60 * MiB // 512) * 512
                    data = rng.randbytes(rng.randrange(1, 300) * 512)
                    await vol.submit(Bio.from_buffer(Op.WRITE, off, data, flags=BioFlags.FUA))
                    written.append((off, data))
                await vol.submit(Bio(Op.FLUSH, 0, 0))
                stats = replicated.statistics()
                assert stats.degraded_writes == 0, "every write reached the strict peer"
                assert stats.out_of_sync_bytes == 0
                # the secondary has exactly what the primary has
                primary_file = (tmp_path / "primary" / "vol0.img").read_bytes()
                assert strict.contents() == primary_file
                for off, data in written[-5:]:
                    assert primary_file[off : off + len(data)] == data


async def test_a_1m_write_reaches_a_file_secondary_as_one_request(tmp_path: Path) -> None:
    """Without a boundary on the secondary, the link sends what the secondary takes: a 1 MiB
    write is one request there (with the fixed 32 KiB cut of older DRBD it was 32)."""
    data = random.Random(3).randbytes(MiB)
    async with running_pair(tmp_path) as (primary, secondary, p_addr, _):
        rep = primary.volumes["vol0"].replicated
        assert rep is not None and rep.peer.limits.boundary == 0
        async with open_remote(p_addr, "vol0") as vol:
            await vol.submit(Bio.from_buffer(Op.WRITE, 3 * MiB, data))
        assert secondary.stats["write"] == 1 and secondary.stats["bytes_write"] == MiB
        with open(tmp_path / "secondary" / "vol0.img", "rb") as f:
            f.seek(3 * MiB)
            assert f.read(MiB) == data


async def test_clients_cannot_write_to_a_secondary(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, VOLUME, peer=Address("127.0.0.1", 1), role="secondary"
    ) as secondary:
        assert secondary.listen_address is not None
        with pytest.raises(BlockError) as info:
            async with open_remote(secondary.listen_address, "vol0"):
                pass
        assert info.value.errno == errno.EROFS


@pytest.mark.parametrize("protocol", ["C", "B", "A"])
async def test_secondary_killed_under_load_is_resynced_with_dirty_extents_only(
    tmp_path: Path, protocol: str
) -> None:
    rng = random.Random(2)
    pport = free_port()
    sec = ServerProcess(
        tmp_path / "secondary",
        free_port(),
        "vol0=64M",
        tmp_path / "secondary.log",
        "--peer",
        f"127.0.0.1:{pport}",
        "--role",
        "secondary",
    )
    try:
        sec.start()
        async with running_server(
            tmp_path / "primary",
            VOLUME,
            peer=sec.address,
            role="primary",
            node_id="primary",
            protocol=protocol,
        ) as primary:
            rep = primary.volumes["vol0"].replicated
            assert rep is not None and primary.listen_address is not None
            with trio.fail_after(10):
                await rep.peer.wait_connected()
            async with open_remote(primary.listen_address, "vol0") as vol:
                phase = "connected"
                counts = {"connected": 0, "degraded": 0, "resync": 0}
                stop = trio.Event()

                async def writer() -> None:
                    while not stop.is_set():
                        # a hot 8 MiB region, as real workloads have
                        off = rng.randrange(0, HOT // 4096) * 4096
                        await vol.submit(Bio.from_buffer(Op.WRITE, off, rng.randbytes(4096)))
                        counts[phase] += 4096

                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(writer)
                    await trio.sleep(0.5)
                    sec.kill(signal.SIGKILL)
                    phase = "degraded"
                    await trio.sleep(1.5)
                    degraded_stats = rep.statistics()
                    await trio.to_thread.run_sync(sec.start)
                    phase = "resync"
                    with trio.fail_after(30):
                        while not (
                            rep.peer.connected
                            and rep.statistics().out_of_sync_bytes == 0
                            and rep.statistics().resynced_bytes > 0
                        ):
                            await trio.sleep(0.05)
                    stop.set()
                await vol.submit(Bio(Op.FLUSH, 0, 0))
            stats = rep.statistics()
            print(
                f"\nwritten while connected {counts['connected']} B, while degraded "
                f"{counts['degraded']} B ({degraded_stats.degraded_writes} writes), during "
                f"resync {counts['resync']} B; out of sync at restart "
                f"{degraded_stats.out_of_sync_bytes} B; resynced {stats.resynced_bytes} B "
                f"of a {64 * MiB} B volume"
            )
            assert counts["degraded"] > 0 and degraded_stats.degraded_writes > 0
            # only dirty extents were copied: never more than the region written while apart
            assert 0 < stats.resynced_bytes <= HOT
            assert degraded_stats.out_of_sync_bytes <= HOT
        assert same_files(tmp_path / "primary" / "vol0.img", tmp_path / "secondary" / "vol0.img")
    finally:
        sec.stop()


async def test_dst_status_shows_roles_connection_and_out_of_sync(tmp_path: Path) -> None:
    async with running_pair(tmp_path) as (_, _, p_addr, s_addr):
        dst = [sys.executable, "-m", "dst", "status", "--server"]
        out = await run([*dst, str(p_addr), "--json"])
        doc = json.loads(out.stdout)
        assert doc["role"] == "primary"
        vol = doc["volumes"]["vol0"]
        assert (vol["connection"], vol["out_of_sync_bytes"]) == ("connected", 0)
        out = await run([*dst, str(s_addr), "--json"])
        doc = json.loads(out.stdout)
        assert doc["role"] == "secondary" and doc["sessions"]["replica"] == 1
        table = (await run([*dst, str(p_addr)])).stdout.decode()
        assert re.search(r"vol0\s+64\.0 MiB\s+connected\s+up-to-date\s+up-to-date", table)


async def test_clients_listing_both_servers_attach_where_the_volume_is_primary(
    tmp_path: Path,
) -> None:
    async with running_pair(tmp_path) as (primary, _, p_addr, s_addr):
        # the secondary first: it refuses (EROFS) and the client moves on to the primary
        both = [s_addr, p_addr]
        async with open_remote(both, "vol0") as vol:
            await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"p" * 4096))
        with trio.fail_after(10):  # the server sees the client's close when it next reads
            while primary.sessions["client"]:
                await trio.sleep(0.01)
        assert primary.stats["write"] == 1


async def test_the_primary_answers_cached_reads_at_once_and_never_a_write(
    tmp_path: Path,
) -> None:
    """submit_nowait on the primary: READs come from the local store in the session's
    reader; a WRITE completed there would never reach the peer, so every one takes the
    replicated path — and lands on both sides."""
    blocks = [random.Random(i).randbytes(4096) for i in range(16)]
    async with running_pair(tmp_path) as (primary, secondary, p_addr, _):
        async with open_remote(p_addr, "vol0") as vol:
            async with trio.open_nursery() as nursery:
                for i, block in enumerate(blocks):
                    nursery.start_soon(vol.submit, Bio.from_buffer(Op.WRITE, i * 4096, block))
            assert primary.stats["completed_inline"] == 0 and primary.stats["write"] == 16
            out = bytearray(16 * 4096)
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    view = memoryview(out)[i * 4096 : (i + 1) * 4096]
                    nursery.start_soon(vol.submit, Bio.from_buffer(Op.READ, i * 4096, view))
            assert out == b"".join(blocks)
            assert primary.stats["completed_inline"] == 16
        assert secondary.stats["write"] == 16
        with open(tmp_path / "secondary" / "vol0.img", "rb") as f:
            assert f.read(len(out)) == out


async def test_dst_verify_finds_exactly_the_extent_that_differs(tmp_path: Path) -> None:
    rng = random.Random(4)
    async with running_pair(tmp_path) as (_, _, p_addr, _):
        async with open_remote(p_addr, "vol0") as vol:
            await vol.submit(Bio.from_buffer(Op.WRITE, 0, rng.randbytes(8 * MiB)))
            await vol.submit(Bio(Op.FLUSH, 0, 0))
        cmd = [
            sys.executable,
            "-m",
            "dst",
            "verify",
            "--server",
            str(p_addr),
            "--volume",
            "vol0",
        ]
        out = await run(cmd)
        assert "1024 extents of 65536; 0 differ" in out.stdout.decode(), text(out)
        # a bit rots on the secondary, behind dst's back
        with open(tmp_path / "secondary" / "vol0.img", "r+b") as f:
            f.seek(5 * MiB + 1000)
            f.write(b"\xff")
        out = await run(cmd, check=False)
        assert out.returncode == 1, text(out)
        assert "1 differ" in out.stdout.decode()
        assert f"differs: offset {5 * MiB} length 65536" in out.stdout.decode()


async def test_primary_killed_promote_secondary_then_old_primary_rejoins(tmp_path: Path) -> None:
    """Failover: every write acknowledged before the crash is on the promoted secondary; the
    client follows it without an error; the old primary, restarted as secondary, is resynced
    until the two data files are identical."""
    rng = random.Random(5)
    with pair_processes(tmp_path) as (primary, secondary):
        secondary.start()
        primary.start()
        acked: dict[int, bytes] = {}
        async with open_remote(
            [primary.address, secondary.address], "vol0", keepalive_s=0.2, dead_after_s=1.0
        ) as vol:
            stop = trio.Event()
            errors: list[BaseException] = []

            async def writer(worker: int) -> None:
                while not stop.is_set():
                    block = rng.randrange(256) * 4 + worker  # each worker owns its blocks
                    data = rng.randbytes(4096)
                    try:
                        await vol.submit(Bio.from_buffer(Op.WRITE, block * 4096, data))
                    except BlockError as exc:
                        errors.append(exc)
                        return
                    acked[block] = data

            async with trio.open_nursery() as nursery:
                for w in range(4):
                    nursery.start_soon(writer, w)
                await trio.sleep(0.7)
                primary.kill(signal.SIGKILL)
                promote = [
                    sys.executable,
                    "-m",
                    "dst",
                    "promote",
                    "--server",
                    str(secondary.address),
                    "--volume",
                    "vol0",
                ]
                with trio.fail_after(10):
                    while (await run(promote, check=False)).returncode != 0:
                        await trio.sleep(0.2)  # EBUSY until it notices the primary is gone
                before = len(acked)
                with trio.fail_after(20):
                    while len(acked) < before + 50:  # writes flow again, on the new primary
                        await trio.sleep(0.05)
                stop.set()
            assert not errors
            for block, data in acked.items():
                out = bytearray(4096)
                await vol.submit(Bio.from_buffer(Op.READ, block * 4096, out))
                assert out == data, block
        # the old primary comes back as a secondary of the new one, on its old address
        old = ServerProcess(
            primary.data_dir,
            primary.address.port,
            "vol0=64M",
            tmp_path / "old-primary.log",
            "--peer",
            str(secondary.address),
            "--role",
            "secondary",
        )
        try:
            old.start()
            doc = await wait_in_sync(secondary.address)
            assert doc["role"] == "primary"
            assert same_files(primary.data_dir / "vol0.img", secondary.data_dir / "vol0.img")
            # bitmap-based: the new primary's writes since the failover and the old one's
            # activity log (4 MiB extents) over the 4 MiB the writers touch, not 64 MiB
            total = doc["volumes"]["vol0"]["resync"]["total_bytes"]
            assert 0 < total <= 8 * MiB, total
            print(f"rejoin after failover: {total} B resynced of a {64 * MiB} B volume")
        finally:
            old.stop()


async def test_primary_crash_and_restart_resyncs_its_activity_log_extents(tmp_path: Path) -> None:
    """A primary SIGKILLed mid-write may have written blocks its secondary never got; on
    restart its activity log names the extents, they are resynced, and the files converge."""
    rng = random.Random(6)
    with pair_processes(tmp_path) as (primary, secondary):
        secondary.start()
        primary.start()
        async with open_remote(primary.address, "vol0", keepalive_s=0.2, dead_after_s=1.0) as vol:
            stop = trio.Event()

            async def writer() -> None:
                while not stop.is_set():
                    off = rng.randrange(HOT // 4096) * 4096
                    await vol.submit(Bio.from_buffer(Op.WRITE, off, rng.randbytes(4096)))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(writer)
                await trio.sleep(0.7)
                primary.kill(signal.SIGKILL)  # mid-transaction: 4 writers always in flight
                await trio.to_thread.run_sync(primary.start)
                await trio.sleep(0.5)
                stop.set()
        v = (await wait_in_sync(primary.address))["volumes"]["vol0"]
        assert v["resync"]["total_bytes"] > 0
        log = primary.log_path.read_text()
        m = re.search(r"event=crash_recovery al_extents=(\d+) bytes=(\d+)", log)
        assert m and 0 < int(m.group(2)) <= HOT, "the AL named the hot extents, not the volume"
        assert same_files(primary.data_dir / "vol0.img", secondary.data_dir / "vol0.img")


class FlushFails:
    """A layer whose FLUSH fails with EIO (a peer disk that cannot make data stable)."""

    def __init__(self, below: Any) -> None:
        self.below = below
        self.limits, self.size = below.limits, below.size

    async def submit(self, bio: Bio) -> None:
        if bio.op is Op.FLUSH:
            raise BlockError(errno.EIO, "flush failed (test)")
        await self.below.submit(bio)

    async def aclose(self) -> None:
        await self.below.aclose()


async def test_a_failed_peer_flush_marks_what_it_should_have_made_stable(tmp_path: Path) -> None:
    """Writes the peer completed but never made stable are marked out of sync when its FLUSH
    fails, before the FLUSH is acknowledged; they are resynced once the peer flushes again."""
    async with running_pair(tmp_path) as (primary, secondary, p_addr, _):
        rep = primary.volumes["vol0"].replicated
        assert rep is not None
        good = secondary.volumes["vol0"].layer
        secondary.volumes["vol0"].layer = FlushFails(good)
        async with open_remote(p_addr, "vol0") as vol:
            for extent in (3, 10, 11):
                await vol.submit(Bio.from_buffer(Op.WRITE, extent * 65536, b"u" * 4096))
            await vol.submit(Bio(Op.FLUSH, 0, 0))  # stable here; the peer's flush failed
            assert rep.bitmap.dirty_bytes == 3 * 65536
            secondary.volumes["vol0"].layer = good
            with trio.fail_after(20):
                while rep.statistics().out_of_sync_bytes:
                    await trio.sleep(0.05)
        assert same_files(tmp_path / "primary" / "vol0.img", tmp_path / "secondary" / "vol0.img")


async def test_the_peer_is_up_to_date_only_once_it_adopted_the_resync_s_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync ends in two steps: the source's bitmap is empty, then the target adopts the
    source's generation ids.  Until the second, `dst status` must not call the peer up to date
    (a failover in between would find the two sides' ids apart: a needless full resync, or a
    split brain if both then write).  A lost adopt request breaks the link after the request
    timeout, and the next handshake finishes the resync."""
    monkeypatch.setattr(peer_module, "PEER_REQUEST_TIMEOUT_S", 1.0)
    adopt_swallowed = trio.Event()
    real_answer = sync_module.answer

    async def answer(state: ReplicaState, action: str, given: Any) -> dict[str, Any]:
        if action == "adopt" and not adopt_swallowed.is_set():
            adopt_swallowed.set()
            await trio.sleep_forever()  # the request is lost on a link that stays up
        return await real_answer(state, action, given)

    monkeypatch.setattr(server_module, "answer", answer)
    port = free_port()
    vols = (("vol0", 16 * MiB),)
    peer = Address("127.0.0.1", port)
    async with running_server(tmp_path / "primary", vols, peer=peer, role="primary") as primary:
        assert primary.listen_address is not None
        async with open_remote(primary.listen_address, "vol0") as vol:  # degraded: no peer
            await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"d" * 4096, flags=BioFlags.FUA))
        async with running_server(
            tmp_path / "secondary",
            vols,
            peer=Address("127.0.0.1", 1),
            role="secondary",
            listen=str(peer),
        ) as secondary:
            with trio.fail_after(20):
                await adopt_swallowed.wait()
            doc = (await fetch_status(primary.listen_address, None))["volumes"]["vol0"]
            assert doc["out_of_sync_bytes"] == 0  # every block copied ...
            assert doc["peer_disk"] == "outdated"  # ... but the resync has not ended
            doc = (await wait_in_sync(primary.listen_address, 20))["volumes"]["vol0"]
            assert secondary.listen_address is not None
            peer_doc = (await fetch_status(secondary.listen_address, None))["volumes"]["vol0"]
            assert peer_doc["generations"] == doc["generations"]
            assert not peer_doc["generations"]["inconsistent"]
    assert same_files(tmp_path / "primary" / "vol0.img", tmp_path / "secondary" / "vol0.img")


async def test_a_declared_boundary_reaches_clients_and_the_peer_link(tmp_path: Path) -> None:
    """`dst serve --boundary 32K` on both servers of a pair (the chaos lab's setting): a
    client and the primary's link both stack it, and a write across it lands whole on both
    sides in pieces that do not cross it."""
    data = random.Random(4).randbytes(64 * 1024)
    with pair_processes(tmp_path, "vol0=64M", "--boundary", "32K") as (primary, secondary):
        secondary.start()
        primary.start()
        async with open_remote([primary.address, secondary.address], "vol0") as vol:
            assert vol.limits.boundary == 32768
            await vol.submit(Bio.from_buffer(Op.WRITE, 16 * 1024, data))  # crosses 32K, 64K
            assert vol.stats.commands == 3  # 16K + 32K + 16K
            await vol.submit(Bio(Op.FLUSH, 0, 0))
        await wait_in_sync(primary.address)
    assert same_files(tmp_path / "primary" / "vol0.img", tmp_path / "secondary" / "vol0.img")
    with open(tmp_path / "secondary" / "vol0.img", "rb") as f:
        f.seek(16 * 1024)
        assert f.read(len(data)) == data
