"""The NBD bridge in-process (serve_nbd on 127.0.0.1 port 0) over a MemoryStore or FileStore,
driven by real NBD clients as separate processes — nbdinfo, nbdcopy, qemu-img, qemu-io, nbdsh —
and by a raw Trio client where a test needs bytes no well-behaved client sends.

Every client runs under ``nbdtools.run`` (a timeout, output captured, killed on cancellation,
so a failing test leaves no process behind).  A MemoryStore made ``strict`` with a 32 KiB
boundary sits under the bridge where requests are misaligned: it fails any bio that does not
fit its limits, so passing shows the bridge splits what it submits (seed 000).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import pytest
import trio
import trio.testing

from dst.block import Bio, BlockLayer, FileStore, Limits, MemoryStore, Op
from dst.errors import BlockError, ConfigError
from dst.nbd import flow
from dst.nbd import protocol as p
from dst.nbd.bridge import MAX_CONNECTION_BYTES, MAX_INFLIGHT, NbdExport, serve_nbd
from dst.nbd.protocol import Command, Info, Option, Reply
from dst.net.endpoints import Address
from dst.security.certs import init_ca, issue
from dst.security.tls import TlsConfig, client_context
from tests.integration.nbdtools import run, text
from tests.integration.starting import Starting

MiB = 1 << 20
#: A test step over loopback; only keeps a broken test from hanging.
STEP_S = 10
#: Seed 000's boundary: DRBD's 32 KiB.
BOUNDARY = 32 * 1024


@asynccontextmanager
async def bridge(
    *exports: NbdExport, tls: TlsConfig | None = None, page_size: int = 4096
) -> AsyncIterator[Address]:
    async with trio.open_nursery() as nursery:
        listen = Address("127.0.0.1", 0)
        serve = partial(serve_nbd, listen, exports, tls=tls, page_size=page_size)
        address: Address = await nursery.start(serve)
        try:
            yield address
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def bridge_over(layer: BlockLayer, path: str) -> AsyncIterator[Address]:
    """``bridge`` over ``layer`` as export vol0.  ``path`` is how the bridge runs a READ or
    WRITE: a task each ("task"), or started on a StartingLayer ("started": the path of a bridge
    to a server, here over tests/integration/starting.py)."""
    async with trio.open_nursery() as below:
        top = layer if path == "task" else Starting(layer, below)
        async with bridge(NbdExport("vol0", top)) as address:
            yield address
        below.cancel_scope.cancel()


def uri(address: Address, name: str = "vol0") -> str:
    return f"nbd://{address}/{name}"


async def nbdsh(address: Address, script: str, name: str = "vol0") -> str:
    result = await run(["nbdsh", "-u", uri(address, name), "-c", script], debian=True)
    return result.stdout.decode()


# --- a raw client ----------------------------------------------------------------------------


class RawClient:
    """The client side of NBD by hand, for the bytes real clients never send.  Every one is
    closed when its test ends, passed or failed (the ``close_raw_clients`` fixture)."""

    open: ClassVar[list[RawClient]] = []

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        RawClient.open.append(self)

    @classmethod
    async def connect(cls, address: Address, *, cflags: int = 3) -> RawClient:
        client = cls(await trio.open_tcp_stream(address.host, address.port))
        greeting = await client.recv(p.GREETING.size)
        assert p.GREETING.unpack(greeting) == (p.NBDMAGIC, p.IHAVEOPT, 3)
        await client.send(struct.pack(">I", cflags))
        return client

    async def send(self, data: bytes) -> None:
        with trio.fail_after(STEP_S):
            await self.stream.send_all(data)

    async def recv(self, n: int) -> bytes:
        with trio.fail_after(STEP_S):
            while len(self._buf) < n:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"closed after {len(self._buf)} of {n} bytes")
                self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        size = len(data) if length is None else length
        await self.send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, size) + data)

    async def reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = p.OPTION_REPLY_HEADER.unpack(await self.recv(20))
        assert magic == p.OPTION_REPLY_MAGIC
        return option, reply, await self.recv(length)

    async def final_reply(self) -> tuple[int, list[bytes]]:
        """Replies up to the final one: (its type, the payloads of SERVER/INFO before it)."""
        payloads: list[bytes] = []
        while True:
            _, reply, payload = await self.reply()
            if reply not in (Reply.SERVER, Reply.INFO):
                return reply, payloads
            payloads.append(payload)

    async def go(self, name: bytes = b"vol0", *, structured: bool = False) -> tuple[int, int]:
        """Negotiate and enter transmission: (size, transmission flags)."""
        if structured:
            await self.option(Option.STRUCTURED_REPLY)
            assert (await self.final_reply())[0] == Reply.ACK
        await self.option(Option.GO, struct.pack(">I", len(name)) + name + b"\0\0")
        reply, infos = await self.final_reply()
        assert reply == Reply.ACK, hex(reply)
        export = next(i for i in infos if i[:2] == struct.pack(">H", Info.EXPORT))
        size, flags = struct.unpack(">QH", export[2:])
        return size, flags

    async def request(
        self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0, handle: int = 1
    ) -> None:
        await self.send(p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, handle, offset, length))

    async def simple_reply(self) -> tuple[int, int]:
        magic, error, handle = p.SIMPLE_REPLY.unpack(await self.recv(16))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        return error, handle

    async def until_closed(self) -> bytes:
        """Everything the server sends until it hangs up (EOF or reset); TooSlowError if it
        has not hung up within STEP_S."""
        with trio.fail_after(STEP_S):
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    data = bytes(self._buf)
                    self._buf.clear()
                    return data
                self._buf += chunk

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@pytest.fixture(autouse=True)
async def close_raw_clients() -> AsyncIterator[None]:
    yield
    while RawClient.open:
        await RawClient.open.pop().aclose()


# --- layers for the tests -------------------------------------------------------------------


@dataclass
class Watch:
    """A pass-through layer that records how many bios and bytes are below at once, and can
    hold every bio at a gate until a test opens it."""

    below: BlockLayer
    gate: trio.Event | None = None
    now_bios: int = 0
    now_bytes: int = 0
    max_bios: int = 0
    max_bytes: int = 0
    seen: int = 0

    @property
    def limits(self) -> Limits:
        return self.below.limits

    @property
    def size(self) -> int:
        return self.below.size

    async def submit(self, bio: Bio) -> None:
        self.seen += 1
        self.now_bios += 1
        self.now_bytes += bio.length
        self.max_bios = max(self.max_bios, self.now_bios)
        self.max_bytes = max(self.max_bytes, self.now_bytes)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.sleep(0.001)
            await self.below.submit(bio)
        finally:
            self.now_bios -= 1
            self.now_bytes -= bio.length

    async def aclose(self) -> None:
        await self.below.aclose()


class Failing(MemoryStore):
    """Fails reads in [1 MiB, 2 MiB) with EIO, a BlockError, and any bio at 2 MiB with a bug."""

    async def submit(self, bio: Bio) -> None:
        if bio.offset >= 2 * MiB:
            raise RuntimeError("a bug in a layer")
        if bio.offset >= MiB:
            raise BlockError(errno.EIO, "the disk said no")
        await super().submit(bio)


# --- real clients ----------------------------------------------------------------------------


async def test_nbdinfo_reports_size_block_sizes_flags_and_exports() -> None:
    vol0 = NbdExport("vol0", MemoryStore(64 * MiB), "the first volume")
    vol1 = NbdExport("vol1", MemoryStore(MiB, Limits(logical_block_size=4096)), multi_conn=True)
    async with bridge(vol0, vol1, page_size=16384) as address:
        info = json.loads((await run(["nbdinfo", "--json", uri(address)])).stdout)
        (export,) = info["exports"]
        assert export["export-size"] == 64 * MiB
        assert export["description"] == "the first volume"
        sizes = [export[f"block_size_{k}"] for k in ("minimum", "preferred", "maximum")]
        assert sizes == [512, 16384, 32 * MiB]
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_df"):
            assert export[flag] is True, flag
        for flag in ("can_multi_conn", "can_fast_zero", "is_read_only", "is_rotational"):
            assert export[flag] is False, flag
        assert info["structured"] is True
        other = json.loads((await run(["nbdinfo", "--json", uri(address, "vol1")])).stdout)
        assert other["exports"][0]["can_multi_conn"] is True
        assert other["exports"][0]["block_size_minimum"] == 4096
        listing = json.loads((await run(["nbdinfo", "--list", "--json", uri(address)])).stdout)
        assert [e["export-name"] for e in listing["exports"]] == ["vol0", "vol1"]
        default = json.loads((await run(["nbdinfo", "--json", f"nbd://{address}"])).stdout)
        assert default["exports"][0]["export-size"] == 64 * MiB  # "" is the first export


async def test_nbdcopy_64_mib_of_random_data_in_and_out(tmp_path: Path) -> None:
    source, back = tmp_path / "random.img", tmp_path / "back.img"
    source.write_bytes(os.urandom(64 * MiB))
    store = FileStore.open(tmp_path / "vol0.img", 64 * MiB)
    try:
        async with bridge(NbdExport("vol0", store)) as address:
            await run(["nbdcopy", "--requests=64", str(source), uri(address)], timeout_s=240)
            await run(["nbdcopy", uri(address), str(back)], timeout_s=240)
        assert back.read_bytes() == source.read_bytes()
        assert (tmp_path / "vol0.img").read_bytes() == source.read_bytes()
        assert store.statistics().errors == 0
    finally:
        await store.aclose()


async def test_qemu_img_convert_and_compare(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(16 * MiB))
    store = MemoryStore(16 * MiB, Limits(boundary=BOUNDARY), strict=True)
    async with bridge(NbdExport("vol0", store)) as address:
        target = uri(address)
        await run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), target])
        await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), target])
        with image.open("r+b") as f:  # compare has teeth: one byte off is a difference
            f.seek(5 * MiB + 77)
            f.write(b"\xff" if store.contents(5 * MiB + 77, 1) != b"\xff" else b"\0")
        differ = await run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), target], check=False
        )
        assert differ.returncode == 1, text(differ)
    assert store.statistics().errors == 0


async def test_qemu_io_misaligned_io_over_a_strict_32k_boundary_store() -> None:
    # Sector 63, odd runs of 512-byte sectors, writes crossing multiples of 32 KiB: every
    # bio below must still fit the strict store's boundary, or qemu-io sees EINVAL.
    store = MemoryStore(64 * MiB, Limits(boundary=BOUNDARY, max_bytes=64 * 1024), strict=True)
    watch = Watch(store)
    commands = [
        "writev -P 0x5a 32256 512 1536 3072",  # sector 63, crossing 32 KiB
        "write -P 0xa5 65024 33280",  # sector 127, 65 sectors, crossing 64 KiB and 96 KiB
        "writev -P 0x3c 1047552 7680 512 25088",  # crossing 1 MiB
        "aio_write -P 0x11 4194304 3145728",  # 3 MiB: split by max_bytes too
        "aio_write -P 0x22 8388096 1024",
        "aio_flush",
        "read -P 0x5a 32256 5120",
        "readv -P 0xa5 65024 512 32768",
        "read -P 0x3c 1047552 33280",
        "read -P 0x11 4194304 3145728",
        "read -P 0x22 8388096 1024",
    ]
    async with bridge(NbdExport("vol0", watch)) as address:
        argv = ["qemu-io", "-f", "raw"]
        for command in commands:
            argv += ["-c", command]
        result = await run([*argv, uri(address)])
    output = text(result)
    assert "Pattern verification failed" not in output and "error" not in output.lower(), output
    assert store.statistics().errors == 0
    assert store.contents(32256, 5120) == b"\x5a" * 5120
    assert store.contents(1047552, 33280) == b"\x3c" * 33280
    assert store.contents(32256 - 512, 512) == bytes(512)  # nothing spilled before sector 63
    assert watch.seen > len(commands)  # split into many more bios than requests


@pytest.mark.parametrize("path", ["task", "started"])
async def test_many_requests_in_flight_and_the_slot_cap(path: str) -> None:
    # The layer holds every bio until MAX_INFLIGHT of them wait at once — which only happens
    # if the bridge runs that many requests concurrently — and no more ever arrive.
    watch = Watch(MemoryStore(4 * MiB), gate=trio.Event())
    script = """
