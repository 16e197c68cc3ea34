"""Fencing (seed 002): a bridge that was taken over never lands a write after its successor.

Bridge A holds the volume; an NBD client's write reaches A while A is frozen (SIGSTOP), as a
migrated VM's in-flight writes reach the old host.  Bridge B takes the volume over
(``--takeover``: A is alive, so an ordinary claim is refused) and writes the same block.  A is
resumed and sends its write: the server refuses it (ESTALE, "definitely not applied"), A's
client gets an error and A's log says it was fenced; B's data stays, on every replica."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from dst.admin import fetch_status
from dst.net.endpoints import Address
from tests.chaos.proxy import FaultProxy, writes
from tests.integration.harness import (
    DstProcess,
    free_port,
    pair_processes,
    server_process,
    wait_in_sync,
)
from tests.integration.nbdtools import DEBIAN_ENV, run

BLOCK = 4096
# An NBD client (libnbd, Debian's python3) that connects, says so, waits for a line on stdin,
# then writes and flushes block 0 and reports how that went.
LATE_WRITER = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b"A" * 4096, 0)
    h.flush()
    print("ok", flush=True)
except nbd.Error as exc:
    print("error", exc.errno, exc.string, flush=True)
"""
WRITE_A = "h.pwrite(b'A' * 4096, 0); h.flush()"
WRITE_B = "h.pwrite(b'B' * 4096, 0); h.flush()"
READ_0 = "import sys; sys.stdout.buffer.write(h.pread(4096, 0))"


@contextmanager
def bridge(tmp_path: Path, name: str, servers: list[Address], *extra: str) -> Iterator[DstProcess]:
    address = Address("127.0.0.1", free_port())
    argv = ["nbd", "--listen", str(address), "--volume", "vol0", "--insecure"]
    for server in servers:
        argv += ["--server", str(server)]
    proc = DstProcess([*argv, "--node-id", name, *extra], address, tmp_path / f"{name}.log")
    try:
        yield proc
    finally:
        proc.stop()


async def read_line(stream: trio.abc.ReceiveStream, buf: bytearray) -> bytes:
    while b"\n" not in buf:
        chunk = await stream.receive_some(200)
        if not chunk:
            break
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def uri(proc: DstProcess) -> str:
    return f"nbd://{proc.address}/vol0"


def block0(data_dir: Path) -> bytes:
    with open(data_dir / "vol0.img", "rb") as f:
        return f.read(BLOCK)


async def the_late_write_is_fenced(
    tmp_path: Path,
    servers: list[Address],
    *,
    a_servers: list[Address] | None = None,
    hold: Callable[[DstProcess], None] = lambda a: a.kill(signal.SIGSTOP),
    release: Callable[[DstProcess], None] = lambda a: a.kill(signal.SIGCONT),
) -> None:
    """The scenario of the module docstring, against ``servers``: ``hold`` keeps A's write
    from the server (A frozen, or a proxy holding its frames) until ``release``."""
    with (
        bridge(tmp_path, "bridge-a", a_servers or servers) as a,
        bridge(tmp_path, "bridge-b", servers, "--takeover") as b,
    ):
        # in a thread: the loop may be running a proxy in front of the server
        await trio.to_thread.run_sync(a.start)
        script = tmp_path / "late_writer.py"
        script.write_text(LATE_WRITER)
        late = await trio.lowlevel.open_process(
            ["/usr/bin/python3", str(script), uri(a)],
            stdin=-1,
            stdout=-1,
            env=DEBIAN_ENV,
        )
        assert late.stdin is not None and late.stdout is not None
        buf = bytearray()
        try:
            with trio.fail_after(20):
                assert await read_line(late.stdout, buf) == b"connected"
            hold(a)
            await late.stdin.send_all(b"go\n")  # A's write is held on its way to the server

            plain = bridge(tmp_path, "bridge-c", servers, "--claim-wait", "0")
            with plain as c, pytest.raises(RuntimeError, match="held by bridge-a"):
                await trio.to_thread.run_sync(c.start)  # refused while A's session lives
            await trio.to_thread.run_sync(b.start)  # --takeover: the epoch moves on
            await run(["nbdsh", "-u", uri(b), "-c", WRITE_B], debian=True)

            release(a)
            with trio.fail_after(30):
                answer = await read_line(late.stdout, buf)
            assert answer.startswith(b"error"), answer
        finally:
            a.kill(signal.SIGCONT)
            late.kill()
            await late.wait()
        with trio.fail_after(10):
            while "event=fenced" not in a.log_path.read_text():
                await trio.sleep(0.1)


