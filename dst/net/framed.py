"""FramedStream: dst frames over a Trio stream, without copying payloads.

The reader owns a small buffer for frame heads (the 24-byte prefix and the msgpack map) and
hands the codec memoryviews of it.  Data bytes are not buffered: ``read_data_into`` copies what
already arrived with the head and then ``recv_into``s the rest straight into the caller's
buffers — the client's bio segments for a read reply, the server's pool pages for a write.
Writes go out as one ``sendmsg`` of [head, *data] under one lock, so frames never interleave.

Over TLS (``trio.SSLStream``) there is no ``recv_into``/``sendmsg``; the same interface falls
back to ``receive_some``/``send_all``, which costs one copy each way (TLS copies anyway).

Transport errors are translated once, here: a peer that hangs up or resets becomes
``trio.BrokenResourceError``; bytes that break the protocol raise ``RemoteProtocolError``
from the codec.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from dst.errors import RemoteProtocolError
from dst.wire import (
    HEADER_SIZE,
    MAX_META_LEN,
    FramePrefix,
    Message,
    parse_meta,
    parse_prefix,
)

Buffer = bytes | bytearray | memoryview

# Heads are small; the buffer holds the largest legal head plus room for the start of the
# data that often arrives in the same segment.
READ_BUFFER_SIZE = HEADER_SIZE + MAX_META_LEN + 192 * 1024
# Linux refuses sendmsg with more than IOV_MAX buffers.
IOV_MAX = 1024


class FramedStream:
    """Reads and writes dst frames on one Trio stream (TCP or TLS)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._buf = bytearray(READ_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._send_lock = trio.Lock()
        self.bytes_received = 0
        self.bytes_sent = 0

    # -- reading ---------------------------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> int:
        try:
            if self._sock is not None:
                n = await self._sock.recv_into(view)
            else:
                chunk = await self.stream.receive_some(len(view))
                n = len(chunk)
                view[:n] = chunk
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        self.bytes_received += n
        return n

    async def _fill(self, need: int) -> bool:
        """Make ``need`` bytes available at ``_start``; False on EOF before any byte."""
        while self._end - self._start < need:
            if self._start and len(self._buf) - self._start < need:
                # Compact: move the partial head to the front.
                have = self._end - self._start
                self._view[:have] = self._view[self._start : self._end]
                self._start, self._end = 0, have
            n = await self._recv_into(self._view[self._end :])
            if n == 0:
                if self._end == self._start:
                    return False
                raise RemoteProtocolError(
                    f"connection closed in the middle of a frame "
                    f"({self._end - self._start} of {need} bytes)"
                )
            self._end += n
        return True

    async def read_head(self) -> tuple[FramePrefix, Message] | None:
        """The next frame's prefix and message, or None at a clean end of stream.

        The frame's data (``prefix.data_len`` bytes) must be consumed next, with
        ``read_data_into`` or ``skip_data``.
        """
        if not await self._fill(HEADER_SIZE):
            return None
        prefix = parse_prefix(self._view[self._start : self._start + HEADER_SIZE])
        total = HEADER_SIZE + prefix.meta_len
        await self._fill(total)
        meta = self._view[self._start + HEADER_SIZE : self._start + total]
        message = parse_meta(prefix, meta)
        self._start += total
        if self._start == self._end:
            self._start = self._end = 0
        return prefix, message

    async def read_data_into(self, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order with the next data bytes, straight from the socket: what
        arrived with the head is copied, the rest lands with one ``recvmsg_into`` per
        IOV_MAX buffers rather than one syscall per page."""
        pending: list[memoryview] = []
        for view in views:
            got = min(len(view), self._end - self._start)
            if got:
                view[:got] = self._view[self._start : self._start + got]
                self._start += got
                if self._start == self._end:
                    self._start = self._end = 0
            if got < len(view):
                pending.append(view[got:] if got else view)
        i = 0
        while i < len(pending):
            if self._sock is not None:
                try:
                    n = (await self._sock.recvmsg_into(pending[i : i + IOV_MAX]))[0]
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
                self.bytes_received += n
            else:
                n = await self._recv_into(pending[i])
            if n == 0:
                missing = sum(len(v) for v in pending[i:])
                raise RemoteProtocolError(
                    f"connection closed in the middle of frame data ({missing} bytes missing)"
                )
            while n:
                size = len(pending[i])
                if n >= size:
                    n -= size
                    i += 1
                else:
                    pending[i] = pending[i][n:]
                    n = 0

    async def skip_data(self, length: int) -> None:
        """Discard ``length`` data bytes (a refused request's payload)."""
        scratch = memoryview(bytearray(min(length, 256 * 1024)))
        while length:
            part = scratch[: min(length, len(scratch))]
            await self.read_data_into([part])
            length -= len(part)

    # -- writing ---------------------------------------------------------------------------

    async def send(self, head: bytes, data: Sequence[Buffer] = ()) -> None:
        """Send one frame: ``head`` from ``encode_frame`` and its data buffers."""
        async with self._send_lock:
            try:
                if self._sock is None:
                    await self.stream.send_all(b"".join([head, *data]) if data else head)
                    self.bytes_sent += len(head) + sum(len(d) for d in data)
                    return
                bufs = [memoryview(head), *(memoryview(d).cast("B") for d in data)]
                await self._sendmsg_all(bufs)
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    async def _sendmsg_all(self, bufs: list[memoryview]) -> None:
        assert self._sock is not None
        i = 0
        while i < len(bufs):
            sent = await self._sock.sendmsg(bufs[i : i + IOV_MAX])
            self.bytes_sent += sent
            while sent:
                n = len(bufs[i])
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    bufs[i] = bufs[i][sent:]
                    sent = 0
            while i < len(bufs) and not len(bufs[i]):
                i += 1

    async def aclose(self) -> None:
        await self.stream.aclose()


def describe(exc: BaseException) -> str:
    """A transport error's reason for a log line: trio's Broken/Closed errors are often empty
    and wrap the real one (an SSLError, a reset)."""
    cause = exc.__cause__ or exc.__context__
    return str(exc) or (repr(cause) if cause else type(exc).__name__)
