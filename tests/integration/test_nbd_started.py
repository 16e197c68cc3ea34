"""The bridge's started path: over a StartingLayer (a bridge to one server: Handoff over a
RemoteVolume) a READ or WRITE takes no task; the reader starts it, its completion callback
queues the reply and one task answers.  The slot cap, completion order and error answers are
tests/integration/test_nbd_bridge.py's, run on both paths; here, what only this path has.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dst.block import Bio, MemoryStore, Op
from dst.client import open_remote
from dst.client.link import Link
from dst.fence.handoff import Handoff
from dst.mirror import LegState, open_mirror
from dst.nbd import bridge as nbd_bridge
from dst.nbd import protocol as p
from dst.nbd.bridge import NbdExport
from dst.nbd.protocol import Command
from dst.nbd.transmission import Request
from dst.net.framed import Buffer
from dst.net.stream import PASS_MESSAGES
from dst.wire import Message
from tests.integration.harness import running_server
from tests.integration.starting import Starting, TaskSteps
from tests.integration.test_nbd_bridge import (
    STEP_S,
    RawClient,
    Watch,
    bridge,
    close_raw_clients,  # noqa: F401 (an autouse fixture: every RawClient is closed)
    nbdsh,
)

MiB = 1 << 20


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


@asynccontextmanager
async def client_of_a_bridge_to_a_server(tmp_path: Path) -> AsyncIterator[RawClient]:
    """A raw NBD client, past the handshake, of the real stack of `dst nbd --server`:
    Handoff over a RemoteVolume to a server."""
    async with running_server(tmp_path) as server:
        assert server.listen_address is not None
        async with open_remote(server.listen_address, "vol0", role="bridge", claim="own") as remote:
            async with bridge(NbdExport("vol0", Handoff(remote, "vol0"))) as address:
                client = await RawClient.connect(address)
                await client.go()
                yield client


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


async def test_a_mirror_bridge_starts_reads_and_writes_on_both_legs(
    tmp_path: Path, tasks_counted: list[int]
) -> None:
    # The real stack of `dst nbd --mirror`: Handoff over a Mirror over two servers.
    script = """
import random
data = random.Random(7).randbytes(128 * 65536)
piece = [data[i * 65536 : (i + 1) * 65536] for i in range(128)]
for i in range(128):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(piece[i])), i * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
print("bad", [i for i in range(128) if h.pread(65536, i * 65536) != piece[i]])
"""
    volumes = (("vol0", 16 * MiB),)
    async with (
        running_server(tmp_path / "a", volumes, node_id="a") as a,
        running_server(tmp_path / "b", volumes, node_id="b") as b,
    ):
        servers = [s.listen_address for s in (a, b) if s.listen_address is not None]
        async with open_mirror(servers, "vol0", state_dir=tmp_path / "state") as mirror:
            for offset in range(0, 16 * MiB, 4 * MiB):  # activity log extents active on disk
                await mirror.submit(Bio.from_buffer(Op.WRITE, offset, bytes(4096)))
            async with bridge(NbdExport("vol0", Handoff(mirror, "vol0"))) as address:
                assert "bad []" in await nbdsh(address, script)
            assert mirror.started == 256, "every READ and WRITE was started"
            assert [mirror.state(i) for i in range(2)] == [LegState.IN_SYNC] * 2
            expected = random.Random(7).randbytes(128 * 65536)
            for leg in mirror.legs:  # each leg has every write
                buf = bytearray(len(expected))
                await leg.layer.submit(Bio.from_buffer(Op.READ, 0, buf))
                assert buf == expected, f"leg {leg.name} differs"
    assert tasks_counted == [Command.FLUSH]


async def test_a_burst_of_requests_leaves_for_the_server_in_passes_of_eight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reader starts the requests of one receive under its plug and flushes it before it
    # waits for the next, and after every PASS_MESSAGES (8) while more are buffered: the
    # server gets them in gathered writes of 8 — not a send each, and not one convoy of all
    # 16 that it could only start on once the bridge had read the last.
    batches: list[int] = []
    send_many = Link.send_many

    async def counted(self: Link, frames: Sequence[tuple[Message, Sequence[Buffer]]]) -> None:
        batches.append(len(frames))
        await send_many(self, frames)

    monkeypatch.setattr(Link, "send_many", counted)
    async with client_of_a_bridge_to_a_server(tmp_path) as client:
        payloads = [bytes([n]) * 512 for n in range(16)]
        writes = b"".join(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, Command.WRITE, n, n * 512, 512) + data
            for n, data in enumerate(payloads)
        )
        reads = b"".join(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, Command.READ, 100 + n, n * 512, 512)
            for n in range(16)
        )
        batches.clear()
        await client.send(writes)
        assert sorted([await client.simple_reply() for _ in range(16)]) == [
            (0, n) for n in range(16)
        ]
        await client.send(reads)
        got = {}
        for _ in range(16):
            error, handle = await client.simple_reply()
            assert error == 0
            got[handle - 100] = await client.recv(512)
    assert [got[n] for n in range(16)] == payloads
    assert PASS_MESSAGES == 8 and batches == [8, 8, 8, 8]


async def test_at_depth_one_no_reply_waits_for_an_answering_task(tmp_path: Path) -> None:
    # One request at a time: nothing can join a reply's batch, so the server's reader sends
    # an inline answer itself before it waits for the next request, and the bridge sends a
    # started request's reply from the callback that completed it.  Waking either side's
    # answering task would be a scheduler pass per request on each hop.
    count = TaskSteps()
    async with client_of_a_bridge_to_a_server(tmp_path) as client:
        trio.lowlevel.add_instrument(count)
        try:
            for n in range(64):
                data = bytes([n]) * 4096
                head = p.REQUEST.pack(p.REQUEST_MAGIC, 0, Command.WRITE, n, n << 12, 4096)
                await client.send(head + data)
                assert await client.simple_reply() == (0, n)
                head = p.REQUEST.pack(p.REQUEST_MAGIC, 0, Command.READ, n, n << 12, 4096)
                await client.send(head)
                assert await client.simple_reply() == (0, n)
                assert await client.recv(4096) == data
        finally:
            trio.lowlevel.remove_instrument(count)
    answering = {name: n for name, n in count.steps.items() if name.endswith("._answer")}
    assert sum(answering.values()) <= 4, answering  # 128 requests, 2 hops: 256 without
