"""A small Trio NBD client for the chaos workload's ``nbd://`` target.

Fixed newstyle handshake (NBD_OPT_STARTTLS first when given a ``dst certs`` directory, as
the lab's bridges require) with NBD_OPT_EXPORT_NAME and simple replies, requests pipelined
(queue depth > 1), replies matched by cookie.  It presents ``submit(bio)`` like dst's block
layers, so the workload drives it the same way as a RemoteVolume.  When the connection dies
(the bridge was killed) every request without a reply raises :class:`Lost` — its outcome is
unknown, and the workload leaves it so in the history — and the next submit reconnects.
Constants come from dst.nbd.protocol.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import trio

from dst.block import Bio, Op
from dst.errors import BlockError
from dst.nbd import protocol as p
from dst.security.tls import TlsConfig, client_context


class Lost(Exception):
    """The connection died before this request was answered: it may or may not have landed."""


class NbdVolume:
    def __init__(self, host: str, port: int, export: str, tls: Path | None = None) -> None:
        self.host, self.port, self.export = host, port, export
        self.tls = TlsConfig.load(tls) if tls is not None else None
        self.epoch = 0
        self.size = 0
        self._stream: trio.abc.Stream | None = None
        self._pending: dict[int, tuple[trio.Event, list[object]]] = {}
        self._cookies = itertools.count(1)
        self._send_lock = trio.Lock()
        self._connect_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    async def _recv_exactly(self, stream: trio.abc.Stream, n: int) -> bytearray:
        buf = bytearray()
        while len(buf) < n:
            chunk = await stream.receive_some(n - len(buf))
            if not chunk:
                raise trio.BrokenResourceError("NBD server closed the connection")
            buf += chunk
        return buf

    async def connect(self, nursery: trio.Nursery, timeout_s: float = 60) -> None:
        self._nursery = nursery
        async with self._connect_lock:
            if self._stream is not None:
                return
            with trio.fail_after(timeout_s):
                while True:
                    try:
                        stream = await self._handshake(
                            await trio.open_tcp_stream(self.host, self.port)
                        )
                        break
                    except (OSError, trio.BrokenResourceError):
                        await trio.sleep(0.1)
            self._stream = stream
            nursery.start_soon(self._reader, stream)

    async def _handshake(self, tcp: trio.SocketStream) -> trio.abc.Stream:
        stream: trio.abc.Stream = tcp
        magic, opt, flags = p.GREETING.unpack(await self._recv_exactly(stream, p.GREETING.size))
        if magic != p.NBDMAGIC or opt != p.IHAVEOPT or not flags & p.FLAG_FIXED_NEWSTYLE:
            raise trio.BrokenResourceError("not a fixed-newstyle NBD server")
        await stream.send_all(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        if self.tls is not None:
            await stream.send_all(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Option.STARTTLS, 0))
            ack = await self._recv_exactly(stream, p.OPTION_REPLY_HEADER.size)
            magic, _opt, rep, length = p.OPTION_REPLY_HEADER.unpack(ack)
            if magic != p.OPTION_REPLY_MAGIC or rep != p.Reply.ACK or length:
                raise trio.BrokenResourceError(f"STARTTLS refused (reply {rep:#x})")
            tls = trio.SSLStream(tcp, client_context(self.tls), server_hostname=self.host)
            await tls.do_handshake()
            stream = tls
        name = self.export.encode()
        head = p.OPTION_HEADER.pack(p.IHAVEOPT, p.Option.EXPORT_NAME, len(name))
        await stream.send_all(head + name)
        reply = await self._recv_exactly(stream, p.EXPORT_NAME_REPLY.size)
        self.size, _flags = p.EXPORT_NAME_REPLY.unpack(reply)
        return stream

    async def _reader(self, stream: trio.abc.Stream) -> None:
        try:
            while True:
                head = await self._recv_exactly(stream, p.SIMPLE_REPLY.size)
                magic, error, cookie = p.SIMPLE_REPLY.unpack(head)
                if magic != p.SIMPLE_REPLY_MAGIC:
                    raise trio.BrokenResourceError(f"bad reply magic {magic:#x}")
                event, slot = self._pending.pop(cookie)
                want = slot[1]
                assert isinstance(want, int)
                data = await self._recv_exactly(stream, want) if want and not error else None
                slot[:] = [error, data]
                event.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self._stream is stream:
                self._stream = None
            await stream.aclose()
            for event, slot in self._pending.values():
                slot[:] = ["lost", None]
                event.set()
            self._pending.clear()

    async def submit(self, bio: Bio) -> None:
        if self._stream is None:
            assert self._nursery is not None
            await self.connect(self._nursery)
        stream = self._stream
        assert stream is not None
        cookie = next(self._cookies)
        kind = {Op.READ: p.Command.READ, Op.WRITE: p.Command.WRITE, Op.FLUSH: p.Command.FLUSH}
        req = p.REQUEST.pack(p.REQUEST_MAGIC, 0, kind[bio.op], cookie, bio.offset, bio.length)
        event = trio.Event()
        slot: list[object] = [None, bio.length if bio.op is Op.READ else 0]
        self._pending[cookie] = (event, slot)
        try:
            async with self._send_lock:
                await stream.send_all(req + bio.data() if bio.op is Op.WRITE else req)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._pending.pop(cookie, None)
            raise Lost(str(exc)) from exc
        await event.wait()
        error, data = slot
        if error == "lost":
            raise Lost("connection died before the reply")
        if error:
            assert isinstance(error, int)
            raise BlockError(error, "NBD error reply")
        if isinstance(data, bytearray):
            at = 0
            for seg in bio.segments:
                seg.buf[seg.offset : seg.offset + seg.length] = data[at : at + seg.length]
                at += seg.length

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
