"""A server SIGKILLed and restarted under a write load: the client's user sees no error, and
every acknowledged write is there afterwards (the server fsyncs before acknowledging FUA;
what the test checks after the restart is what the client last wrote to each block)."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import trio

from dst.block import Bio, BioFlags, Op
from dst.client import open_remote
from tests.integration.harness import server_process

BLOCK = 64 * 1024
BLOCKS = 256  # 16 MiB working set


async def test_server_killed_and_restarted_during_writes(tmp_path: Path) -> None:
    rng = random.Random(7)
    with server_process(tmp_path, "vol0=64M") as sp:
        sp.start()
        last: dict[int, bytes] = {}
        done = 0
        stop = trio.Event()
        async with open_remote(sp.address, "vol0", keepalive_s=0.5, dead_after_s=3) as vol:

            async def writer(worker: int) -> None:
                nonlocal done
                i = 0
                while not stop.is_set():
                    i += 1
                    block = rng.randrange(BLOCKS)
                    if block % 4 != worker:  # each worker owns its blocks: no write races
                        block = block - block % 4 + worker
                    data = rng.randbytes(BLOCK)
                    flags = BioFlags.FUA if i % 3 == 0 else BioFlags.NONE
                    await vol.submit(Bio.from_buffer(Op.WRITE, block * BLOCK, data, flags=flags))
                    last[block] = data
                    done += 1

            async def chaos() -> None:
                for _ in range(3):
                    # Kill only once the client writes to this server: 40 writes answered
                    # since it started (reconnects counts links lost, and a kill landing
                    # before the client is back would break no link).
                    mark = done
                    while done < mark + 40:
                        await trio.sleep(0.01)
                    sp.kill(signal.SIGKILL)
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(sp.start)
                while vol.stats.reconnects < 3:
                    await trio.sleep(0.01)
                await trio.sleep(0.3)
                stop.set()

            async with trio.open_nursery() as nursery:
                for w in range(4):
                    nursery.start_soon(writer, w)
                nursery.start_soon(chaos)
            assert done > 100
            assert vol.stats.failed == 0
            assert vol.stats.reconnects >= 3
            assert vol.stats.resent >= 1
            await vol.submit(Bio(Op.FLUSH, 0, 0))
            for block, data in last.items():
                out = bytearray(BLOCK)
                await vol.submit(Bio.from_buffer(Op.READ, block * BLOCK, out))
                assert out == data, block
        # and the bytes are in the file, which is what a restarted server serves
        sp.kill(signal.SIGKILL)
        with open(sp.data_dir / "vol0.img", "rb") as f:
            for block, data in last.items():
                f.seek(block * BLOCK)
                assert f.read(BLOCK) == data


async def test_frozen_server_is_declared_dead_and_io_completes_when_it_resumes(
    tmp_path: Path,
) -> None:
    """SIGSTOP keeps the socket open but silent: only keepalive can notice."""
    with server_process(tmp_path, "vol0=64M") as sp:
        sp.start()
        async with open_remote(sp.address, "vol0", keepalive_s=0.2, dead_after_s=1.0) as vol:
            await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"a" * 4096))
            sp.kill(signal.SIGSTOP)
            finished = trio.Event()

            async def write() -> None:
                await vol.submit(Bio.from_buffer(Op.WRITE, 0, b"b" * 4096, flags=BioFlags.FUA))
                finished.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                with trio.fail_after(10):
                    while vol.stats.reconnects < 1:  # the silent link was given up
                        await trio.sleep(0.05)
                assert not finished.is_set()
                sp.kill(signal.SIGCONT)
            out = bytearray(4096)
            await vol.submit(Bio.from_buffer(Op.READ, 0, out))
            assert out == b"b" * 4096
            assert vol.stats.failed == 0
