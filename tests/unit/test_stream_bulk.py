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


async def send_messages(
    sender: trio.SocketStream, receiver: trio.SocketStream, payloads: list[bytes]
) -> None:
    """All of them, then wait until they are all in the receiver's socket (nothing read)."""
    for sock, option in ((sender.socket, socket.SO_SNDBUF), (receiver.socket, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
    data = b"".join(len(p).to_bytes(HEAD, "big") + p for p in payloads)
    with trio.fail_after(10):
        await sender.send_all(data)
        while _unread(receiver) < len(data):
            await trio.sleep(0.001)


def _unread(receiver: trio.SocketStream) -> int:
    count = fcntl.ioctl(receiver.socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(count, "little")


async def read_message(stream: ByteStream) -> tuple[bytes, int]:
    """One message, and how many bytes of what follows it the stream had buffered right after
    its head was read."""
    size = int.from_bytes(await stream.read_exact(HEAD, "head"), "big")
    buffered = stream.buffered
    payload = bytearray(size)
    await stream.read_into([memoryview(payload)], "payload")
    return bytes(payload), buffered


async def test_after_a_large_payload_the_next_one_is_not_received_into_the_stream() -> None:
    large = [os.urandom(2 * READ_BUFFER_SIZE) for _ in range(3)]
    async with tcp_pair() as (sender, receiver):
        await send_messages(sender, receiver, large)
        stream = ByteStream(receiver)
        got = [await read_message(stream) for _ in large]
    assert [payload for payload, _ in got] == large
    # The first head's receive knows nothing yet and fills the stream's buffer; after a large
    # payload (larger than that buffer: none of the next is in it), the head's receive leaves
    # all but BULK_HEAD_SLACK of the next payload in the socket.
    assert got[0][1] == READ_BUFFER_SIZE - HEAD
    assert [buffered for _, buffered in got[1:]] == [BULK_HEAD_SLACK, BULK_HEAD_SLACK]


async def test_after_small_payloads_one_receive_takes_many_messages() -> None:
    small = [os.urandom(4096) for _ in range(3)]
    large = os.urandom(2 * READ_BUFFER_SIZE)
    async with tcp_pair() as (sender, receiver):
        await send_messages(sender, receiver, [large, *small])
        stream = ByteStream(receiver)
        assert (await read_message(stream))[0] == large
        payload, buffered = await read_message(stream)  # short: the last payload was large
        assert payload == small[0] and buffered == BULK_HEAD_SLACK
        payload, buffered = await read_message(stream)  # after a small one: all the rest
        assert payload == small[1] and buffered == 4096 + HEAD + 4096
        assert (await read_message(stream))[0] == small[2]
