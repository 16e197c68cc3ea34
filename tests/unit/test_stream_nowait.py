"""ByteStream.send_nowait over real loopback TCP: a message goes to the kernel from the calling
task without a wait or a yield, or nothing is done; what did not fit is a copy, sent by flush
ahead of anything sent after it, so the caller may reuse its buffers at once; a message too
large to copy is declined."""

from __future__ import annotations

import socket

import trio

from dst.net.stream import NOWAIT_MAX_BYTES, ByteStream
from tests.unit.test_stream_lowat import tcp_pair


async def read_all(receiver: trio.SocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await receiver.receive_some(n - len(got))
    return bytes(got)


async def test_a_message_that_fits_is_sent_at_once_without_a_yield() -> None:
    async with tcp_pair() as (sender, receiver):
        stream = ByteStream(sender)
        head, data = b"head", bytearray(b"x" * 4096)
        with trio.CancelScope() as scope:
            scope.cancel()  # any checkpoint in send_nowait would raise Cancelled
            assert stream.send_nowait([head, memoryview(data)])
        assert not stream.unsent
        assert stream.bytes_sent == 4100
        assert await read_all(receiver, 4100) == head + data


async def test_what_does_not_fit_is_copied_and_flushed_before_later_messages() -> None:
    async with tcp_pair() as (sender, receiver):
        sender.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = ByteStream(sender)
        big = bytearray(bytes(range(256)) * 192)  # 48 KiB: more than the socket takes
        expected = bytes(big)
        assert stream.send_nowait([b"a", memoryview(big), b"b"])
        assert stream.unsent
        assert not stream.send_nowait([b"never"]), "queued bytes go first"
        big[:] = bytes(len(big))  # the caller's buffer is its own again
        total = 2 + len(expected) + 5
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.flush)
            nursery.start_soon(stream.send_parts, [b"after"])
            got = await read_all(receiver, total)
        assert got == b"a" + expected + b"b" + b"after"
        assert not stream.unsent


async def test_a_large_message_is_declined_not_copied() -> None:
    # Its tail would be a copy as large as itself, costing more than the wakeup it saves.
    async with tcp_pair() as (sender, receiver):
        stream = ByteStream(sender)
        assert stream.send_nowait([b"h", bytes(NOWAIT_MAX_BYTES - 1)])
        assert await read_all(receiver, NOWAIT_MAX_BYTES) == b"h" + bytes(NOWAIT_MAX_BYTES - 1)
        assert not stream.send_nowait([b"h", bytes(NOWAIT_MAX_BYTES)])
        assert stream.bytes_sent == NOWAIT_MAX_BYTES and not stream.unsent
        await stream.send_parts([b"next"])
        assert await read_all(receiver, 4) == b"next", "nothing of the declined one went"


async def test_nothing_is_done_while_another_sender_is_at_it() -> None:
    async with tcp_pair() as (sender, receiver):
        sender.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = ByteStream(sender)
        big = bytes(1 << 20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_parts, [big])
            await trio.testing.wait_all_tasks_blocked()  # the sender waits for room
            assert not stream.send_nowait([b"late"])
            assert not stream.unsent, "a sender is at it: nothing for flush"
            assert await read_all(receiver, len(big)) == big


async def test_a_closed_or_failed_stream_declines() -> None:
    async with tcp_pair() as (sender, receiver):
        stream = ByteStream(sender)
        await receiver.aclose()
        sender.socket.close()
        assert not stream.send_nowait([b"x"])
