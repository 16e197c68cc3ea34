"""Frame faults (tests/chaos/proxy.py) between the dst client and a real in-process server,
and on the replication link of a pair: what dst promises under each.

- nothing acknowledged is ever lost or silently corrupted (bit flips are caught by crc32c);
- a duplicated or replayed write frame never undoes a newer write (the replay window);
- a lost frame, a black hole, a cut or reset connection: the request times out or the link
  breaks, the client reconnects and resends — no hang, no false success;
- a replication link that goes dark degrades the primary, and client writes go on.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dst import chaos
from dst.admin import fetch_status
from dst.block import Bio, BioFlags, Op
from dst.client import open_remote
from dst.client.remote import RemoteVolume
from dst.errors import BlockError
from dst.net.endpoints import Address
from dst.replication import peer as peer_module
from dst.server import Server
from tests.chaos.proxy import FaultProxy, replies, writes
from tests.integration.harness import running_server, same_files, wait_in_sync

BLOCK = 4096
MiB = 1 << 20


@asynccontextmanager
async def proxied(
    tmp_path: Path, seed: int = 1, **server: object
) -> AsyncIterator[tuple[Server, FaultProxy, Address]]:
    """A real server with a FaultProxy in front: (server, proxy, the proxy's address)."""
    async with running_server(tmp_path, **server) as srv:  # type: ignore[arg-type]
        assert srv.listen_address is not None
        proxy = FaultProxy(srv.listen_address, seed=seed)
        async with trio.open_nursery() as nursery:
            address = await nursery.start(proxy.serve)
            try:
                yield srv, proxy, address
            finally:
                proxy.close()


async def write(vol: RemoteVolume, offset: int, data: bytes, fua: bool = False) -> None:
    flags = BioFlags.FUA if fua else BioFlags(0)
    await vol.submit(Bio.from_buffer(Op.WRITE, offset, data, flags=flags))


async def read(vol: RemoteVolume, offset: int, length: int) -> bytes:
    out = bytearray(length)
    await vol.submit(Bio.from_buffer(Op.READ, offset, out))
    return bytes(out)


async def test_pass_through_changes_nothing(tmp_path: Path) -> None:
    rng = random.Random(1)
    async with proxied(tmp_path) as (_, proxy, address):
        async with open_remote(address, "vol0") as vol:
            data = rng.randbytes(2 * MiB + 512)
            await write(vol, 63 * 512, data, fua=True)
            assert await read(vol, 63 * 512, len(data)) == data
            assert vol.stats.reconnects == 0
        assert proxy.counts == Counter()
    with open(tmp_path / "vol0.img", "rb") as f:
        f.seek(63 * 512)
        assert f.read(len(data)) == data


async def test_bitflips_in_writes_never_land_silently(tmp_path: Path) -> None:
    """Every flipped write frame fails its crc at the server and breaks the link; the client
    resends the write on a new link.  Whatever was acknowledged reads back exactly."""
    rng = random.Random(2)
    acked: dict[int, bytes] = {}
    async with proxied(tmp_path, seed=2) as (_, proxy, address):
        async with open_remote(address, "vol0", request_timeout_s=1.0, max_retries=5) as vol:
            proxy.upstream.only = writes
            proxy.upstream.bitflip_p = 0.3
            for i in range(30):
                data = rng.randbytes(BLOCK)
                try:
                    await write(vol, i * BLOCK, data)
                    acked[i] = data
                except BlockError:
                    pass  # an error is allowed; a wrong acknowledged block is not
            proxy.upstream.bitflip_p = 0
            assert proxy.counts["bitflip"] > 0
            assert vol.stats.reconnects > 0, "a damaged frame broke its link"
            for i, data in acked.items():
                assert await read(vol, i * BLOCK, BLOCK) == data, i
    assert len(acked) >= 25  # the resend on a clean link goes through
    image = (tmp_path / "vol0.img").read_bytes()
    for i, data in acked.items():
        assert image[i * BLOCK : (i + 1) * BLOCK] == data


async def test_bitflips_in_read_replies_never_reach_the_reader(tmp_path: Path) -> None:
    rng = random.Random(3)
    data = rng.randbytes(64 * BLOCK)
    async with proxied(tmp_path, seed=3) as (_, proxy, address):
        async with open_remote(address, "vol0", request_timeout_s=1.0, max_retries=5) as vol:
            await write(vol, 0, data, fua=True)
            proxy.downstream.only = replies
            proxy.downstream.bitflip_p = 0.3
            good = 0
            for i in range(64):
                try:
                    got = await read(vol, i * BLOCK, BLOCK)
                except BlockError:
                    continue
                assert got == data[i * BLOCK : (i + 1) * BLOCK], f"block {i} silently corrupt"
                good += 1
            assert proxy.counts["bitflip"] > 0
            assert vol.stats.reconnects > 0
            assert good >= 50


async def newest_write_wins(
    tmp_path: Path, seed: int, fault: str
) -> tuple[Server, Counter[str], list[str]]:
    """Write 1..40 into one block, each awaited, with ``fault`` on write frames; returns the
    server, the proxy's counts and every time the block did not hold the newest write (an
    earlier frame that came back undid it) — which must never happen."""
    undone: list[str] = []
    async with proxied(tmp_path, seed=seed) as (srv, proxy, address):
        async with open_remote(address, "vol0", request_timeout_s=2.0) as vol:
            proxy.upstream.only = writes
            setattr(proxy.upstream, fault, 0.5)
            for n in range(1, 41):
                await write(vol, 0, bytes([n]) * BLOCK)
                got = (await read(vol, 0, BLOCK))[0]
                if got != n:
                    undone.append(f"after write {n} the block held {got}")
            setattr(proxy.upstream, fault, 0.0)
            await vol.submit(Bio(Op.FLUSH, 0, 0))
        counts = proxy.counts.copy()
    final = (tmp_path / "vol0.img").read_bytes()[0]
    if final != 40:
        undone.append(f"the file ended with {final}")
    return srv, counts, undone


async def test_duplicated_write_frames_never_undo_a_newer_write(tmp_path: Path) -> None:
    srv, counts, undone = await newest_write_wins(tmp_path, 4, "duplicate_p")
    assert not undone
    assert counts["duplicate"] > 5
    assert srv.stats["replayed_writes"] > 0  # the window refused the copies (EALREADY)


@pytest.mark.parametrize("broken", [None, "no-replay-check"])
async def test_replayed_write_frames_never_undo_a_newer_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str | None
) -> None:
    """Old write frames replayed on the link are refused (EALREADY) — and, for teeth, a
    build whose replay window admits them lets an old write undo newer ones."""
    if broken is not None:  # as DST_BROKEN would at import (dst/chaos.py)
        monkeypatch.setattr(chaos, "BROKEN", True)
        monkeypatch.setattr(chaos, "_BROKEN", frozenset({broken}))
    srv, counts, undone = await newest_write_wins(tmp_path, 5, "replay_p")
    assert counts["replay"] > 5
    if broken is None:
        assert not undone
        assert srv.stats["replayed_writes"] > 0
    else:
        assert undone and srv.stats["replayed_writes"] == 0, undone


