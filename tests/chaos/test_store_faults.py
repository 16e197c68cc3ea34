"""The storage shim (dst/block/faults.py) through real servers and the dst client.

Each fault reaches the client as the errno a sick disk would give, and the server goes on
serving; power loss (SIGKILL, then :func:`power_loss`) keeps every write dst made stable and
drops only what it never promised; a real full filesystem (tmpfs in a private mount
namespace) answers ENOSPC and keeps serving reads.

When does dst acknowledge a write?  ``FileStore``: a plain WRITE is answered once ``pwritev``
put it in the page cache; FUA adds an ``fdatasync`` before the answer, FLUSH is one (group
commit).  So a plain write is acknowledged but not yet stable until the next FLUSH — like any
disk with a volatile write cache (DESIGN: FLUSH means everything acknowledged before it is
stable) — and those are the writes a power loss may take.
"""

from __future__ import annotations

import errno
import random
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dst import chaos
from dst.block import Bio, BioFlags, FileStore, Op
from dst.block.faults import FAULTS_ENV, FaultSpec, FaultyStore, power_loss, write_spec
from dst.client import open_remote
from dst.client.remote import RemoteVolume
from dst.errors import BlockError, ConfigError
from dst.net.endpoints import Address
from tests.integration.harness import (
    ServerProcess,
    free_port,
    pair_processes,
    running_server,
    same_files,
    server_process,
    wait_in_sync,
)

KiB, MiB = 1 << 10, 1 << 20
#: Longer than the shim's spec check interval (50 ms): a switched spec is in force after it.
SWITCH_S = 0.15


@asynccontextmanager
async def faulty_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **spec: object
) -> AsyncIterator[tuple[Path, Address]]:
    """An in-process server whose volume sits on the shim; yields (spec path, address)."""
    spec_path = tmp_path / "faults.json"
    write_spec(spec_path, **spec)
    monkeypatch.setenv(FAULTS_ENV, str(spec_path))
    async with running_server(tmp_path / "data") as server:
        assert server.listen_address is not None
        yield spec_path, server.listen_address


async def write(
    vol: RemoteVolume,
    offset: int,
    data: bytes,
    flags: BioFlags = BioFlags.NONE,
) -> None:
    await vol.submit(Bio.from_buffer(Op.WRITE, offset, data, flags=flags))


async def read(vol: RemoteVolume, offset: int, length: int) -> bytes:
    out = bytearray(length)
    await vol.submit(Bio.from_buffer(Op.READ, offset, out))
    return bytes(out)


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize(("fault", "code"), [("eio_write", errno.EIO), ("enospc", errno.ENOSPC)])
async def test_failed_write_reaches_the_client_and_the_server_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, code: int
) -> None:
    spec = {"eio_write": [[MiB, 4 * KiB]]} if fault == "eio_write" else {"enospc_write": True}
    rng = random.Random(1)
    async with faulty_server(tmp_path, monkeypatch, **spec) as (spec_path, address):
        async with open_remote(address, "vol0") as vol, open_remote(address, "vol0") as other:
            data = rng.randbytes(8 * KiB)
            with pytest.raises(BlockError) as info:
                await write(vol, MiB, data)
            assert info.value.errno == code
            assert await read(other, MiB, len(data)) == bytes(len(data))  # nothing landed
            if fault == "eio_write":  # a bad range only: the rest of the disk works
                await write(vol, 2 * MiB, data)
                assert await read(other, 2 * MiB, len(data)) == data
            write_spec(spec_path)  # faults off, server still the same process
            await trio.sleep(SWITCH_S)
            await write(vol, MiB, data)
            assert await read(other, MiB, len(data)) == data


