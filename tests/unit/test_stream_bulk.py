"""ByteStream over real loopback TCP: after a large payload, the receive for the next head
takes little more than the head, so the next large payload is received straight into the
caller's buffer instead of into the stream's and copied out; after small payloads a receive
takes all that is there (many small messages at once)."""

from __future__ import annotations

import fcntl
import os
import socket
import termios

import trio

from dst.net.stream import BULK_HEAD_SLACK, READ_BUFFER_SIZE, ByteStream
from tests.unit.test_stream_lowat import tcp_pair

HEAD = 16
#: Larger than the stream's buffer: once it is read, nothing of the next message is buffered.
LARGE = READ_BUFFER_SIZE + 4096


def unread(receiver: trio.SocketStream) -> int:
    """Bytes waiting in the receiver's socket."""
    count = fcntl.ioctl(receiver.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(count, "little")


async def read_message(
    stream: ByteStream, receiver: trio.SocketStream, waiting: int
) -> tuple[bytes, int]:
    """One message, read once ``waiting`` bytes wait in the socket (the sender runs beside),
    and how many bytes of what follows it the stream had buffered right after its head."""
    with trio.fail_after(10):
        while stream.buffered + unread(receiver) < waiting:
            await trio.sleep(0.001)
    size = int.from_bytes(await stream.read_exact(HEAD, "head"), "big")
    buffered = stream.buffered
    payload = bytearray(size)
    await stream.read_into([memoryview(payload)], "payload")
    return bytes(payload), buffered


async def exchange(payloads: list[bytes], waits: list[int]) -> list[tuple[bytes, int]]:
    async with tcp_pair() as (sender, receiver):
        receiver.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        stream = ByteStream(receiver)
        data = b"".join(len(p).to_bytes(HEAD, "big") + p for p in payloads)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, data)
            return [await read_message(stream, receiver, w) for w in waits]


async def test_after_a_large_payload_the_next_one_is_not_received_into_the_stream() -> None:
    large = [os.urandom(LARGE) for _ in range(3)]
    # Each head is read with more of its message waiting than the stream would take.
    got = await exchange(large, [READ_BUFFER_SIZE, *[HEAD + BULK_HEAD_SLACK + 1] * 2])
    assert [payload for payload, _ in got] == large
    # The first head's receive knows nothing yet and fills the stream's buffer; after a
    # large payload the head's receive leaves all but BULK_HEAD_SLACK of the next in the
    # socket, to be received straight into the caller's buffer.
    assert got[0][1] == READ_BUFFER_SIZE - HEAD
    assert [buffered for _, buffered in got[1:]] == [BULK_HEAD_SLACK, BULK_HEAD_SLACK]


async def test_after_small_payloads_one_receive_takes_many_messages() -> None:
    large, small = os.urandom(LARGE), [os.urandom(4096) for _ in range(3)]
    rest = 3 * (HEAD + 4096)  # the small messages, all waiting before each head is read
    got = await exchange([large, *small], [READ_BUFFER_SIZE, rest, rest - HEAD - 4096, 0])
    assert [payload for payload, _ in got] == [large, *small]
    # Short after the large payload; after a small one, all that is there.
    assert got[1][1] == BULK_HEAD_SLACK
    assert got[2][1] == 4096 + HEAD + 4096
