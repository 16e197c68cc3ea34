"""ByteStream.pass_done over a real socket pair: a reader that finds many messages buffered
is told to hand on and checkpoint after every PASS_MESSAGES of them, and a wait for a receive
starts a new pass."""

from __future__ import annotations

import trio
import trio.testing

from dst.net.stream import PASS_MESSAGES, ByteStream

MESSAGE = 4


async def read_marking_passes(stream: ByteStream, count: int) -> list[int]:
    """Read ``count`` 4-byte messages; the indices before which pass_done said True."""
    ends = []
    for i in range(count):
        if stream.pass_done():
            ends.append(i)
        await stream.read_exact(MESSAGE, "message")
    return ends


async def test_a_pass_ends_every_eight_messages_while_more_are_buffered() -> None:
    left, right = trio.socket.socketpair()
    with left, right:
        reader = ByteStream(trio.SocketStream(left))
        await right.send(b"m" * MESSAGE * 20)
        await trio.testing.wait_all_tasks_blocked()
        assert PASS_MESSAGES == 8
        # 20 buffered: passes of 8, the next message always waiting in the buffer
        assert await read_marking_passes(reader, 20) == [8, 16]
        assert not reader.pass_done()  # nothing buffered: the next read receives anyway
        # a wait for a receive starts a new pass: 12 more, ends after 8 of them
        async with trio.open_nursery() as nursery:
            nursery.start_soon(right.send, b"n" * MESSAGE * 12)
            ends = await read_marking_passes(reader, 12)
        assert ends == [8]


async def test_a_stream_of_single_messages_never_ends_a_pass() -> None:
    """Depth 1: each message arrives alone, the reader waits for each — never a forced pass."""
    left, right = trio.socket.socketpair()
    with left, right:
        reader = ByteStream(trio.SocketStream(left))
        for _ in range(3 * PASS_MESSAGES):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(right.send, b"x" * MESSAGE)
                assert await read_marking_passes(reader, 1) == []
