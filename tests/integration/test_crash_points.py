"""Crash points in real `dst serve` processes: the kill lands where the name says."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import trio

from dst.block import Bio, Op
from dst.client import open_remote
from dst.errors import BlockError
from tests.integration.harness import (
    ServerProcess,
    pair_processes,
    server_process,
    wait_in_sync,
)

OFFSET = 1 << 20
DATA = bytes(range(256)) * 16  # 4 KiB, no zeros run as long as a sector


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def test_primary_dies_after_local_write_and_the_client_gets_no_ack(tmp_path: Path) -> None:
    with pair_processes(tmp_path) as (primary, secondary):
        primary.env["DST_CRASH_AT"] = "primary.after-local-write"
        secondary.start()
        primary.start()
        await wait_in_sync(primary.address)
        outcome = "no answer"
        with trio.move_on_after(20):
            async with open_remote(
                primary.address, "vol0", max_retries=2, must_connect=True
            ) as vol:
                try:
                    await vol.submit(Bio.from_buffer(Op.WRITE, OFFSET, DATA))
                    outcome = "acknowledged"
                except BlockError as exc:
                    outcome = f"error {exc}"
        print("client outcome:", outcome)
        assert outcome != "acknowledged"
        assert primary.proc is not None
        assert primary.proc.wait(10) == -signal.SIGKILL
        assert "dst: crash point primary.after-local-write hit" in primary.log_path.read_text()
        # Where it died: the write is in the primary's file (page cache survives SIGKILL),
        # and was never sent to the secondary.
        assert read_at(primary.data_dir / "vol0.img", OFFSET, len(DATA)) == DATA
        assert read_at(secondary.data_dir / "vol0.img", OFFSET, len(DATA)) == bytes(len(DATA))
        assert secondary.proc is not None and secondary.proc.poll() is None


def died_at(process: ServerProcess, point: str) -> bool:
    assert process.proc is not None
    code = process.proc.wait(15)
    said = f"dst: crash point {point} hit" in process.log_path.read_text()
    return code == -signal.SIGKILL and said


async def test_secondary_dies_with_the_write_applied_not_answered(tmp_path: Path) -> None:
    with pair_processes(tmp_path) as (primary, secondary):
        secondary.env["DST_CRASH_AT"] = "secondary.after-write-before-fsync"
        secondary.start()
        primary.start()
        await wait_in_sync(primary.address)
        with trio.fail_after(30):
            async with open_remote(primary.address, "vol0") as vol:
                # The primary goes on degraded: the write is acknowledged from its side.
                await vol.submit(Bio.from_buffer(Op.WRITE, OFFSET, DATA))
        assert died_at(secondary, "secondary.after-write-before-fsync")
        assert read_at(secondary.data_dir / "vol0.img", OFFSET, len(DATA)) == DATA


async def test_primary_dies_with_the_peer_ack_in_hand(tmp_path: Path) -> None:
    with pair_processes(tmp_path) as (primary, secondary):
        primary.env["DST_CRASH_AT"] = "primary.after-peer-ack"
        secondary.start()
        primary.start()
        await wait_in_sync(primary.address)
        acknowledged = False
        with trio.move_on_after(20):
            async with open_remote(primary.address, "vol0", max_retries=2) as vol:
                try:
                    await vol.submit(Bio.from_buffer(Op.WRITE, OFFSET, DATA))
                    acknowledged = True
                except BlockError:
                    pass
        assert not acknowledged
        assert died_at(primary, "primary.after-peer-ack")
        for process in (primary, secondary):  # on both sides, answered to nobody
            assert read_at(process.data_dir / "vol0.img", OFFSET, len(DATA)) == DATA


async def test_resync_source_dies_mid_resync(tmp_path: Path) -> None:
    with pair_processes(tmp_path) as (primary, secondary):
        primary.env["DST_CRASH_AT"] = "resync.mid"
        primary.start()  # alone: its writes go to the bitmap
        with trio.fail_after(30):
            async with open_remote(primary.address, "vol0") as vol:
                for i in range(4):
                    await vol.submit(Bio.from_buffer(Op.WRITE, i * OFFSET, DATA))
        secondary.start()
        assert died_at(primary, "resync.mid")


async def test_takeover_dies_after_persisting_the_epoch(tmp_path: Path) -> None:
    with server_process(tmp_path) as server:
        server.env["DST_CRASH_AT"] = "takeover.mid"
        server.start()
        refused = (BlockError, OSError, trio.BrokenResourceError)
        with trio.move_on_after(20), contextlib.suppress(*refused):
            async with open_remote(server.address, "vol0", claim="own", max_retries=1):
                raise AssertionError("the claim was answered")
        assert died_at(server, "takeover.mid")
        meta = json.loads((server.data_dir / "vol0.meta.json").read_text())
        assert meta["epoch"] == 2  # persisted before the kill