bufs = [nbd.Buffer.from_bytearray(bytearray([i % 251]) * 4096) for i in range(512)]
for i, buf in enumerate(bufs):
    h.aio_pwrite(buf, i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
bad = [i for i in range(512) if h.pread(4096, i * 4096) != bytes([i % 251]) * 4096]
print("bad", bad)
"""
    async with bridge_over(watch, path) as address, trio.open_nursery() as nursery:

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
    assert watch.max_bios == MAX_INFLIGHT and watch.seen >= 1024


async def test_write_payloads_are_bounded_by_the_connection_budget() -> None:
    watch = Watch(MemoryStore(128 * MiB), gate=trio.Event())
    size = 2 * MiB
    async with bridge(NbdExport("vol0", watch)) as address:
        client = await RawClient.connect(address)
        await client.go()

        async def write_all() -> None:
            for i in range(48):  # 96 MiB of payload, more than the 64 MiB budget
                await client.request(Command.WRITE, i * size, size, handle=i)
                await client.send(bytes([i]) * size)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_all)
            with trio.fail_after(STEP_S):
                while watch.now_bytes < MAX_CONNECTION_BYTES:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # the bridge takes no more while the budget is spent
            assert watch.now_bytes == MAX_CONNECTION_BYTES
            assert watch.now_bios == MAX_CONNECTION_BYTES // size
            assert watch.gate is not None
            watch.gate.set()
        handles = sorted([(await client.simple_reply()) for _ in range(48)])
        assert handles == [(0, i) for i in range(48)]
        await client.aclose()
    assert watch.max_bytes == MAX_CONNECTION_BYTES


async def test_clients_that_stall_replies_or_payloads_are_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Both would otherwise pin budget every connection shares, for as long as they like.
    monkeypatch.setattr(flow, "STALL_TIMEOUT_S", 0.5)
    caplog.set_level(logging.INFO, logger="dst.nbd")
    async with bridge(NbdExport("vol0", MemoryStore(64 * MiB))) as address:
        reader = await RawClient.connect(address)  # asks for 64 MiB and reads none of it
        await reader.go()
        for handle in (1, 2):
            await reader.request(Command.READ, 0, 32 * MiB, handle=handle)
        writer = await RawClient.connect(address)  # announces 1 MiB and sends 1000 bytes
        await writer.go()
        await writer.request(Command.WRITE, 0, MiB)
        await writer.send(b"x" * 1000)

        def reasons() -> list[str]:
            lines = [r.getMessage() for r in caplog.records if "event=disconnect" in r.getMessage()]
            return [line for line in lines if "for 0.5 s" in line]

        with trio.fail_after(STEP_S):
            while len(reasons()) < 2:
                await trio.sleep(0.05)
        assert any("reply not read" in line for line in reasons())
        assert any("WRITE payload not sent" in line for line in reasons())
        await reader.until_closed()  # what was in flight, then the end
        assert await writer.until_closed() == b""
        await run(["nbdinfo", uri(address)])


async def test_slow_payloads_each_within_the_limit_keep_their_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The payload deadline is per payload (Wire.watch_payloads), not per connection: six
    # WRITEs whose payloads each take 0.3 s of a 0.5 s limit, 1.8 s in all, are all answered.
    monkeypatch.setattr(flow, "STALL_TIMEOUT_S", 0.5)
    async with bridge(NbdExport("vol0", MemoryStore(64 * MiB))) as address:
        client = await RawClient.connect(address)
        await client.go()
        for handle in range(6):
            await client.request(Command.WRITE, handle * MiB, MiB, handle=handle)
            for _ in range(4):
                await trio.sleep(0.075)
                await client.send(bytes([handle + 1]) * (MiB // 4))
            with trio.fail_after(STEP_S):
                assert await client.simple_reply() == (0, handle)
        await client.aclose()


async def test_the_byte_budget_is_fifo_and_cancellation_safe() -> None:
    budget = flow.Budget(10)
    await budget.acquire(8)
    got: list[str] = []

    async def take(n: int, name: str) -> None:
        await budget.acquire(n)
        got.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, 5, "big")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, 1, "small")  # would fit, but waits its turn behind "big"
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.05):  # a waiter cancelled in the queue leaves no trace
            await budget.acquire(1)
        assert got == []
        budget.release(8)
    assert sorted(got) == ["big", "small"]
    await budget.acquire(4)  # exactly what is left: 10 - 5 - 1
    with trio.move_on_after(0.05) as scope:
        await budget.acquire(1)
    assert scope.cancelled_caught


@pytest.mark.parametrize("path", ["task", "started"])
async def test_replies_leave_in_completion_order(path: str) -> None:
    slow = trio.Event()

    class SlowAtZero(MemoryStore):
        async def submit(self, bio: Bio) -> None:
            if bio.op is Op.READ and bio.offset == 0:
                await slow.wait()
            await super().submit(bio)

    async with bridge_over(SlowAtZero(MiB), path) as address:
        client = await RawClient.connect(address)
        await client.go()
        await client.request(Command.READ, 0, 512, handle=1)
        await client.request(Command.FLUSH, handle=2)
        assert await client.simple_reply() == (0, 2)
        # Sent only now: requests read in one pass run in an order trio picks at random.
        await client.request(Command.READ, 4096, 512, handle=3)
        assert await client.simple_reply() == (0, 3)
        await client.recv(512)
        slow.set()
        assert await client.simple_reply() == (0, 1)
        await client.recv(512)
        await client.request(Command.DISC)
        assert await client.until_closed() == b""


@pytest.mark.parametrize("path", ["task", "started"])
async def test_layer_errors_are_answered_and_bugs_cost_only_their_connection(
    caplog: pytest.LogCaptureFixture, path: str
) -> None:
    script = """
try:
    h.pread(512, 1024 * 1024)
except nbd.Error as e:
    print("errno", e.errno)  # libnbd gives the name
print("after", h.pread(512, 0) == bytes(512))
"""
    async with bridge_over(Failing(4 * MiB), path) as address:
        out = await nbdsh(address, script)
        assert "errno EIO" in out and "after True" in out
        if path == "task":  # a started bio's bug is its layer's (RemoteVolume's link reader)
            crashed = await run(
                ["nbdsh", "-u", uri(address), "-c", "h.pread(512, 2 * 1024 * 1024)"],
                debian=True,
                check=False,
            )
            assert crashed.returncode != 0
            assert "after True" in await nbdsh(address, script)  # still serving
            assert any("event=crashed" in r.getMessage() for r in caplog.records)
    failed = [r.getMessage() for r in caplog.records if "event=request_failed" in r.getMessage()]
    assert failed and all("the disk said no" in line for line in failed)
    assert all(
        r.levelname == "WARNING" for r in caplog.records if "request_failed" in r.getMessage()
    )


async def test_bad_configuration_is_refused_before_listening() -> None:
    store = MemoryStore(MiB)
    cases: list[tuple[list[NbdExport], int, str]] = [
        ([], 4096, "at least one"),
        ([NbdExport("a", store), NbdExport("a", store)], 4096, "twice"),
        ([NbdExport("x" * 4097, store)], 4096, "4097 bytes"),
        ([NbdExport("a", store)], 1000, "page_size"),
    ]
    for exports, page_size, message in cases:
        with pytest.raises(ConfigError, match=message):
            await serve_nbd(Address("127.0.0.1", 0), exports, page_size=page_size)


async def test_plaintext_on_a_non_loopback_address_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(serve_nbd, Address("0.0.0.0", 0), [NbdExport("vol0", MemoryStore(MiB))])
        await nursery.start(serve)
        nursery.cancel_scope.cancel()
    (warning,) = [r for r in caplog.records if "event=plaintext" in r.getMessage()]
    assert warning.levelname == "WARNING" and "listen=0.0.0.0:0" in warning.getMessage()


# --- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    bridge: TlsConfig
    client: TlsConfig
    replica: TlsConfig
    foreign: TlsConfig  # a client certificate from another CA
    libnbd_client: Path  # the client's files under libnbd's names


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = tmp_path / "ca"
    init_ca(ca)
    nodes = {role: TlsConfig.load(issue(ca, f"n-{role}", role)) for role in ("bridge", "client")}
    nodes["replica"] = TlsConfig.load(issue(ca, "n-replica", "replica"))
    init_ca(tmp_path / "other-ca")
    nodes["foreign"] = TlsConfig.load(issue(tmp_path / "other-ca", "n-foreign", "client"))
    client = nodes["client"]
    # `dst certs issue` writes libnbd's file names too: the node directory is the
    # --tls-certificates directory as it is.
    return Pki(nodes["bridge"], client, nodes["replica"], nodes["foreign"], client.directory)


async def starttls(address: Address, tls: TlsConfig) -> RawClient:
    client = await RawClient.connect(address)
    await client.option(Option.STARTTLS)
    assert await client.reply() == (Option.STARTTLS, Reply.ACK, b"")
    stream = trio.SSLStream(client.stream, client_context(tls), server_hostname="127.0.0.1")
    with trio.fail_after(STEP_S):
        await stream.do_handshake()
    return RawClient(stream)


async def test_tls_with_libnbd_client_certificates(pki: Pki) -> None:
    store = MemoryStore(4 * MiB)
    async with bridge(NbdExport("vol0", store), tls=pki.bridge) as address:
        tls_uri = f"nbds://{address}/vol0?tls-certificates={pki.libnbd_client}"
        info = json.loads((await run(["nbdinfo", "--json", tls_uri])).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
        script = (
            f"h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri({tls_uri!r})\n"
            "h.pwrite(b'\\x42' * 4096, 8192, nbd.CMD_FLAG_FUA); print(h.pread(4096, 8192)[:2])"
        )
        result = await run(["nbdsh", "-n", "-c", script], debian=True)
        assert "b'BB'" in text(result)
        plain = await run(["nbdinfo", uri(address)], check=False)
        assert plain.returncode != 0  # FORCEDTLS: no plaintext export
    assert store.contents(8192, 4096) == b"\x42" * 4096


async def test_tls_refuses_export_name_before_starttls_and_wrong_roles(pki: Pki) -> None:
    async with bridge(NbdExport("vol0", MemoryStore(MiB)), tls=pki.bridge) as address:
        client = await RawClient.connect(address)
        await client.option(Option.LIST)
        assert (await client.final_reply())[0] == Reply.ERR_TLS_REQD
        await client.option(Option.EXPORT_NAME, b"vol0")
        assert await client.until_closed() == b""  # it cannot be refused: a hang-up
        for wrong in (pki.replica, pki.foreign):  # the wrong role; the wrong CA
            with pytest.raises((trio.BrokenResourceError, EOFError)):
                refused = await starttls(address, wrong)  # TLS 1.3: refused on first read
                await refused.option(Option.LIST)
                await refused.final_reply()
        good = await starttls(address, pki.client)
        assert (await good.go())[0] == MiB


async def test_starttls_drops_structured_replies_negotiated_before_it(pki: Pki) -> None:
    """CVE-2021-3716: structured replies asked for in plaintext must not survive STARTTLS.
    Here the plaintext request is refused outright (FORCEDTLS), and after TLS a READ gets a
    simple reply unless structured replies are negotiated again — over TLS."""
    async with bridge(NbdExport("vol0", MemoryStore(MiB)), tls=pki.bridge) as address:
        client = await RawClient.connect(address)
        await client.option(Option.STRUCTURED_REPLY)
        assert (await client.final_reply())[0] == Reply.ERR_TLS_REQD
        await client.option(Option.STARTTLS)
        assert await client.reply() == (Option.STARTTLS, Reply.ACK, b"")
        stream = trio.SSLStream(client.stream, client_context(pki.client), server_hostname="x")
        with trio.fail_after(STEP_S):
            await stream.do_handshake()
        tls = RawClient(stream)
        _, flags = await tls.go()
        assert not flags & p.TransmissionFlags.SEND_DF
        await tls.request(Command.READ, 0, 512, handle=9)
        assert await tls.simple_reply() == (0, 9)
        assert await tls.recv(512) == bytes(512)

        again = await starttls(address, pki.client)
        _, flags = await again.go(structured=True)
        assert flags & p.TransmissionFlags.SEND_DF
        await again.request(Command.READ, 0, 512, handle=10)
        magic, chunk_flags, kind, handle, length, offset = p.OFFSET_DATA_HEADER.unpack(
            await again.recv(p.OFFSET_DATA_HEADER.size)
        )
        assert (magic, kind, handle, length, offset) == (
            p.STRUCTURED_REPLY_MAGIC,
            p.ReplyType.OFFSET_DATA,
            10,
            520,
            0,
        )
        assert chunk_flags == p.REPLY_FLAG_DONE


async def test_plaintext_injected_behind_starttls_is_refused(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with bridge(NbdExport("vol0", MemoryStore(MiB)), tls=pki.bridge) as address:
        client = await RawClient.connect(address)
        injected = p.OPTION_HEADER.pack(p.IHAVEOPT, Option.STRUCTURED_REPLY, 0)
        # One send, one segment on loopback: both options are there when STARTTLS is judged.
        await client.send(p.OPTION_HEADER.pack(p.IHAVEOPT, Option.STARTTLS, 0) + injected)
        assert await client.until_closed() == b""  # no ACK, no TLS: dropped
        assert (await run(["nbdinfo", uri(address)], check=False)).returncode != 0
    refused = [r for r in caplog.records if "event=refused" in r.getMessage()]
    assert "plaintext bytes sent after STARTTLS" in refused[0].getMessage()
    assert refused[0].levelname == "WARNING"
