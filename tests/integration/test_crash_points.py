"""Crash points in real `dst serve` processes: the kill lands where the name says."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from dst.block import Bio, Op
from dst.client import open_remote
from dst.errors import BlockError
from tests.integration.harness import pair_processes, wait_in_sync

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
