"""FaultProxy: a TCP proxy between a dst client and server that breaks whole frames.

Byte-level chaos (cutting a stream at a random offset) mostly tests the frame decoder; the
faults dst must survive in a network are frame-shaped — a write frame lost, delivered twice,
replayed much later, held while the world moves on, or damaged by one bit.  The proxy reads
each frame's 24-byte header with the codec's own :func:`dst.wire.codec.parse_prefix` (so it
tracks PROTOCOL.md, not a copy of it), gathers the meta and data it announces, and then decides
per frame, with its own ``random.Random(seed)`` so a run replays.

Plaintext only: over TLS the proxy sees ciphertext, cannot find frame boundaries, and any
change it makes is caught by TLS, not by dst — so TLS links cannot be proxied frame-aware.

Each connection has two pumps (client → server = ``upstream``, server → client =
``downstream``); a pump's reader parses frames into a queue and its sender forwards them, so
holding or delaying frames never stops the proxy from seeing EOF.  Settings live on the shared
:class:`Direction` objects and apply at once to every connection.  Handshake frames (Hello,
Welcome, Attach, Attached) are spared by default (``spare_handshake``) so links come up.
"""

from __future__ import annotations

import math
import random
import socket
import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from dst.errors import RemoteProtocolError
from dst.net.endpoints import Address
from dst.wire.codec import HEADER_SIZE, FramePrefix, parse_prefix
from dst.wire.messages import MsgType

__all__ = ["Direction", "FaultProxy", "FrameHeader", "replies", "writes"]

#: The parsed header an ``only`` filter sees (type, flags, meta and data lengths, crcs).
FrameHeader = FramePrefix
HANDSHAKE = frozenset({MsgType.HELLO, MsgType.WELCOME, MsgType.ATTACH, MsgType.ATTACHED})
REPLAY_HISTORY = 64


def writes(header: FrameHeader) -> bool:
    """An ``only`` filter: WRITE frames."""
    return header.msg_type == MsgType.WRITE


def replies(header: FrameHeader) -> bool:
    """An ``only`` filter: Reply frames."""
    return header.msg_type == MsgType.REPLY


@dataclass(eq=False)
class Direction:
    """The faults applied to frames going one way; change any field while running."""

    delay_s: float = 0.0
    drop_p: float = 0.0
    blackhole: bool = False
    bitflip_p: float = 0.0
    duplicate_p: float = 0.0
    replay_p: float = 0.0
    close_after_bytes: int | None = None
    only: Callable[[FrameHeader], bool] | None = None
    spare_handshake: bool = True
    _hold: bool = False
    _wake: trio.Event = field(default_factory=trio.Event)

    @property
    def hold(self) -> bool:
        """Queue frames and forward nothing (frames read so far and later stay in order)."""
        return self._hold

    @hold.setter
    def hold(self, value: bool) -> None:
        self._hold = value
        if not value:
            self._wake.set()
            self._wake = trio.Event()

    def release(self) -> None:
        """Send the held frames, in order, then pass frames through."""
        self.hold = False

    def eligible(self, header: FrameHeader) -> bool:
        if self.spare_handshake and header.msg_type in HANDSHAKE:
            return False
        return self.only is None or self.only(header)


@dataclass(eq=False)
class _Frame:
    header: FrameHeader
    raw: bytes
    read_at: float


