"""Running real NBD clients (nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io, nbdfuse) from tests:
each one a separate process with a timeout, its output captured for the assertion message."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import trio

# nbdsh imports Debian's python3-libnbd, which belongs to /usr/bin/python3 (TESTING.md).
DEBIAN_ENV = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


async def run(
    argv: Sequence[str], *, timeout_s: float = 120, check: bool = True, debian: bool = False
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout_s):
        result = await trio.run_process(
            list(argv),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=DEBIAN_ENV if debian else None,
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout: {result.stdout.decode(errors='replace')[-2000:]}\n"
            f"stderr: {result.stderr.decode(errors='replace')[-2000:]}"
        )
    return result


def text(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
