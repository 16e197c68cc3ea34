"""FramedStream: dst frames over a ByteStream, without copying payloads.

The head (24-byte prefix, then the msgpack map) is read as views of the stream's buffer and
handed to the sans-IO codec; the frame's data is then received straight into the caller's
buffers — the client's bio segments for a read reply, the server's pool pages for a write —
and a frame goes out as one ``writev`` of [head, *data], coalesced with frames queued with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from dst.net.stream import Buffer, ByteStream, describe
from dst.wire import HEADER_SIZE, FramePrefix, Message, parse_meta, parse_prefix

__all__ = ["Buffer", "FramedStream", "describe"]

#: Where the prefix (proto/PROTOCOL.md) keeps the message's length: after magic, version,
#: type and flags, a big-endian u32.
_META_LEN_AT = 8


class FramedStream(ByteStream):
    """Reads and writes dst frames on one Trio stream (TCP or TLS)."""

    async def read_head(self) -> tuple[FramePrefix, Message] | None:
        """The next frame's prefix and message, or None at a clean end of stream.

        The frame's data (``prefix.data_len`` bytes) must be consumed next, with
        ``read_data_into`` or ``skip_data``.
        """
        raw = await self.read_first(HEADER_SIZE, "frame")
        if raw is None:
            return None
        prefix = parse_prefix(raw)
        meta = await self.read_exact(prefix.meta_len, "frame") if prefix.meta_len else b""
        return prefix, parse_meta(prefix, meta)

    @property
    def head_buffered(self) -> bool:
        """The next frame's prefix and message have arrived: ``read_head`` takes no receive
        (a server's reader flushes its plug before one that may wait)."""
        have = self._end - self._start
        if have < HEADER_SIZE:
            return False
        at = self._start + _META_LEN_AT
        return have >= HEADER_SIZE + int.from_bytes(self._view[at : at + 4], "big")

    async def read_data_into(self, views: Sequence[memoryview]) -> None:
        await self.read_into(views, "frame data")

    async def skip_data(self, length: int) -> None:
        await self.skip(length, "frame data")

    async def send(self, head: bytes, data: Sequence[Buffer] = ()) -> None:
        """Send one frame: ``head`` from ``encode_frame`` and its data buffers."""
        await self.send_parts([head, *data])