class _Connection:
    def __init__(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        self.client = client
        self.server = server
        self.scope = trio.CancelScope()
        self.reset = False


def _rst(stream: trio.SocketStream) -> None:
    """Make the coming close send RST instead of FIN."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already gone


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``, frame by frame, with faults.

    ``await nursery.start(proxy.serve)`` binds and returns the listening address.
    """

    def __init__(self, upstream: Address, *, seed: int) -> None:
        self.target = upstream
        self.rng = random.Random(seed)
        self.upstream = Direction()  # client -> server
        self.downstream = Direction()  # server -> client
        self.counts: Counter[str] = Counter()
        self._connections: set[_Connection] = set()
        self._scope: trio.CancelScope | None = None
        self._closed = False

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._scope:
            if self._closed:
                self._scope.cancel()
            async with trio.open_nursery() as nursery:
                task_status.started(Address("127.0.0.1", port))
                async with listeners[0]:
                    while True:
                        client = await listeners[0].accept()
                        nursery.start_soon(self._handle, client)

    def reset(self) -> None:
        """RST every open connection (SO_LINGER 0); new connections are still accepted."""
        for conn in list(self._connections):
            conn.reset = True
            conn.scope.cancel()
        self.counts["reset"] += 1

    def close(self) -> None:
        """Stop accepting and drop every connection (RST)."""
        self._closed = True
        for conn in list(self._connections):
            conn.reset = True
            conn.scope.cancel()
        if self._scope is not None:
            self._scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        sock = trio.socket.socket()
        try:
            await sock.connect((self.target.host, self.target.port))
            server = trio.SocketStream(sock)
        except BaseException as exc:  # refused, or the proxy closed meanwhile
            sock.close()
            _rst(client)
            client.socket.close()
            if isinstance(exc, OSError):
                return
            raise
        conn = _Connection(client, server)
        self._connections.add(conn)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, conn, client, server, self.upstream)
                    nursery.start_soon(self._pump, conn, server, client, self.downstream)
        finally:
            self._connections.discard(conn)
            if conn.reset:
                _rst(client)
                _rst(server)
            # synchronously: an await here would be cancelled before closing anything
            client.socket.close()
            server.socket.close()

    async def _pump(
        self,
        conn: _Connection,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        d: Direction,
    ) -> None:
        send, receive = trio.open_memory_channel[_Frame | None](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_frames, source, send)
            await self._send_frames(conn, receive, sink, d)
            nursery.cancel_scope.cancel()
        # This direction ended (EOF, or cut by close_after_bytes): end the connection.
        conn.scope.cancel()

    async def _read_frames(
        self, source: trio.SocketStream, out: trio.MemorySendChannel[_Frame | None]
    ) -> None:
        buf = bytearray()
        try:
            while True:
                while len(buf) < HEADER_SIZE:
                    chunk = await source.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                header = parse_prefix(bytes(buf[:HEADER_SIZE]))
                size = HEADER_SIZE + header.meta_len + header.data_len
                while len(buf) < size:
                    chunk = await source.receive_some(max(65536, size - len(buf)))
                    if not chunk:
                        return
                    buf += chunk
                out.send_nowait(_Frame(header, bytes(buf[:size]), trio.current_time()))
                del buf[:size]
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
            return
        finally:
            # A stream that is not frames (or was cut mid-frame) ends here too.
            out.send_nowait(None)

    async def _send_frames(
        self,
        conn: _Connection,
        frames: trio.MemoryReceiveChannel[_Frame | None],
        sink: trio.SocketStream,
        d: Direction,
    ) -> None:
        history: deque[bytes] = deque(maxlen=REPLAY_HISTORY)
        sent = 0
        async for frame in frames:
            if frame is None:
                return
            faulty = d.eligible(frame.header)
            while faulty and d.hold:
                self.counts["hold"] += 1
                await d._wake.wait()
            if faulty and d.delay_s > 0:
                self.counts["delay"] += 1
                await trio.sleep_until(frame.read_at + d.delay_s)
            out = self._decide(frame.raw, faulty, d, history)
            for raw in out:
                if d.close_after_bytes is not None and sent + len(raw) > d.close_after_bytes:
                    cut = max(0, d.close_after_bytes - sent)
                    await self._send(sink, raw[:cut])
                    self.counts["close"] += 1
                    return
                await self._send(sink, raw)
                sent += len(raw)
            if faulty:
                history.append(frame.raw)

    def _decide(self, raw: bytes, faulty: bool, d: Direction, history: deque[bytes]) -> list[bytes]:
        """The byte strings to send for one frame (none if it is swallowed)."""
        if not faulty:
            return [raw]
        rng = self.rng
        if d.blackhole:
            self.counts["blackhole"] += 1
            return []
        if d.drop_p and rng.random() < d.drop_p:
            self.counts["drop"] += 1
            return []
        out = [raw]
        if d.bitflip_p and rng.random() < d.bitflip_p:
            flipped = bytearray(raw)
            bit = rng.randrange(len(raw) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
            out = [bytes(flipped)]
            self.counts["bitflip"] += 1
        if d.duplicate_p and rng.random() < d.duplicate_p:
            out.append(raw)
            self.counts["duplicate"] += 1
        if d.replay_p and history and rng.random() < d.replay_p:
            out.append(rng.choice(history))
            self.counts["replay"] += 1
        return out

    async def _send(self, sink: trio.SocketStream, raw: bytes) -> None:
        if raw:
            try:
                await sink.send_all(raw)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reader of that side will see it too and end the connection