async def test_eio_read_is_an_error_never_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(2).randbytes(64 * KiB)
    async with faulty_server(tmp_path, monkeypatch) as (spec_path, address):
        async with open_remote(address, "vol0") as vol:
            await write(vol, 3 * MiB, data, BioFlags.FUA)
            write_spec(spec_path, eio_read=[[3 * MiB + 8 * KiB, 512]])
            await trio.sleep(SWITCH_S)
            for offset, length in [(3 * MiB, 64 * KiB), (3 * MiB + 8 * KiB, 512)]:
                with pytest.raises(BlockError) as info:
                    await read(vol, offset, length)
                assert info.value.errno == errno.EIO
            # Around the bad sector everything reads, and reads right.
            assert await read(vol, 3 * MiB, 8 * KiB) == data[: 8 * KiB]
            assert await read(vol, 3 * MiB + 9 * KiB, 4 * KiB) == data[9 * KiB : 13 * KiB]


async def test_eio_flush_fails_flush_and_fua(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(3).randbytes(4 * KiB)
    async with faulty_server(tmp_path, monkeypatch, eio_flush=True) as (spec_path, address):
        async with open_remote(address, "vol0") as vol:
            await write(vol, 0, data)  # a plain write needs no sync: fine
            fua = Bio.from_buffer(Op.WRITE, 0, data, flags=BioFlags.FUA)
            for bio in (Bio(Op.FLUSH, 0, 0), fua):
                with pytest.raises(BlockError) as info:
                    await vol.submit(bio)
                assert info.value.errno == errno.EIO
            write_spec(spec_path)
            await trio.sleep(SWITCH_S)
            await vol.submit(Bio(Op.FLUSH, 0, 0))


async def test_slow_flush_is_observable_and_writes_stay_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with faulty_server(tmp_path, monkeypatch, slow_flush_s=0.5) as (_, address):
        async with open_remote(address, "vol0") as vol:
            start = trio.current_time()
            await write(vol, 0, bytes(4 * KiB))
            wrote = trio.current_time() - start
            start = trio.current_time()
            await vol.submit(Bio(Op.FLUSH, 0, 0))
            flushed = trio.current_time() - start
    print(f"write {wrote * 1000:.0f} ms, flush {flushed * 1000:.0f} ms (slow_flush_s=0.5)")
    assert flushed >= 0.5 and wrote < 0.4


def start_with_journal(sp: ServerProcess, tmp_path: Path, name: str) -> Path:
    spec, journal = tmp_path / f"{name}.faults.json", tmp_path / f"{name}.undo"
    write_spec(spec, journal=str(journal))
    sp.env[FAULTS_ENV] = str(spec)
    sp.start()
    return journal


async def test_power_loss_keeps_what_was_synced_and_drops_the_rest(tmp_path: Path) -> None:
    rng = random.Random(4)
    a, b, c, d = (rng.randbytes(n) for n in (64 * KiB, 128 * KiB, 64 * KiB, 32 * KiB))
    with server_process(tmp_path) as sp:
        journal = start_with_journal(sp, tmp_path, "server")
        async with open_remote(sp.address, "vol0") as vol:
            await write(vol, 0, a, BioFlags.FUA)  # stable when acknowledged
            await write(vol, MiB, b)
            await vol.submit(Bio(Op.FLUSH, 0, 0))  # b stable
            await write(vol, MiB + 64 * KiB, c)  # acknowledged, not stable: over b's 2nd half
            await write(vol, 4 * MiB, d)  # acknowledged, not stable
            assert await read(vol, MiB, 128 * KiB) == b[: 64 * KiB] + c
        sp.kill()
        img = sp.data_dir / "vol0.img"
        assert file_bytes(img, MiB + 64 * KiB, len(c)) == c  # the page cache survived SIGKILL
        report = power_loss(img, journal)
        print(report)
        assert report.writes_rolled_back == 2
        assert report.bytes_rolled_back == len(c) + len(d)
        assert report.torn_writes == 0
        assert file_bytes(img, 0, len(a)) == a
        assert file_bytes(img, MiB, len(b)) == b  # c undone: b's own bytes, not zeros
        assert file_bytes(img, 4 * MiB, len(d)) == bytes(len(d))
        sp.env.clear()
        sp.start()  # the restarted server serves exactly what survived
        async with open_remote(sp.address, "vol0") as vol:
            assert await read(vol, MiB, len(b)) == b


async def test_power_loss_with_torn_writes(tmp_path: Path) -> None:
    rng = random.Random(5)
    synced = rng.randbytes(32 * KiB)
    unsynced = {i * 256 * KiB: rng.randbytes(64 * KiB) for i in range(1, 17)}
    with server_process(tmp_path) as sp:
        journal = start_with_journal(sp, tmp_path, "server")
        async with open_remote(sp.address, "vol0") as vol:
            await write(vol, 0, synced, BioFlags.FUA)
            async with trio.open_nursery() as nursery:  # many in flight at once
                for offset, data in unsynced.items():
                    nursery.start_soon(write, vol, offset, data)
        sp.kill()
        img = sp.data_dir / "vol0.img"
        report = power_loss(img, journal, torn_seed=11)
    print(report)
    assert file_bytes(img, 0, len(synced)) == synced
    torn = 0
    for offset, data in unsynced.items():
        now = file_bytes(img, offset, len(data))
        kept = next(k for k in range(0, len(data) + 1, 512) if now[k:] == bytes(len(data) - k))
        assert now[:kept] == data[:kept], f"write at {offset}: not a prefix of the new data"
        assert kept < len(data)  # never fully kept: it was not synced
        torn += kept > 0
    assert report.writes_rolled_back == len(unsynced)
    assert report.torn_writes == torn > 0  # seed 11 tears some, not all
    assert torn < len(unsynced)


async def test_power_loss_on_the_secondary_then_resync(tmp_path: Path) -> None:
    """Protocol C acknowledged the unflushed writes as done on both; the secondary's power
    cut takes them from it.  The primary must resync them when the secondary is back —
    even though no FLUSH failed in between (the secondary returns before the next one)."""
    rng = random.Random(6)
    flushed = {i * 128 * KiB: rng.randbytes(32 * KiB) for i in range(8)}
    unflushed = {4 * MiB + i * 128 * KiB: rng.randbytes(32 * KiB) for i in range(8)}
    with pair_processes(tmp_path) as (primary, secondary):
        journal = start_with_journal(secondary, tmp_path, "secondary")
        primary.start()
        await wait_in_sync(primary.address)
        async with open_remote(primary.address, "vol0") as vol:
            for offset, data in flushed.items():
                await write(vol, offset, data)
            await vol.submit(Bio(Op.FLUSH, 0, 0))  # stable on both (protocol C)
            for offset, data in unflushed.items():
                await write(vol, offset, data)  # acknowledged: done on both, stable on neither
        secondary.kill()
        sec_img = secondary.data_dir / "vol0.img"
        report = power_loss(sec_img, journal)
        print(report)
        assert report.writes_rolled_back == len(unflushed)
        assert all(file_bytes(sec_img, o, len(d)) == bytes(len(d)) for o, d in unflushed.items())
        secondary.env.clear()
        secondary.start()
        await wait_in_sync(primary.address)
        with trio.fail_after(20):  # the resync is on its way: wait until the files agree
            while not same_files(primary.data_dir / "vol0.img", sec_img):
                await trio.sleep(0.2)
        for img in (primary.data_dir / "vol0.img", sec_img):
            for offset, data in (flushed | unflushed).items():
                assert file_bytes(img, offset, len(data)) == data


async def test_real_enospc_from_a_small_tmpfs(tmp_path: Path) -> None:
    """The data dir is a 4 MiB tmpfs in the server's own mount namespace (gone with it)."""
    data_dir = tmp_path / "small"
    data_dir.mkdir()
    sp = ServerProcess(data_dir, free_port(), "vol0=16M", tmp_path / "server.log")
    mount = 'mount -t tmpfs -o size=4M tmpfs "$0" && exec "$@"'
    sp.prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(data_dir)]
    rng = random.Random(7)
    try:
        sp.start()
        async with open_remote(sp.address, "vol0") as vol, open_remote(sp.address, "vol0") as other:
            written: dict[int, bytes] = {}
            failure: BlockError | None = None
            for offset in range(0, 16 * MiB, 256 * KiB):
                data = rng.randbytes(256 * KiB)
                try:
                    await write(vol, offset, data)
                except BlockError as exc:
                    failure = exc
                    break
                written[offset] = data
            assert failure is not None and failure.errno == errno.ENOSPC, failure
            assert 2 * MiB <= len(written) * 256 * KiB <= 4 * MiB
            for offset, data in written.items():  # reads still served, to both clients
                assert await read(other, offset, len(data)) == data
            # Freeing space (TRIM punches a hole in tmpfs) makes writes work again.
            await vol.submit(Bio(Op.TRIM, 0, MiB))
            await write(vol, 0, written[0])
            assert await read(other, 0, 256 * KiB) == written[0]
        assert sp.proc is not None and sp.proc.poll() is None
    finally:
        sp.stop()
    assert not any(data_dir.iterdir())  # the tmpfs was private to the server's namespace
    assert sp.proc is not None and sp.proc.returncode == -signal.SIGKILL


