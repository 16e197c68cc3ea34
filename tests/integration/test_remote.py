"""Client ↔ server on loopback: real sockets, real files, data verified against the file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from dst.block import Bio, BioFlags, Op, Plug, Segment
from dst.client import open_remote
from dst.errors import BlockError
from tests.integration.harness import running_server

MiB = 1 << 20


def scattered_bio(op: Op, offset: int, sizes: list[int], rng: random.Random) -> Bio:
    """A multi-segment bio whose segments sit at odd offsets of separate buffers."""
    segments = []
    for size in sizes:
        pad = rng.randrange(0, 700)
        buf = bytearray(rng.randbytes(pad + size + rng.randrange(0, 300)))
        segments.append(Segment(memoryview(buf), pad, size))
    return Bio(op, offset, sum(sizes), tuple(segments))


async def test_write_read_round_trip_and_file_holds_bytes(tmp_path: Path) -> None:
    rng = random.Random(1)
    async with running_server(tmp_path) as server:
        async with open_remote(server.listen_address, "vol0") as vol:  # type: ignore[arg-type]
            assert vol.size == 64 * MiB
            data = rng.randbytes(3 * MiB + 512)
            await vol.submit(Bio.from_buffer(Op.WRITE, 63 * 512, data, flags=BioFlags.FUA))
            out = bytearray(len(data))
            await vol.submit(Bio.from_buffer(Op.READ, 63 * 512, out))
            assert out == data
            await vol.submit(Bio(Op.FLUSH, 0, 0))
    with open(tmp_path / "vol0.img", "rb") as f:
        f.seek(63 * 512)
        assert f.read(len(data)) == data
    assert os.path.getsize(tmp_path / "vol0.img") == 64 * MiB


async def test_bios_started_under_a_plug_leave_when_it_is_flushed(tmp_path: Path) -> None:
    data = [os.urandom(4096) for _ in range(4)]
    async with running_server(tmp_path, max_inflight=8) as server:
        async with open_remote(server.listen_address, "vol0") as vol:  # type: ignore[arg-type]
            link, plug = vol.link, Plug()
            assert link is not None
            sent = link.framed.bytes_sent
            writes = [
                await vol.start(Bio.from_buffer(Op.WRITE, i * 4096, d), plug)
                for i, d in enumerate(data)
            ]
            await trio.sleep(0.1)
            assert link.framed.bytes_sent == sent  # held, not sent
            assert not any(txn.done for txn in writes)
            with trio.fail_after(10):
                await plug.flush()
                assert not plug
                for txn in writes:
                    await txn.wait()
                # More bios than the server's 8 slots under one plug: waiting for a slot
                # flushes the plug, whose commands hold the slots.
                bufs = [bytearray(4096) for _ in range(20)]
                reads = [
                    await vol.start(Bio.from_buffer(Op.READ, (i % 4) * 4096, buf), plug)
                    for i, buf in enumerate(bufs)
                ]
                await plug.flush()
                for txn in reads:
                    await txn.wait()
            assert [bytes(buf) for buf in bufs] == [data[i % 4] for i in range(20)]


async def test_scattered_misaligned_bios(tmp_path: Path) -> None:
    rng = random.Random(2)
    async with running_server(tmp_path) as server:
        async with open_remote(server.listen_address, "vol0") as vol:  # type: ignore[arg-type]
            # seed 000: 4 KiB in eight scattered 512-byte pieces at sector 63 + 64k, crossing
            # a 32 KiB boundary
            offset = (63 + 64 * 3) * 512
            bio = scattered_bio(Op.WRITE, offset, [512] * 8, rng)
            await vol.submit(bio)
            out = bytearray(4096)
            await vol.submit(Bio.from_buffer(Op.READ, offset, out))
            assert bytes(out) == bio.data()
            # read back into a scattered bio too
            rbio = scattered_bio(Op.READ, offset, [1024, 512, 2048, 512], rng)
            await vol.submit(rbio)
            assert rbio.data() == bio.data()


async def test_many_in_flight_and_out_of_order(tmp_path: Path) -> None:
    rng = random.Random(3)
    blocks = {i: rng.randbytes(4096) for i in range(256)}
    async with running_server(tmp_path) as server:
        async with open_remote(server.listen_address, "vol0") as vol:  # type: ignore[arg-type]
            async with trio.open_nursery() as nursery:
                for i, block in blocks.items():
                    nursery.start_soon(vol.submit, Bio.from_buffer(Op.WRITE, i * 8192, block))
            results: dict[int, bytearray] = {}

            async def read(i: int) -> None:
                out = bytearray(4096)
                await vol.submit(Bio.from_buffer(Op.READ, i * 8192, out))
                results[i] = out

            async with trio.open_nursery() as nursery:
                for i in blocks:
                    nursery.start_soon(read, i)
            assert all(results[i] == blocks[i] for i in blocks)
            assert vol.stats.commands >= 512
            # The store took every one at once (submit_nowait): the server's reader answered
            # them itself, no task each.  A FUA write must wait for its fdatasync: a task.
            assert server.stats["completed_inline"] == 512
            await vol.submit(Bio.from_buffer(Op.WRITE, 0, blocks[0], flags=BioFlags.FUA))
            assert server.stats["completed_inline"] == 512 and server.stats["write"] == 257


async def test_a_server_short_of_pages_answers_what_it_completed_first(tmp_path: Path) -> None:
    # The server's reader completes writes into the page cache itself and queues their
    # answers; with a page pool of four 256 KiB writes and 32 sent at once, it runs out of
    # pages that only those answers give back once sent — the answering task must be free
    # to send them while the reader waits (a reader that kept them for itself would hang).
    blocks = [bytes([i + 1]) * (256 << 10) for i in range(32)]
    async with running_server(tmp_path, pool_bytes=1 << 20) as server:
        assert server.listen_address is not None
        async with open_remote(server.listen_address, "vol0") as vol:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i, block in enumerate(blocks):
                        bio = Bio.from_buffer(Op.WRITE, i * len(block), block)
                        nursery.start_soon(vol.submit, bio)
            out = bytearray(len(blocks) * len(blocks[0]))
            await vol.submit(Bio.from_buffer(Op.READ, 0, out))
            assert out == b"".join(blocks)
            assert server.stats["completed_inline"] >= 32


async def test_trim_and_write_zeroes_read_zeroes(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        async with open_remote(server.listen_address, "vol0") as vol:  # type: ignore[arg-type]
            await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"\xaa" * 3 * MiB))
            await vol.submit(Bio(Op.TRIM, 4096, 2 * MiB))
            await vol.submit(Bio(Op.WRITE_ZEROES, 2 * MiB + 4096, 8192, flags=BioFlags.NO_HOLE))
            out = bytearray(3 * MiB)
            await vol.submit(Bio.from_buffer(Op.READ, 0, out))
            assert out[:4096] == b"\xaa" * 4096
            assert out[4096 : 2 * MiB + 4096 + 8192] == bytes(2 * MiB + 8192)
            assert out[2 * MiB + 4096 + 8192 :] == b"\xaa" * (MiB - 4096 - 8192)


async def test_errors_carry_errno_and_connection_survives(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        async with open_remote(server.listen_address, "vol0") as vol:  # type: ignore[arg-type]
            with pytest.raises(BlockError) as info:
                await vol.submit(Bio.from_buffer(Op.READ, 64 * MiB - 512, bytearray(1024)))
            assert info.value.errno == 22  # EINVAL: read past the end
            with pytest.raises(BlockError) as info:
                await vol.submit(Bio.from_buffer(Op.WRITE, 64 * MiB, b"x" * 512))
            assert info.value.errno == 28  # ENOSPC: write past the end
            out = bytearray(512)
            await vol.submit(Bio.from_buffer(Op.READ, 0, out))


async def test_unknown_volume_is_enoent(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        with pytest.raises(BlockError) as info:
            async with open_remote(server.listen_address, "nope"):  # type: ignore[arg-type]
                pass
        assert info.value.errno == 2


@pytest.mark.parametrize("client_page", [4096, 16384, 65536])
@pytest.mark.parametrize("server_page", [512, 4096, 65536])
async def test_page_size_matrix(tmp_path: Path, client_page: int, server_page: int) -> None:
    """Seed 003: peers with different page sizes; the server lays data on its own pages."""
    rng = random.Random(client_page * 7 + server_page)
    async with running_server(tmp_path, page_size=server_page) as server:
        async with open_remote(
            server.listen_address,  # type: ignore[arg-type]
            "vol0",
            page_size=client_page,
        ) as vol:
            written: list[tuple[int, bytes]] = []
            # contiguous, page-multiple and odd-sized buffers at misaligned offsets
            for offset, length in [
                (0, 1 << 20),
                (2 * MiB + 63 * 512, 9 * 1024),
                (3 * MiB + 123 * 512, 6 * 1024),
                (7 * MiB + 512, 3 * client_page + 1536),
            ]:
                data = rng.randbytes(length)
                await vol.submit(Bio.from_buffer(Op.WRITE, offset, data, page_size=client_page))
                written.append((offset, data))
            sbio = scattered_bio(Op.WRITE, 20 * MiB + 63 * 512, [512, 1536, 4096, 512], rng)
            await vol.submit(sbio)
            written.append((sbio.offset, sbio.data()))
            for offset, data in written:
                out = bytearray(len(data))
                await vol.submit(Bio.from_buffer(Op.READ, offset, out, page_size=client_page))
                assert out == data, (offset, len(data))
            rbio = scattered_bio(Op.READ, sbio.offset, [1024, 1024, 3584, 1024], rng)
            await vol.submit(rbio)
            assert rbio.data() == sbio.data()
    with open(tmp_path / "vol0.img", "rb") as f:
        for offset, data in written:
            f.seek(offset)
            assert f.read(len(data)) == data