async def stalled_until_healed(
    vol: RemoteVolume, proxy: FaultProxy, fault: str, setting: str, heal: object
) -> float:
    """Start a write, see it not succeed while ``fault`` holds (counted by the proxy), heal
    (set the upstream Direction's ``setting`` to ``heal``), see it complete: returns how
    long it took after healing."""
    done = trio.Event()

    async def writer() -> None:
        await write(vol, 0, b"w" * BLOCK)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        with trio.fail_after(10):
            while proxy.counts[fault] == 0:
                await trio.sleep(0.02)
        await trio.sleep(1.5)
        assert not done.is_set(), "a write the server never saw was acknowledged"
        setattr(proxy.upstream, setting, heal)
        start = trio.current_time()
        with trio.fail_after(10):
            await done.wait()
    assert await read(vol, 0, BLOCK) == b"w" * BLOCK
    return trio.current_time() - start


async def test_a_dropped_write_times_out_and_is_resent(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, proxy, address):
        async with open_remote(address, "vol0", request_timeout_s=0.5) as vol:
            proxy.upstream.only = writes
            proxy.upstream.drop_p = 1.0
            await stalled_until_healed(vol, proxy, "drop", "drop_p", 0.0)
            assert vol.stats.reconnects >= 1  # the request timeout broke the link
            assert vol.stats.resent >= 1


async def test_a_blackhole_kills_the_link_by_keepalive_and_the_client_reconnects(
    tmp_path: Path,
) -> None:
    async with proxied(tmp_path) as (_, proxy, address):
        async with open_remote(
            address, "vol0", keepalive_s=0.2, dead_after_s=1.0, request_timeout_s=None
        ) as vol:
            # everything vanishes, pings and the handshakes of new links too (a black hole
            # that let a new link come up would swallow the resent write on a live link,
            # which only a request timeout could notice)
            proxy.upstream.spare_handshake = False
            proxy.upstream.blackhole = True
            await stalled_until_healed(vol, proxy, "blackhole", "blackhole", False)
            assert vol.stats.reconnects >= 1


async def test_hold_then_release_delivers_the_held_write(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, proxy, address):
        async with open_remote(address, "vol0") as vol:
            proxy.upstream.hold = True
            took = await stalled_until_healed(vol, proxy, "hold", "hold", False)
            assert took < 1.0
            assert vol.stats.reconnects == 0  # the same link, the same frames, in order


async def test_delay_delays_and_changes_nothing_else(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, proxy, address):
        async with open_remote(address, "vol0") as vol:
            await write(vol, 0, b"d" * BLOCK)
            proxy.downstream.delay_s = 0.3
            start = trio.current_time()
            assert await read(vol, 0, BLOCK) == b"d" * BLOCK
            assert trio.current_time() - start >= 0.3
            assert proxy.counts["delay"] >= 1
            assert vol.stats.reconnects == 0


async def test_reset_connections_the_client_reconnects(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, proxy, address):
        async with open_remote(address, "vol0") as vol:
            await write(vol, 0, b"1" * BLOCK)
            proxy.reset()
            with trio.fail_after(10):
                await write(vol, BLOCK, b"2" * BLOCK)
            assert await read(vol, 0, 2 * BLOCK) == b"1" * BLOCK + b"2" * BLOCK
            assert vol.stats.reconnects >= 1


async def test_close_after_bytes_cuts_a_write_mid_frame(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(256 * 1024)
    async with proxied(tmp_path) as (_, proxy, address):
        async with open_remote(address, "vol0", max_retries=100) as vol:
            proxy.upstream.close_after_bytes = 100_000  # each connection dies inside the write
            done = trio.Event()

            async def writer() -> None:
                await write(vol, 0, data)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                with trio.fail_after(10):
                    while proxy.counts["close"] < 2:  # cut, reconnected, resent, cut again
                        await trio.sleep(0.02)
                assert not done.is_set()
                proxy.upstream.close_after_bytes = None
                with trio.fail_after(10):
                    await done.wait()
            assert await read(vol, 0, len(data)) == data
            assert vol.stats.reconnects >= 2


async def test_a_dark_replication_link_degrades_the_primary_then_resyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_module, "PEER_REQUEST_TIMEOUT_S", 1.0)
    rng = random.Random(7)
    vols = (("vol0", 16 * MiB),)
    async with running_server(
        tmp_path / "secondary", vols, peer=Address("127.0.0.1", 1), role="secondary"
    ) as secondary:
        assert secondary.listen_address is not None
        proxy = FaultProxy(secondary.listen_address, seed=7)
        async with trio.open_nursery() as nursery:
            link = await nursery.start(proxy.serve)
            async with running_server(
                tmp_path / "primary", vols, peer=link, role="primary"
            ) as primary:
                assert primary.listen_address is not None
                rep = primary.volumes["vol0"].replicated
                assert rep is not None
                with trio.fail_after(10):
                    await rep.peer.wait_connected()
                async with open_remote(primary.listen_address, "vol0") as vol:
                    await write(vol, 0, rng.randbytes(BLOCK), fua=True)
                    proxy.upstream.spare_handshake = False  # new links stay dark too
                    proxy.upstream.blackhole = True
                    with trio.fail_after(8):  # 1 s request timeout, 3 s dead-after, slack
                        for i in range(1, 200):
                            await write(vol, i * BLOCK, rng.randbytes(BLOCK), fua=True)
                            if rep.statistics().degraded_writes:
                                break
                            await trio.sleep(0.02)
                    assert rep.statistics().degraded_writes > 0
                    for j in range(i + 1, i + 20):  # degraded: writes go on at once
                        with trio.fail_after(2):
                            await write(vol, j * BLOCK, rng.randbytes(BLOCK), fua=True)
                    assert rep.statistics().out_of_sync_bytes > 0
                    proxy.upstream.blackhole = False
                    await wait_in_sync(primary.listen_address, 30)
                    await vol.submit(Bio(Op.FLUSH, 0, 0))
                doc = await fetch_status(primary.listen_address, None)
                assert doc["volumes"]["vol0"]["out_of_sync_bytes"] == 0
                assert proxy.counts["blackhole"] > 0
            proxy.close()
    assert same_files(tmp_path / "primary" / "vol0.img", tmp_path / "secondary" / "vol0.img")
