"""`--resync-rate`: the cap DRBD users set with resync-rate, applied by a real `dst serve`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dst.admin import fetch_status
from dst.block import Bio, BioFlags, Op
from dst.client import open_remote
from tests.integration.harness import pair_processes, same_files, wait_in_sync

EXTENT = 64 * 1024  # the dirty bitmap's extent
RATE = 1 << 20


async def test_a_resync_copies_no_faster_than_the_rate_it_was_given(tmp_path: Path) -> None:
    """4 MiB out of sync at 1 MiB/s takes at least ~3.5 s (one parallel batch may start at
    once).  A lower bound only: a slow machine makes it longer, never shorter."""
    with pair_processes(tmp_path) as (primary, secondary):
        primary.argv += ["--resync-rate", "1M"]
        secondary.start()
        primary.start()
        await wait_in_sync(primary.address)
        secondary.kill(signal.SIGTERM)
        async with open_remote(primary.address, "vol0") as vol:
            for i in range(64):  # one 4 KiB write in each of 64 extents: 4 MiB dirty
                data = bytes([i + 1]) * 4096
                await vol.submit(Bio.from_buffer(Op.WRITE, i * EXTENT, data, flags=BioFlags.FUA))
        doc = (await fetch_status(primary.address, None))["volumes"]["vol0"]
        assert doc["out_of_sync_bytes"] == 64 * EXTENT
        secondary.start()
        started = time.monotonic()
        doc = (await wait_in_sync(primary.address))["volumes"]["vol0"]
        elapsed = time.monotonic() - started
        assert elapsed >= (64 * EXTENT - 8 * EXTENT) / RATE, elapsed
        assert doc["resync"]["total_bytes"] == 64 * EXTENT
        assert same_files(primary.data_dir / "vol0.img", secondary.data_dir / "vol0.img")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--resync-rate", v) for v in ("0", "1K", "fast", "-5M")]
    + [("--max-bytes", "fast"), ("--page-size", "4Q")],
)
def test_a_bad_size_is_one_line_naming_the_flag(flag: str, value: str) -> None:
    argv = [sys.executable, "-m", "dst", "serve", "--data", "x", "--volume", "v=1M"]
    result = subprocess.run([*argv, "--insecure", flag, value], capture_output=True, check=False)
    err = result.stderr.decode()
    assert result.returncode == 2 and f"argument {flag}:" in err and "Traceback" not in err
