"""Link: one live, attached connection from a client to a server.

A link is born by ``open_link`` (TCP/TLS connect, Hello → Welcome, Attach → Attached) and
dies once: the first failure anywhere — the reader hitting EOF or a bad frame, a send that
fails, keepalive silence — calls ``broken(reason)`` and the supervisor in ``remote.py``
replaces it.  The reader task is the only one that receives; it resolves replies by
(tid, sub) and receives a read's data straight into the bio's buffers.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import trio

from dst.block import Limits
from dst.errors import BlockError, ProtocolError
from dst.net.convert import limits_from_wire, limits_to_wire
from dst.net.endpoints import Address, connect
from dst.net.framed import Buffer, FramedStream
from dst.security.tls import TlsConfig
from dst.wire import (
    PROTOCOL_VERSION,
    Attach,
    Attached,
    Connection,
    Errno,
    Goodbye,
    Hello,
    Message,
    Ping,
    Pong,
    Received,
    Reply,
    StatusReply,
    SyncRequest,
    Welcome,
    check_data,
    encode_frame,
)

if TYPE_CHECKING:
    from dst.client.remote import RemoteVolume

log = logging.getLogger("dst.client")
T = TypeVar("T")

FEATURES = ("fua", "flush", "trim", "write_zeroes", "epoch")
# Hello, Welcome, Attach and Attached must all happen within this time.
SETUP_TIMEOUT_S = 10.0


class LinkBroken(Exception):
    """Internal: the link is dead; the supervisor will replace it."""


class Link:
    def __init__(
        self,
        framed: FramedStream,
        conn: Connection,
        welcome: Welcome,
        attached: Attached,
        generation: int,
        owner: RemoteVolume,
    ) -> None:
        self.framed = framed
        self.conn = conn
        self.handle = attached.handle
        self.epoch = attached.epoch
        self.size = attached.size
        self.limits: Limits = limits_from_wire(attached.limits)
        self.max_inflight = welcome.max_inflight
        self.server_node = welcome.node_id
        self.server_page_size = welcome.page_size
        self.generation = generation
        self.owner = owner
        framed.in_flight = owner.in_flight
        self.reason = ""
        # Administration calls on this link (SyncRequest): tid -> [done, answer].
        self._calls: dict[int, tuple[trio.Event, list[Message]]] = {}
        self._broken = trio.Event()
        self._last_rx = trio.current_time()
        self._ping_token = 0

    def broken(self, reason: str) -> None:
        if not self._broken.is_set():
            self.reason = reason
            self._broken.set()
            for done, _ in self._calls.values():
                done.set()

    async def call(self, msg: SyncRequest, timeout_s: float | None = None) -> StatusReply:
        """Send an administration request on this live link and wait for its StatusReply;
        an error Reply raises BlockError, a broken link LinkBroken.  A request unanswered
        after ``timeout_s`` (a lost frame on a link whose keepalives still pass) breaks the
        link: the next one starts with a fresh handshake instead of waiting forever."""
        done, answer = trio.Event(), list[Message]()
        self._calls[msg.tid] = (done, answer)
        try:
            await self.send(msg)
            with trio.move_on_after(math.inf if timeout_s is None else timeout_s) as scope:
                await done.wait()
            if scope.cancelled_caught:
                self.broken(f"sync {msg.action!r} unanswered for {timeout_s:.1f} s")
        finally:
            del self._calls[msg.tid]
        if not answer:
            raise LinkBroken(self.reason)
        reply = answer[0]
        if isinstance(reply, Reply):
            raise BlockError(reply.errno or errno.EIO, reply.message)
        assert isinstance(reply, StatusReply)
        return reply

    async def wait_broken(self) -> None:
        await self._broken.wait()

    async def send(self, msg: Message, data: Sequence[Buffer] = ()) -> None:
        await self.send_many(((msg, data),))

    async def send_many(self, frames: Sequence[tuple[Message, Sequence[Buffer]]]) -> None:
        """Send frames back to back in one gathered write (a transaction's commands)."""
        if self._broken.is_set():
            raise LinkBroken(self.reason)
        parts: list[Buffer] = []
        for msg, data in frames:
            self.conn.send(msg)
            parts.append(encode_frame(msg, data))
            parts.extend(data)
        await self.framed.send_parts(parts)

    async def run_reader(self) -> None:
        try:
            await self._read_loop()
        except ProtocolError as exc:
            self.broken(f"protocol error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.broken(f"connection lost: {exc}")

    async def _read_loop(self) -> None:
        while True:
            if self.framed.pass_done():  # the replies so far go on (dst.net.stream)
                await trio.lowlevel.checkpoint()
            head = await self.framed.read_head()
            if head is None:
                self.broken("server closed the connection")
                return
            self._last_rx = trio.current_time()
            prefix, raw = head
            if isinstance(raw, Goodbye):
                self.broken(f"server said goodbye: {raw.message} (errno {raw.errno})")
                return
            msg = self.conn.receive(prefix, raw)
            call = self._calls.get(msg.tid) if isinstance(msg, Reply | StatusReply) else None
            if call is not None:
                await self.framed.skip_data(prefix.data_len)
                call[1].append(msg)
                call[0].set()
            elif isinstance(msg, Reply) and msg.errno == Errno.EEXIST:
                # the answer to a network-made copy of a request (Connection): the request
                # itself is still in flight and will be answered
                log.warning(
                    "server=%s tid=%d sub=%d event=duplicate_frame",
                    self.server_node,
                    msg.tid,
                    msg.sub,
                )
                await self.framed.skip_data(prefix.data_len)
            elif isinstance(msg, Reply):
                cmd = self.owner.on_reply(msg)
                if cmd is None:  # answered already (e.g. duplicate after resend)
                    await self.framed.skip_data(prefix.data_len)
                    continue
                if prefix.data_len:
                    if msg.errno or prefix.data_len != cmd.piece.length:
                        raise ProtocolError(
                            f"reply tid={msg.tid} sub={msg.sub} carries {prefix.data_len} "
                            f"data bytes; expected {cmd.piece.length if not msg.errno else 0}"
                        )
                    views = cmd.piece.views()
                    await self.framed.read_data_into(views)
                    check_data(prefix, views)
                self.owner.on_done(cmd, msg)
            elif isinstance(msg, Received):
                self.owner.on_received(msg)
            elif isinstance(msg, Ping):
                await self.send(Pong(token=msg.token))
            else:
                await self.framed.skip_data(prefix.data_len)

    async def run_keepalive(self, interval_s: float, dead_after_s: float) -> None:
        """Ping when idle; declare the link dead after ``dead_after_s`` of silence."""
        while True:
            await trio.sleep(interval_s)
            idle = trio.current_time() - self._last_rx
            if idle >= dead_after_s:
                self.broken(f"no frame from the server for {idle:.1f} s")
                return
            if idle >= interval_s:
                self._ping_token += 1
                try:
                    await self.send(Ping(token=self._ping_token))
                except (LinkBroken, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.broken(f"ping failed: {exc}")
                    return


async def open_link(
    address: Address,
    volume: str,
    *,
    tls: TlsConfig | None,
    role: str,
    node_id: str,
    page_size: int,
    generation: int,
    tid: int,
    owner: RemoteVolume,
    claim: str = "share",
    epoch: int = 0,
) -> Link:
    framed, _server_role = await connect(address, tls)
    try:
        with trio.fail_after(SETUP_TIMEOUT_S):
            conn, welcome = await handshake(framed, role=role, node_id=node_id, page_size=page_size)
            attach = Attach(tid=tid, volume=volume, epoch=epoch, claim=claim)
            attached = await request(framed, conn, attach, Attached)
    except BaseException:
        await trio.aclose_forcefully(framed.stream)
        raise
    return Link(framed, conn, welcome, attached, generation, owner)


async def handshake(
    framed: FramedStream, *, role: str, node_id: str, page_size: int
) -> tuple[Connection, Welcome]:
    """Hello → Welcome on a fresh stream (the caller bounds the time)."""
    conn = Connection("client")
    hello = Hello(
        versions=(PROTOCOL_VERSION, PROTOCOL_VERSION),
        node_id=node_id,
        role=role,
        page_size=page_size,
        limits=limits_to_wire(Limits(page_size=page_size)),
        features=FEATURES,
        max_inflight=0,
    )
    return conn, await request(framed, conn, hello, Welcome)


async def request(framed: FramedStream, conn: Connection, msg: Message, kind: type[T]) -> T:
    """Send ``msg`` and return the answer, which must be a ``kind`` (see ``expect``); for the
    one-at-a-time exchanges of setup and administration, not the pipelined data path."""
    conn.send(msg)
    await framed.send(encode_frame(msg))
    return await expect(framed, conn, kind)


async def expect(framed: FramedStream, conn: Connection, kind: type[T]) -> T:
    """The next message, which must be a ``kind`` (a Goodbye or error Reply raises)."""
    head = await framed.read_head()
    if head is None:
        raise trio.BrokenResourceError("server closed the connection during setup")
    prefix, raw = head
    if isinstance(raw, Goodbye):
        raise BlockError(raw.errno or errno.EIO, f"server refused: {raw.message}")
    msg = conn.receive(prefix, raw)
    await framed.skip_data(prefix.data_len)
    if isinstance(msg, Reply) and msg.errno:
        raise BlockError(msg.errno, msg.message)
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg
