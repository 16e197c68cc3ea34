"""Split brain: detected by generation ids when the two sides meet, never resynced silently,
and resolved by the operator's command (``dst resolve``), which resyncs the loser from the
survivor — the union of both sides' dirty extents, not the whole volume, when the ids allow."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import trio

from dst.admin import fetch_status
from dst.block import Bio, BioFlags, Op
from dst.client import open_remote
from dst.net.endpoints import Address
from tests.integration.harness import (
    ServerProcess,
    free_port,
    pair_processes,
    same_files,
    wait_in_sync,
)
from tests.integration.nbdtools import run, text

MiB = 1 << 20
EXTENT = 64 * 1024  # the dirty bitmap's extent


async def write(address: Address, offset: int, data: bytes) -> None:
    async with open_remote(address, "vol0") as vol:
        await vol.submit(Bio.from_buffer(Op.WRITE, offset, data, flags=BioFlags.FUA))


def block(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(4096)


def restart_as(proc: ServerProcess, role: str) -> None:
    proc.kill(signal.SIGTERM)  # a clean stop: its activity log is empty
    proc.argv[proc.argv.index("--role") + 1] = role
    proc.start()


async def wait_for_status(address: Address, key: str, value: object) -> None:
    with trio.fail_after(20):
        while (await fetch_status(address, None))["volumes"]["vol0"].get(key) != value:
            await trio.sleep(0.1)


async def resolve(survivor: Address) -> str:
    argv = [sys.executable, "-m", "dst", "resolve", "--server", str(survivor), "--volume", "vol0"]
    return text(await run(argv))


async def test_both_sides_wrote_while_apart_is_detected_and_resolved(tmp_path: Path) -> None:
    """A and B in sync; B dies; A writes alone; A dies; B comes back as primary and writes
    alone.  When A returns as B's secondary, B's handshake finds both moved on from one
    generation: split brain.  Nothing is copied until `dst resolve` names B the survivor;
    then only the extents either side wrote are resynced, and A's write is gone."""
    with pair_processes(tmp_path) as (a, b):
        b.start()
        a.start()
        await write(a.address, 0, b"0" * 4096)  # connected: on both, a shared generation
        await wait_in_sync(a.address)
        b.kill(signal.SIGTERM)
        await write(a.address, 5 * EXTENT, b"A" * 4096)  # degraded: A's data generation
        a.kill(signal.SIGTERM)
        restart_as(b, "primary")
        await write(b.address, 9 * EXTENT, b"B" * 4096)  # degraded: B's data generation
        restart_as(a, "secondary")

        await wait_for_status(b.address, "connection", "split-brain")
        doc = (await fetch_status(b.address, None))["volumes"]["vol0"]
        assert "split brain" in doc["handshake"] and "rule 90" in doc["handshake"]
        assert re.search(r"event=split_brain decision=split-brain", b.log_path.read_text())
        # never resynced silently: each side still holds its own write
        assert block(a.data_dir / "vol0.img", 5 * EXTENT) == b"A" * 4096
        assert block(b.data_dir / "vol0.img", 5 * EXTENT) == bytes(4096)
        assert block(a.data_dir / "vol0.img", 9 * EXTENT) == bytes(4096)

        assert "survives" in await resolve(b.address)
        doc = (await wait_in_sync(b.address))["volumes"]["vol0"]
        assert doc["split_brain"] is False
        # the union of both bitmaps: A's extent and B's, not the volume
        assert doc["resync"]["total_bytes"] == 2 * EXTENT
        assert same_files(a.data_dir / "vol0.img", b.data_dir / "vol0.img")
        assert block(a.data_dir / "vol0.img", 5 * EXTENT) == bytes(4096)  # the loser's write
        assert block(a.data_dir / "vol0.img", 9 * EXTENT) == b"B" * 4096
        assert block(a.data_dir / "vol0.img", 0) == b"0" * 4096


async def test_resolve_refuses_a_server_that_is_not_primary(tmp_path: Path) -> None:
    with pair_processes(tmp_path) as (a, b):
        b.start()
        a.start()
        argv = [sys.executable, "-m", "dst", "resolve", "--server", str(b.address)]
        result = await run([*argv, "--volume", "vol0"], check=False)
        assert result.returncode != 0 and "not primary here" in text(result)


async def test_two_primaries_refuse_each_other_then_resolve(tmp_path: Path) -> None:
    """A former primary restarted as primary after a failover must not overwrite the new
    primary's writes: each refuses the other's link (EBUSY, logged) and goes on alone.
    Restarted as secondary, the generation ids show the split brain; the operator keeps B."""
    pa, pb = free_port(), free_port()
    a, b = (
        ServerProcess(
            tmp_path / name,
            port,
            "vol0=64M",
            tmp_path / f"{name}.log",
            "--peer",
            f"127.0.0.1:{other}",
            "--role",
            "primary",
        )
        for name, port, other in (("a", pa, pb), ("b", pb, pa))
    )
    try:
        a.start()
        b.start()
        await write(a.address, 0, b"A" * 4096)
        await write(b.address, 0, b"B" * 4096)
        with trio.fail_after(10):
            while not all("split_brain_suspected" in p.log_path.read_text() for p in (a, b)):
                await trio.sleep(0.1)
        for proc in (a, b):
            doc = await fetch_status(proc.address, None)
            assert doc["volumes"]["vol0"]["connection"] == "disconnected"
        assert block(a.data_dir / "vol0.img", 0) == b"A" * 4096
        assert block(b.data_dir / "vol0.img", 0) == b"B" * 4096

        restart_as(a, "secondary")
        await wait_for_status(b.address, "connection", "split-brain")
        assert block(a.data_dir / "vol0.img", 0) == b"A" * 4096  # still untouched
        await resolve(b.address)
        doc = (await wait_in_sync(b.address))["volumes"]["vol0"]
        # both diverged from a new volume, which every new disk shares: the whole volume
        assert doc["resync"]["total_bytes"] == 64 * MiB
        assert same_files(a.data_dir / "vol0.img", b.data_dir / "vol0.img")
    finally:
        a.stop()
        b.stop()


async def test_promote_refuses_while_the_primary_may_still_be_alive(tmp_path: Path) -> None:
    """Invariant 9: a split brain never acknowledges writes on both sides unless the operator
    forces it.  The primary hangs (SIGSTOP; its listening socket still accepts) and the
    secondary restarts, so no replication link is left to say "busy": promote still
    refuses, because the primary's port answers.  Killed, the port refuses: promote works."""
    with pair_processes(tmp_path) as (a, b):
        b.start()
        a.start()
        await wait_in_sync(a.address)
        a.kill(signal.SIGSTOP)
        restart_as(b, "secondary")
        argv = [sys.executable, "-m", "dst", "promote", "--server", str(b.address)]
        argv += ["--volume", "vol0"]
        refused = await run(argv, check=False)
        assert refused.returncode != 0
        assert "EBUSY" in text(refused) and f"{a.address} accepts connections" in text(refused)
        assert (await fetch_status(b.address, None))["role"] == "secondary"
        a.kill(signal.SIGKILL)
        await run(argv)  # the port refuses now: the primary is down
        assert (await fetch_status(b.address, None))["role"] == "primary"
