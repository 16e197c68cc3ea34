"""Bad input on the dst protocol, byte by byte from a raw socket: answered errors keep the
connection usable; untrustworthy frames close only that connection; a well-behaved client on
another connection is served throughout."""

from __future__ import annotations

import errno
import logging
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import crc32c
import msgpack
import pytest
import trio

from dst.block import Bio, Op
from dst.client import open_remote
from dst.net.endpoints import Address
from dst.wire import (
    Attach,
    Attached,
    ChecksumRequest,
    FlushRequest,
    Frame,
    FrameDecoder,
    Hello,
    Message,
    PromoteRequest,
    ReadRequest,
    Reply,
    Welcome,
    WriteRequest,
    encode_frame,
    unpack_checksums,
)
from tests.integration.harness import running_server

MiB = 1 << 20


class RawPeer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, msg: Message, data: bytes = b"") -> None:
        await self.stream.send_all(encode_frame(msg, [data] if data else []) + data)

    async def frame(self) -> Frame | None:
        """The next frame, or None if the server closed the connection."""
        with trio.fail_after(10):
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    return frame
                chunk = await self.stream.receive_some(1 << 16)
                if not chunk:
                    return None
                self.decoder.receive_data(chunk)

    async def reply(self) -> Reply:
        frame = await self.frame()
        assert frame is not None and isinstance(frame.message, Reply), frame
        return frame.message

    async def handshake(self) -> int:
        await self.send(
            Hello(
                versions=(1, 1),
                node_id="raw",
                role="client",
                page_size=4096,
                limits={},
                features=(),
                max_inflight=8,
            )
        )
        frame = await self.frame()
        assert frame is not None and isinstance(frame.message, Welcome)
        await self.send(Attach(tid=1, volume="vol0", epoch=0))
        frame = await self.frame()
        assert frame is not None and isinstance(frame.message, Attached)
        return frame.message.handle

    async def is_closed(self) -> bool:
        with trio.fail_after(10):
            try:
                while True:
                    chunk = await self.stream.receive_some(1 << 16)
                    if not chunk:
                        return True
            except trio.BrokenResourceError:
                return True


@asynccontextmanager
async def raw(address: Address) -> AsyncIterator[RawPeer]:
    stream = await trio.open_tcp_stream(address.host, address.port)
    try:
        yield RawPeer(stream)
    finally:
        await trio.aclose_forcefully(stream)