async def test_a_late_write_from_a_taken_over_bridge_is_refused(tmp_path: Path) -> None:
    with server_process(tmp_path) as server:
        server.start()
        await the_late_write_is_fenced(tmp_path, [server.address])
        assert block0(server.data_dir) == b"B" * BLOCK
        doc = await fetch_status(server.address, None)
        assert doc["requests"]["stale_writes"] == 1
        assert doc["volumes"]["vol0"]["epoch"] == 3  # A claimed 2, B took over at 3
        meta = json.loads((server.data_dir / "vol0.meta.json").read_text())
        assert meta["epoch"] == 3  # persisted before B was told it holds the volume


async def test_the_fence_holds_on_both_replicas(tmp_path: Path) -> None:
    with pair_processes(tmp_path) as (primary, secondary):
        secondary.start()
        primary.start()
        await the_late_write_is_fenced(tmp_path, [primary.address, secondary.address])
        await wait_in_sync(primary.address)
        for proc in (primary, secondary):
            assert block0(proc.data_dir) == b"B" * BLOCK
            meta = json.loads((proc.data_dir / "vol0.meta.json").read_text())
            assert meta["epoch"] == 3, proc.data_dir
        doc = await fetch_status(primary.address, None)
        assert doc["requests"]["stale_writes"] == 1


async def test_graceful_handover_a_drains_and_releases_then_b_claims(tmp_path: Path) -> None:
    """Migration without force: B's ordinary claim waits while A holds the volume; A is asked
    to stop (SIGTERM), finishes what it had under way, flushes and lets go; B then holds the
    volume at the next epoch and sees every write A acknowledged."""
    with server_process(tmp_path) as server:
        server.start()
        with (
            bridge(tmp_path, "bridge-a", [server.address]) as a,
            bridge(tmp_path, "bridge-b", [server.address]) as b,
        ):
            a.start()
            await run(["nbdsh", "-u", uri(a), "-c", WRITE_A], debian=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, b.start)  # listens once it holds
                with trio.fail_after(20):
                    while not b.log_path.exists() or "claim_waiting" not in b.log_path.read_text():
                        await trio.sleep(0.1)
                a.kill(signal.SIGTERM)
            assert a.proc is not None and a.proc.returncode == 0
            assert "event=released" in a.log_path.read_text()
            got = await run(["nbdsh", "-u", uri(b), "-c", READ_0], debian=True)
            assert got.stdout == b"A" * BLOCK
        doc = await fetch_status(server.address, None)
        assert doc["volumes"]["vol0"]["epoch"] == 3
        assert doc["requests"].get("stale_writes", 0) == 0


async def test_teeth_a_build_without_the_epoch_check_lets_the_late_write_land(
    tmp_path: Path,
) -> None:
    """Teeth (issue 7): the same scenario against a deliberately broken server
    (``DST_BROKEN=no-epoch-check``) — A's held write is answered as a success and lands over
    B's, so the checks above fail: what they assert is what the fence alone provides."""
    with server_process(tmp_path) as server:
        server.env["DST_BROKEN"] = "no-epoch-check"
        server.start()
        with pytest.raises(AssertionError, match="ok"):
            await the_late_write_is_fenced(tmp_path, [server.address])
        assert block0(server.data_dir) == b"A" * BLOCK  # invariant 4 broken: B's write undone
        doc = await fetch_status(server.address, None)
        assert doc["requests"].get("stale_writes", 0) == 0


async def test_a_write_held_by_a_proxy_then_released_is_refused(tmp_path: Path) -> None:
    """The seed's hazard exactly: A is alive and well, but its write frame is held in the
    network (tests/chaos/proxy.py, frame-aware) while B takes over and writes; when the proxy
    lets it go, on A's same connection, the server refuses it (one stale write) and A's
    client gets an error; B's block stays."""
    with server_process(tmp_path) as server:
        server.start()
        proxy = FaultProxy(server.address, seed=1)
        proxy.upstream.only = writes  # pings pass: A's link stays up while its write waits
        async with trio.open_nursery() as nursery:
            via = await nursery.start(proxy.serve)
            await the_late_write_is_fenced(
                tmp_path,
                [server.address],
                a_servers=[via],
                hold=lambda a: setattr(proxy.upstream, "hold", True),
                release=lambda a: proxy.upstream.release(),
            )
            proxy.close()
        assert proxy.counts["hold"] == 1  # one write frame was held, and let go
        assert block0(server.data_dir) == b"B" * BLOCK
        doc = await fetch_status(server.address, None)
        assert doc["requests"]["stale_writes"] == 1
        assert doc["volumes"]["vol0"]["epoch"] == 3
