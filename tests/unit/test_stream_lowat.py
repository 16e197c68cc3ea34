"""ByteStream.read_into over real loopback TCP: a payload that arrives in pieces is waited for
with SO_RCVLOWAT raised to what is missing, so the reader wakes once when it is all there — not
once per piece — and the mark is back to one byte afterwards; a peer that closes in the middle
still wakes it, with an error naming what was cut."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from dst.errors import RemoteProtocolError
from dst.net.stream import LOWAT_MIN, ByteStream

PIECE = 64 * 1024


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    async with client, server:
        yield client, server
    await listeners[0].aclose()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The receive low-water mark at each wait of a stream's reads."""
    marks: list[int] = []
    wait = trio.lowlevel.wait_readable

    async def counted(sock: trio.socket.SocketType) -> None:
        marks.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
        await wait(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)  # as the stream looks it up
    return marks


async def send_in_pieces(sender: trio.SocketStream, data: bytes) -> None:
    for start in range(0, len(data), PIECE):
        await sender.send_all(data[start : start + PIECE])
        await trio.sleep(0.02)  # each piece on its own: the reader would wake for each


async def test_a_payload_in_pieces_is_one_wakeup(waits: list[int]) -> None:
    data = bytes(range(256)) * (4 * PIECE // 256)
    async with tcp_pair() as (sender, receiver):
        reader = ByteStream(receiver)
        buf = bytearray(len(data))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_in_pieces, sender, data)
            await reader.read_into([memoryview(buf)], "a payload")
        assert buf == data
        assert waits == [len(data)], "one wait, for the whole payload"
        assert receiver.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        # A small payload (under LOWAT_MIN) waits as before: the mark stays at one byte.
        waits.clear()
        small = b"s" * (LOWAT_MIN // 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, small)
            part = bytearray(len(small))
            await reader.read_into([memoryview(part)], "a small payload")
        assert part == small and set(waits) <= {1}


async def test_a_peer_that_closes_mid_payload_still_wakes_the_reader(waits: list[int]) -> None:
    async with tcp_pair() as (sender, receiver):
        reader = ByteStream(receiver)
        buf = bytearray(4 * PIECE)
        await sender.send_all(b"x" * PIECE)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def close_soon() -> None:
                    await trio.sleep(0.05)
                    await sender.aclose()

                nursery.start_soon(close_soon)
                with pytest.raises(RemoteProtocolError, match="a payload"):
                    await reader.read_into([memoryview(buf)], "a payload")
        assert waits and waits[-1] == 3 * PIECE