def test_spec_errors_name_the_key() -> None:
    for bad, key in [
        ({"eio_read": [[0]]}, "eio_read"),
        ({"eio_flush": 1}, "eio_flush"),
        ({"slow_flush_s": -1}, "slow_flush_s"),
        ({"eio_raed": []}, "eio_raed"),
    ]:
        with pytest.raises(ConfigError, match=key):
            FaultSpec.from_json(bad)


@pytest.mark.parametrize("broken", [False, True])
async def test_journal_follows_real_syncs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: bool
) -> None:
    """A FLUSH marks writes stable only if an fdatasync ran: under the broken build
    skip-fsync the "flushed" write is rolled back by a power loss — the shim has teeth."""
    if broken:
        monkeypatch.setattr(chaos, "BROKEN", True)
        monkeypatch.setattr(chaos, "_BROKEN", frozenset({"skip-fsync"}))
    spec, journal, img = tmp_path / "spec.json", tmp_path / "undo", tmp_path / "vol.img"
    write_spec(spec, journal=str(journal))
    store = FaultyStore(FileStore.open(img, 4 * MiB), str(img), str(spec))
    data = random.Random(8).randbytes(8 * KiB)
    try:
        await store.submit(Bio.from_buffer(Op.WRITE, 0, data))
        await store.submit(Bio(Op.FLUSH, 0, 0))
        await store.submit(Bio.from_buffer(Op.WRITE, MiB, data))  # never flushed
    finally:
        await store.aclose()
    report = power_loss(img, journal)
    assert file_bytes(img, MiB, len(data)) == bytes(len(data))
    assert file_bytes(img, 0, len(data)) == (bytes(len(data)) if broken else data)
    assert report.writes_rolled_back == (2 if broken else 1)


async def test_broken_build_eio_as_zeros_answers_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teeth of the real build's EIO test: with the bug planted, the same bad sector
    reads back as zeros and success — exactly what test_eio_read_is_an_error_never_zeros
    refuses."""
    monkeypatch.setattr(chaos, "BROKEN", True)
    monkeypatch.setattr(chaos, "_BROKEN", frozenset({"eio-as-zeros"}))
    data = random.Random(9).randbytes(4 * KiB)
    async with faulty_server(tmp_path, monkeypatch) as (spec_path, address):
        async with open_remote(address, "vol0") as vol:
            await write(vol, 0, data, BioFlags.FUA)
            write_spec(spec_path, eio_read=[[0, 512]])
            await trio.sleep(SWITCH_S)
            assert await read(vol, 0, len(data)) == bytes(len(data))
