"""ByteStream: a Trio stream read and written for a data path, shared by every protocol.

Small reads (a dst frame head, an NBD request header) come out of one buffer as memoryviews;
payloads are not buffered: ``read_into`` copies what already arrived and ``recvmsg_into``s the
rest straight into the caller's buffers, IOV_MAX at a time.  Writes go out as one ``sendmsg``
of all their parts under one lock, so messages never interleave.  Over TLS
(``trio.SSLStream``) there is no ``recv_into``/``sendmsg``: the same interface falls back to
``receive_some``/``send_all``, one copy each way (TLS copies anyway).

Transport errors are translated once, here: a peer that hangs up or resets becomes
``trio.BrokenResourceError``; a stream that ends in the middle of a message raises
``RemoteProtocolError`` naming what was cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from dst.errors import RemoteProtocolError

Buffer = bytes | bytearray | memoryview

#: The buffer holds the largest head any protocol reads whole (a dst frame: 24 bytes + 64 KiB
#: of meta) plus room for the start of the data that often arrives with it.
READ_BUFFER_SIZE = 24 + 64 * 1024 + 192 * 1024
#: Linux refuses sendmsg/recvmsg with more than IOV_MAX buffers.
IOV_MAX = 1024
#: Bytes discarded per read when skipping a refused payload.
SKIP_CHUNK = 256 * 1024


class ByteStream:
    """Buffered reads of small heads, zero-copy payloads, one ``sendmsg`` per message."""

    def __init__(self, stream: trio.abc.Stream, *, initial: bytes = b"") -> None:
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._view = memoryview(bytearray(max(READ_BUFFER_SIZE, len(initial))))
        self._view[: len(initial)] = initial
        self._start, self._end = 0, len(initial)
        self._send_lock = trio.Lock()
        self.bytes_received = 0
        self.bytes_sent = 0

    async def _recv_into(self, views: Sequence[memoryview]) -> int:
        try:
            if self._sock is not None:
                n: int = (await self._sock.recvmsg_into(views[:IOV_MAX]))[0]
            else:
                chunk = await self.stream.receive_some(len(views[0]))
                n = len(chunk)
                views[0][:n] = chunk
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        self.bytes_received += n
        return n

    async def read_first(self, n: int, what: str) -> memoryview | None:
        """The first ``n`` bytes of a message, like ``read_exact``, or None if the stream
        ends cleanly before any of them (the peer closed between messages)."""
        return await self._read(n, what, eof_ok=True)

    async def read_exact(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes as a view into the buffer, valid until the next read."""
        view = await self._read(n, what, eof_ok=False)
        assert view is not None
        return view

    async def _read(self, n: int, what: str, *, eof_ok: bool) -> memoryview | None:
        while self._end - self._start < n:
            if self._start and len(self._view) - self._start < n:
                have = self._end - self._start  # compact: move the partial head to the front
                self._view[:have] = self._view[self._start : self._end]
                self._start, self._end = 0, have
            got = await self._recv_into([self._view[self._end :]])
            if got == 0:
                if self._end == self._start and eof_ok:
                    return None
                raise RemoteProtocolError(
                    f"connection closed in the middle of a {what} "
                    f"({self._end - self._start} of {n} bytes)"
                )
            self._end += got
        view = self._view[self._start : self._start + n]
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return view

    async def read_into(self, views: Sequence[memoryview], what: str) -> None:
        """Fill ``views`` in order with the next bytes: what arrived already is copied, the
        rest lands with one ``recvmsg_into`` per IOV_MAX buffers, not one syscall per page."""
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
            n = await self._recv_into(pending[i:])
            if n == 0:
                missing = sum(len(v) for v in pending[i:])
                raise RemoteProtocolError(
                    f"connection closed in the middle of {what} ({missing} bytes missing)"
                )
            while n:
                size = len(pending[i])
                if n >= size:
                    n -= size
                    i += 1
                else:
                    pending[i] = pending[i][n:]
                    n = 0

    async def skip(self, length: int, what: str) -> None:
        """Discard ``length`` bytes (a refused request's payload)."""
        scratch = memoryview(bytearray(min(length, SKIP_CHUNK)))
        while length:
            part = scratch[: min(length, len(scratch))]
            await self.read_into([part], what)
            length -= len(part)

    async def send_parts(self, parts: Sequence[Buffer]) -> None:
        """Send ``parts`` back to back as one message."""
        async with self._send_lock:
            try:
                if self._sock is None:
                    await self.stream.send_all(b"".join(parts) if len(parts) > 1 else parts[0])
                    self.bytes_sent += sum(len(p) for p in parts)
                    return
                bufs = [memoryview(p).cast("B") for p in parts if len(p)]
                i = 0
                while i < len(bufs):
                    sent = await self._sock.sendmsg(bufs[i : i + IOV_MAX])
                    self.bytes_sent += sent
                    while i < len(bufs) and sent >= len(bufs[i]):
                        sent -= len(bufs[i])
                        i += 1
                    if sent:
                        bufs[i] = bufs[i][sent:]
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    async def aclose(self) -> None:
        await self.stream.aclose()


def describe(exc: BaseException) -> str:
    """A transport error's reason for a log line: trio's Broken/Closed errors are often empty
    and wrap the real one (an SSLError, a reset)."""
    cause = exc.__cause__ or exc.__context__
    return str(exc) or (repr(cause) if cause else type(exc).__name__)