def read(tid: int, handle: int, offset: int, length: int) -> ReadRequest:
    return ReadRequest(
        tid=tid,
        sub=0,
        handle=handle,
        offset=offset,
        length=length,
        pages=((4096, 0, length // 4096),) if length % 4096 == 0 else ((length, 0, 1),),
    )


def handmade_frame(msg_type: int, meta: dict[str, object], data: bytes = b"") -> bytes:
    """A frame built from the spec by hand (not by our encoder)."""
    packed = msgpack.packb(meta, use_bin_type=True)
    fixed = struct.pack(
        ">IBBHII I",
        0x44535446,
        1,
        msg_type,
        0,
        len(packed),
        len(data),
        crc32c.crc32c(data) if data else 0,
    )
    header_crc = crc32c.crc32c(fixed + packed)
    return bytes(fixed + struct.pack(">I", header_crc) + packed + data)


async def test_answered_errors_keep_the_connection(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server, raw(server.listen_address) as peer:  # type: ignore[arg-type]
        h = await peer.handshake()
        cases: list[tuple[ReadRequest | WriteRequest, bytes, int]] = [
            (read(10, h, 64 * MiB, 4096), b"", errno.EINVAL),  # past the end
            (read(11, h, 64 * MiB - 4096, 8192), b"", errno.EINVAL),  # straddling the end
            (read(12, h, 100, 512), b"", errno.EINVAL),  # misaligned
            (read(13, h, 0, 2 * MiB), b"", errno.E2BIG),  # over max_bytes
            (read(14, h + 7, 0, 4096), b"", errno.EBADF),  # unknown handle
            (
                WriteRequest(
                    tid=15,
                    sub=0,
                    handle=h,
                    offset=64 * MiB,
                    length=512,
                    epoch=1,
                    pages=((512, 0, 1),),
                ),
                b"x" * 512,
                errno.ENOSPC,
            ),
            (
                WriteRequest(
                    tid=16, sub=0, handle=h, offset=0, length=512, epoch=0, pages=((512, 0, 1),)
                ),
                b"x" * 512,
                errno.ESTALE,
            ),
        ]
        for msg, data, code in cases:
            await peer.send(msg, data)
            reply = await peer.reply()
            assert (reply.tid, reply.errno) == (msg.tid, code), reply
            assert reply.message
        # zero length, oversized data and an unknown opcode, crafted by hand
        await peer.stream.send_all(
            handmade_frame(0x10, {"t": 20, "s": 0, "h": h, "o": 0, "l": 0, "p": []})
        )
        assert (await peer.reply()).errno == errno.EINVAL
        big = b"y" * (2 * MiB)
        await peer.stream.send_all(
            handmade_frame(
                0x11,
                {
                    "t": 21,
                    "s": 0,
                    "h": h,
                    "o": 0,
                    "l": len(big),
                    "e": 1,
                    "p": [[4096, 0, len(big) // 4096]],
                },
                big,
            )
        )
        assert (await peer.reply()).errno == errno.E2BIG
        await peer.stream.send_all(handmade_frame(0x1F, {"t": 22, "s": 0}))
        assert (await peer.reply()).errno == errno.EOPNOTSUPP
        # still usable
        await peer.send(read(30, h, 0, 4096))
        reply = await peer.reply()
        assert (reply.tid, reply.errno) == (30, 0)


async def test_duplicate_transaction_id_in_flight(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server, raw(server.listen_address) as peer:  # type: ignore[arg-type]
        h = await peer.handshake()
        # Two identical (tid, sub) back to back: the first is in fdatasync when the second
        # arrives.
        frame = encode_frame(FlushRequest(tid=40, sub=0, handle=h))
        await peer.stream.send_all(frame + frame)
        codes = sorted([(await peer.reply()).errno, (await peer.reply()).errno])
        assert codes == [0, errno.EEXIST]


@pytest.mark.parametrize(
    "what",
    ["bad data crc", "bad header crc", "garbage", "request before hello", "huge meta_len"],
)
async def test_untrustworthy_frames_close_only_that_connection(
    tmp_path: Path, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dst")
    async with running_server(tmp_path) as server:
        addr: Address = server.listen_address  # type: ignore[assignment]
        async with open_remote(addr, "vol0") as good, raw(addr) as peer:
            await good.submit(Bio.from_buffer(Op.WRITE, 0, b"g" * 4096))
            if what != "request before hello":
                h = await peer.handshake()
            else:
                h = 1
            msg = WriteRequest(
                tid=50, sub=0, handle=h, offset=0, length=4096, epoch=1, pages=((4096, 0, 1),)
            )
            data = b"z" * 4096
            frame = bytearray(encode_frame(msg, [data]) + data)
            if what == "bad data crc":
                frame[-1] ^= 0x01
            elif what == "bad header crc":
                frame[5 + 20] ^= 0x40  # a byte of the msgpack meta
            elif what == "garbage":
                frame = bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
            elif what == "huge meta_len":
                struct.pack_into(">I", frame, 8, 0xFFFFFFFF)
            await peer.stream.send_all(bytes(frame))
            assert await peer.is_closed()
            # the good client is still served, and the bad write never landed
            out = bytearray(4096)
            await good.submit(Bio.from_buffer(Op.READ, 0, out))
            assert out == b"g" * 4096
    closed = [r.getMessage() for r in caplog.records if "event=closed reason=" in r.getMessage()]
    assert closed, "the server logs why it closed the connection"


async def test_replies_in_completion_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow FLUSH does not hold back a READ sent after it on the same connection."""
    real_fdatasync = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        time.sleep(0.5)
        real_fdatasync(fd)

    async with running_server(tmp_path) as server, raw(server.listen_address) as peer:  # type: ignore[arg-type]
        h = await peer.handshake()
        monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
        await peer.stream.send_all(
            encode_frame(FlushRequest(tid=60, sub=0, handle=h)) + encode_frame(read(61, h, 0, 4096))
        )
        first, second = await peer.frame(), await peer.frame()
        assert first is not None and second is not None
        assert isinstance(first.message, Reply) and isinstance(second.message, Reply)
        assert (first.message.tid, second.message.tid) == (61, 60)
        assert len(first.data) == 4096 and second.message.errno == 0


async def test_a_peer_that_resets_under_a_burst_of_answers_leaves_no_pages_held(
    tmp_path: Path,
) -> None:
    """A burst of READs the server answers from its reader (cached data) whose client resets
    the connection instead of reading the replies: every pool page comes back, and the next
    client is served."""
    async with running_server(tmp_path, pool_bytes=4 * MiB) as server:
        pool = server.pool
        total = pool.statistics().pages_total
        async with raw(server.listen_address) as peer:  # type: ignore[arg-type]
            h = await peer.handshake()
            for tids in (range(100, 148), range(148, 196)):  # more while replies queue
                burst = b"".join(encode_frame(read(tid, h, 0, 64 * 1024)) for tid in tids)
                await peer.stream.send_all(burst)
            peer.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )  # close with a reset
        with trio.fail_after(10):
            while pool.statistics().pages_free != total:
                await trio.sleep(0.01)
        assert server.stats["completed_inline"] > 0
        async with open_remote(server.listen_address, "vol0") as vol:  # type: ignore[arg-type]
            out = bytearray(4096)
            await vol.submit(Bio.from_buffer(Op.READ, 0, out))


async def test_checksums_per_extent_and_promote_refused_when_standalone(tmp_path: Path) -> None:
    """ChecksumRequest answers the crc32c of each extent (what `dst verify` compares);
    PromoteRequest on a server that is not a secondary is refused, with a reason."""
    async with running_server(tmp_path) as server, raw(server.listen_address) as peer:  # type: ignore[arg-type]
        h = await peer.handshake()
        data = bytes(random.Random(9).randbytes(3 * 65536))
        await peer.send(
            WriteRequest(
                tid=70,
                sub=0,
                handle=h,
                offset=65536,
                length=len(data),
                epoch=1,
                pages=((4096, 0, len(data) // 4096),),
            ),
            data,
        )
        assert (await peer.reply()).errno == 0
        await peer.send(
            ChecksumRequest(tid=71, sub=0, handle=h, offset=0, length=5 * 65536 - 512, extent=65536)
        )
        frame = await peer.frame()
        assert frame is not None and isinstance(frame.message, Reply)
        assert frame.message.errno == 0
        want = [
            crc32c.crc32c(bytes(65536)),
            *(crc32c.crc32c(data[i : i + 65536]) for i in range(0, len(data), 65536)),
            crc32c.crc32c(bytes(65536 - 512)),
        ]
        assert list(unpack_checksums(frame.data)) == want
        await peer.send(
            ChecksumRequest(
                tid=72, sub=0, handle=h, offset=64 * MiB - 512, length=1024, extent=4096
            )
        )
        assert (await peer.reply()).errno == errno.EINVAL
        await peer.send(PromoteRequest(tid=73, volume="vol0", force=False))
        reply = await peer.reply()
        assert (reply.tid, reply.errno) == (73, errno.EINVAL)
        assert "standalone" in reply.message


async def test_a_replayed_write_is_not_applied_after_a_newer_one(tmp_path: Path) -> None:
    """Within a connection, a write frame that comes back after its answer (a duplicate or a
    replay) is refused with EALREADY and does not overwrite the newer write."""
    async with running_server(tmp_path) as server:
        addr: Address = server.listen_address  # type: ignore[assignment]
        async with raw(addr) as peer:
            h = await peer.handshake()

            def write(tid: int) -> WriteRequest:
                pages = ((4096, 0, 1),)
                return WriteRequest(tid, 0, h, 0, 4096, 1, pages)

            old = write(7)
            for msg, data in ((old, b"o" * 4096), (write(8), b"n" * 4096)):
                await peer.send(msg, data)
                assert (await peer.reply()).errno == 0
            await peer.send(old, b"o" * 4096)  # the replay
            reply = await peer.reply()
            assert (reply.tid, reply.errno) == (7, errno.EALREADY) and "replay" in reply.message
            await peer.send(read(9, h, 0, 4096))
            frame = await peer.frame()
            assert frame is not None and frame.data == b"n" * 4096
        assert server.stats["replayed_writes"] == 1
