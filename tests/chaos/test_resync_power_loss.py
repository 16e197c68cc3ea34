"""Found by the chaos soak (power-loss-secondary, seed 124551738): a secondary that loses
power in the middle of a resync must get again the extents that resync had already copied.

The resync source clears an extent's bit once the target completed the copy — in the
target's page cache, not yet stable; only the pass's final FLUSH makes it so.  A power cut
on the target before that FLUSH took the copies, and the source, its bits cleared, never sent
them again: the replicas differed for good after the next resync "finished".
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from dst.admin import fetch_status
from dst.block import Bio, Op
from dst.block.faults import power_loss
from dst.client import open_remote
from tests.chaos.test_store_faults import start_with_journal
from tests.integration.harness import pair_processes, same_files, wait_in_sync

MiB = 1 << 20


async def test_power_loss_mid_resync_resends_what_the_pass_had_copied(tmp_path: Path) -> None:
    rng = random.Random(9)
    with pair_processes(tmp_path) as (primary, secondary):
        primary.argv += ["--resync-rate", str(4 * MiB)]  # 16 MiB to copy: ~4 s
        journal = start_with_journal(secondary, tmp_path, "secondary")
        primary.start()
        await wait_in_sync(primary.address)
        async with open_remote(primary.address, "vol0") as vol:
            secondary.kill()  # the writes below land on the primary only: 16 MiB dirty
            for i in range(16):
                await vol.submit(Bio.from_buffer(Op.WRITE, i * MiB, rng.randbytes(MiB)))
            await vol.submit(Bio(Op.FLUSH, 0, 0))
            power_loss(secondary.data_dir / "vol0.img", journal)
            secondary.start()
            with trio.fail_after(20):  # let the resync copy a good part, unflushed
                while True:
                    doc = await fetch_status(primary.address, None)
                    resync = doc["volumes"]["vol0"].get("resync") or {}
                    if resync.get("done_bytes", 0) >= 4 * MiB:
                        break
                    await trio.sleep(0.05)
            secondary.kill()  # mid-resync, then its power cut takes the copies
            report = power_loss(secondary.data_dir / "vol0.img", journal)
            assert report.writes_rolled_back > 0
            secondary.start()
            await wait_in_sync(primary.address, timeout_s=60)
        assert same_files(primary.data_dir / "vol0.img", secondary.data_dir / "vol0.img")
