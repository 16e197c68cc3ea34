"""The bridge's started path: over a StartingLayer (a bridge to one server: Handoff over a
RemoteVolume) a READ or WRITE takes no task; the reader starts it, its completion callback
queues the reply and one task answers.  The bounds and answers the task path keeps
(tests/integration/test_nbd_bridge.py) must hold here too, and the real stack must take it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from dst.block import Bio, BlockLayer, Limits, MemoryStore, Op
from dst.client import open_remote
from dst.errors import BlockError
from dst.fence.handoff import Handoff
from dst.nbd import bridge as nbd_bridge
from dst.nbd.bridge import MAX_INFLIGHT, NbdExport
from dst.nbd.protocol import Command
from dst.nbd.transmission import Request
from tests.integration.harness import running_server
from tests.integration.test_nbd_bridge import (
    STEP_S,
    Failing,
    RawClient,
    Watch,
    bridge,
    close_raw_clients,  # noqa: F401 (an autouse fixture: every RawClient is closed)
    nbdsh,
)

MiB = 1 << 20


class _Done:
    """A Pending: the outcome of one started bio."""

    def __init__(self) -> None:
        self.error: BlockError | None = None
        self.finished = False
        self.callbacks: list[Callable[[], None]] = []

    def then(self, callback: Callable[[], None]) -> None:
        if self.finished:
            callback()
        else:
            self.callbacks.append(callback)

    def finish(self) -> None:
        self.finished = True
        for callback in self.callbacks:
            callback()


class Starting:
    """A StartingLayer over any layer: each started bio runs in a task of the test's nursery
    and calls back — the shape RemoteVolume has, around the test layers that gate or fail."""

    can_start = True

    def __init__(self, below: BlockLayer, nursery: trio.Nursery) -> None:
        self.below, self.nursery = below, nursery

    @property
    def limits(self) -> Limits:
        return self.below.limits

    @property
    def size(self) -> int:
        return self.below.size

    async def submit(self, bio: Bio) -> None:
        await self.below.submit(bio)

    async def start(self, bio: Bio) -> _Done:
        done = _Done()

        async def run() -> None:
            try:
                await self.below.submit(bio)
            except BlockError as exc:
                done.error = exc
            done.finish()

        self.nursery.start_soon(run)
        return done

    async def aclose(self) -> None:
        await self.below.aclose()


@pytest.fixture
def tasks_counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The commands of the requests the bridge ran as a task each (the task path)."""
    commands: list[int] = []
    execute = nbd_bridge._Connection._execute

    async def counted(self: nbd_bridge._Connection, req: Request, *args: object) -> None:
        commands.append(req.command)
        await execute(self, req, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(nbd_bridge._Connection, "_execute", counted)
    return commands


async def test_started_requests_keep_the_slot_cap(tasks_counted: list[int]) -> None:
    watch = Watch(MemoryStore(4 * MiB), gate=trio.Event())
    script = """
bufs = [nbd.Buffer.from_bytearray(bytearray([i % 251]) * 4096) for i in range(256)]
for i, buf in enumerate(bufs):
    h.aio_pwrite(buf, i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
bad = [i for i in range(256) if h.pread(4096, i * 4096) != bytes([i % 251]) * 4096]
print("bad", bad)
"""
    async with trio.open_nursery() as below:
        export = NbdExport("vol0", Starting(watch, below))
        async with bridge(export) as address, trio.open_nursery() as nursery:

            async def client() -> None:
                assert "bad []" in await nbdsh(address, script)

            nursery.start_soon(client)
            with trio.fail_after(STEP_S * 3):
                while watch.now_bios < MAX_INFLIGHT:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert watch.now_bios == MAX_INFLIGHT  # the 65th request waits for a slot
            assert watch.gate is not None
            watch.gate.set()
    assert watch.max_bios == MAX_INFLIGHT and watch.seen == 512
    assert Command.READ not in tasks_counted and Command.WRITE not in tasks_counted


async def test_started_replies_leave_in_completion_order() -> None:
    slow = trio.Event()

    class SlowAtZero(MemoryStore):
        async def submit(self, bio: Bio) -> None:
            if bio.op is Op.READ and bio.offset == 0:
                await slow.wait()
            await super().submit(bio)

    async with trio.open_nursery() as below:
        async with bridge(NbdExport("vol0", Starting(SlowAtZero(MiB), below))) as address:
            client = await RawClient.connect(address)
            await client.go()
            await client.request(Command.READ, 0, 512, handle=1)
            await client.request(Command.WRITE, 8192, 512, handle=2)
            await client.send(b"w" * 512)
            assert await client.simple_reply() == (0, 2)
            await client.request(Command.READ, 8192, 512, handle=3)
            assert await client.simple_reply() == (0, 3)
            assert await client.recv(512) == b"w" * 512
            slow.set()
            assert await client.simple_reply() == (0, 1)
            await client.recv(512)
            await client.request(Command.DISC)
            assert await client.until_closed() == b""


async def test_started_errors_are_answered_and_the_connection_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = """
try:
    h.pread(512, 1024 * 1024)
except nbd.Error as e:
    print("errno", e.errno)
print("after", h.pread(512, 0) == bytes(512))
"""
    async with trio.open_nursery() as below:
        async with bridge(NbdExport("vol0", Starting(Failing(4 * MiB), below))) as address:
            out = await nbdsh(address, script)
    assert "errno EIO" in out and "after True" in out
    failed = [r.getMessage() for r in caplog.records if "event=request_failed" in r.getMessage()]
    assert len(failed) == 1 and "the disk said no" in failed[0]


async def test_a_connection_dropped_with_started_requests_waits_for_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dst.nbd")
    watch = Watch(MemoryStore(4 * MiB), gate=trio.Event())
    async with trio.open_nursery() as below:
        async with bridge(NbdExport("vol0", Starting(watch, below))) as address:
            client = await RawClient.connect(address)
            await client.go()
            for handle in range(8):
                await client.request(Command.READ, handle * MiB // 2, MiB // 2, handle=handle)
            with trio.fail_after(STEP_S):
                while watch.now_bios < 8:
                    await trio.sleep(0.01)
            await client.aclose()
            await trio.sleep(0.2)

            def disconnects() -> list[str]:
                lines = [r.getMessage() for r in caplog.records]
                return [line for line in lines if "event=disconnect" in line]

            assert disconnects() == []  # its buffers are still below: it waits for them
            assert watch.gate is not None
            watch.gate.set()
            with trio.fail_after(STEP_S):
                while not disconnects():
                    await trio.sleep(0.01)
            assert "requests=8" in disconnects()[0]
            assert "after True" in await nbdsh(
                address, 'print("after", h.pread(4096, 0) == bytes(4096))'
            )


async def test_a_bridge_to_a_server_starts_reads_and_writes(
    tmp_path: Path, tasks_counted: list[int]
) -> None:
    # The real stack of `dst nbd --server`: Handoff over a RemoteVolume to a server.
    script = """
import os
data = [os.urandom(65536) for _ in range(128)]
for i, d in enumerate(data):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), i * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
print("bad", [i for i in range(128) if h.pread(65536, i * 65536) != data[i]])
"""
    async with running_server(tmp_path) as server:
        assert server.listen_address is not None
        async with open_remote(server.listen_address, "vol0", role="bridge", claim="own") as remote:
            handoff = Handoff(remote, "vol0")
            async with bridge(NbdExport("vol0", handoff)) as address:
                assert "bad []" in await nbdsh(address, script)
                assert await handoff.release(timeout_s=STEP_S)
                refused = await nbdsh(
                    address,
                    """
try:
    h.pread(512, 0)
except nbd.Error as e:
    print("errno", e.errno)
""",
                )
    assert "errno ESHUTDOWN" in refused
    assert tasks_counted == [Command.FLUSH]  # every READ and WRITE was started
