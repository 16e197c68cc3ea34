"""One client connection on a server: handshake, then many requests in flight.

The reader task owns the socket's receive side.  For each request it takes an in-flight slot
(a semaphore of ``max_inflight``, announced in Welcome) and, for a write, pool pages, then
reads the data straight into those pages.  A request the volume's stack completes at once
(``submit_nowait``: a cached read, a small write into the page cache) is done right there and
its reply queued; before the reader waits for anything it sends the queued replies in one
write, or, if the socket cannot take them at once, wakes the answering task to.  On a
replication primary a WRITE is started (``start``): its command to the peer waits in the
session's plug until the reader would wait for anything, so the writes of one receive reach
the peer in one send, and its completion callback queues its reply for the answering task
(or sends it, if it is the only request out).  Any other request runs in a task of its own
(``dst/server/requests.py``).  Replies go out in completion order.
When slots or pages run out the reader simply stops reading: backpressure reaches the client
through TCP, and memory stays bounded.

Bad requests the codec could still attribute to a (tid, sub) are answered with an errno and
the connection goes on; a frame that cannot be trusted (bad crc, bad header, garbage) closes
this connection with a log line naming the problem.  Nothing here can take the server down:
every failure is confined to its connection.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio

from dst.block import Bio, Op, Plug, StartingLayer
from dst.errors import BlockError, FencedError, ProtocolError
from dst.fence.replay import ReplayWindow
from dst.net.framed import Buffer, FramedStream, describe
from dst.replication.peer import REPLICATION_NODE_SUFFIX
from dst.server import handlers
from dst.server.pool import Pages
from dst.server.requests import OPS, Answer, DataRequest, checked_bio, complete_now, submit
from dst.wire import (
    Attach,
    BadRequest,
    ChecksumRequest,
    Connection,
    FlushRequest,
    FrameFlags,
    Goodbye,
    Message,
    Ping,
    Pong,
    PromoteRequest,
    ReadRequest,
    Received,
    Reply,
    StatusRequest,
    SyncRequest,
    WriteRequest,
    check_data,
    encode_frame,
)

if TYPE_CHECKING:
    from dst.server.server import Server
    from dst.server.volume import Volume

log = logging.getLogger("dst.server")

# A reader on its way out sends what its plug holds, for this long at most.
PLUG_FLUSH_TIMEOUT_S = 5.0


class Session:
    def __init__(self, server: Server, framed: FramedStream, tls_role: str | None, peer: str):
        self.server = server
        self.framed = framed
        self.tls_role = tls_role
        self.peer = peer
        self.conn = Connection(
            "server", max_bytes=server.limits.max_bytes, max_inflight=server.max_inflight
        )
        self.node = "?"
        self.role = "?"
        self.handles: dict[int, Volume] = {}
        self.claimed: list[Volume] = []  # volumes this session holds as their owner
        self.replays = ReplayWindow()
        self.slots = trio.Semaphore(server.max_inflight)
        #: Cancelled when a newer replication link of the same primary replaces this one.
        self.scope = trio.CancelScope()
        # Requests the reader completed itself (submit_nowait), their replies waiting for the
        # answering task, which sends all those queued in one write; the event wakes it.
        self._answers: list[Answer] = []
        self._answer_wake = trio.Event()
        self._reading = True
        self._answering = 0  # of the batch being sent, all but one: not others in flight
        # WRITEs started on a replication primary (Replicated.start) hold their commands to
        # the peer here until the reader would wait, then they leave in one send; their
        # callbacks queue their answers for the answering task.
        self._plug = Plug()
        self._started = 0  # started, not yet completed
        self._closed = False  # the session ended: a late completion retires its request
        framed.in_flight = lambda: (
            server.max_inflight - self.slots.value - self._answering - self._started
        )

    async def send(self, msg: Message, data: list[memoryview] | None = None) -> None:
        self.conn.send(msg)
        await self.framed.send(encode_frame(msg, data or ()), data or ())

    async def run(self) -> None:
        """Serve this connection until EOF or a fatal error; never raises (one bad peer must
        not take the server down), except for cancellation."""
        reason = ""
        level = logging.WARNING
        try:
            if not await handlers.handshake(self):
                return
            # A primary's replication link, as opposed to other replica-role sessions
            # (dst verify, an operator with a replica certificate).
            link = "replication" if self.node.endswith(REPLICATION_NODE_SUFFIX) else self.role
            self.server.sessions[self.role] += 1
            self.server.links[link] += 1
            try:
                with self.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._answer)
                        try:
                            await self._read_loop(nursery)
                        finally:
                            self._reading = False
                            self._answer_wake.set()
                if self.scope.cancelled_caught:
                    reason = "replaced by a newer replication link"
            finally:
                self._closed = True
                self._retire_answers(self._answers)  # left unsent by a cancelled answerer
                self.server.sessions[self.role] -= 1
                self.server.links[link] -= 1
                for volume in self.claimed:
                    volume.ownership.release(self.node)
                # Clean EOF: requests already running finish and answer before we close.
        except* ProtocolError as group:
            reason = "; ".join(str(e) for e in group.exceptions)
            self.server.stats["protocol_errors"] += 1
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            reason = "disconnected: " + "; ".join(describe(e) for e in group.exceptions)
            level = logging.INFO
        except* Exception as group:
            log.error("peer=%s node=%s event=session_failed", self.peer, self.node, exc_info=group)
            reason = "internal error"
        if reason:
            log.log(level, "peer=%s node=%s event=closed reason=%r", self.peer, self.node, reason)
        else:
            log.info("peer=%s node=%s event=closed", self.peer, self.node)

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        try:
            await self._read_requests(nursery)
        finally:  # what the plug holds must leave even when the reader fails
            if self._plug:
                with trio.CancelScope(shield=True), trio.move_on_after(PLUG_FLUSH_TIMEOUT_S):
                    await self._plug.flush()

    async def _unplug(self) -> None:
        """Before the reader waits for anything: send what its started requests hold, and
        the replies of those it completed."""
        if self._plug:
            await self._plug.flush()
        if self._answers:
            self._answer_nowait()

    def _answer_nowait(self) -> None:
        """The queued replies in one write from the reader itself, when the socket takes them
        at once; else the answering task's.  (Waking it costs a scheduler pass: at depth 1,
        a request's whole path is the CPU of each process it crosses.)"""
        batch = self._answers
        if self.framed.send_nowait(self._parts(batch)):
            self._answers = []
            self._retire_answers(batch)
            if not self.framed.unsent:
                return
        self._answer_wake.set()

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        unplug = self._unplug
        while True:
            if not self.framed.head_buffered:
                await unplug()  # the next head needs a receive, which may wait
            elif self.framed.pass_done():  # hand on what this pass read (dst.net.stream)
                await unplug()
                await trio.lowlevel.checkpoint()
            head = await self.framed.read_head()
            if head is None:
                return
            prefix, raw = head
            msg = self.conn.receive(prefix, raw)
            if isinstance(msg, Ping):
                # Answered at once, ahead of queued work, so keepalive survives a busy server.
                await unplug()
                await self.framed.send(encode_frame(Pong(token=msg.token)))
                continue
            try:  # no trip through the scheduler while slots are free: a burst of
                self.slots.acquire_nowait()  # requests is read in one pass (dst.net.stream)
            except trio.WouldBlock:
                await unplug()
                await self.slots.acquire()
            if not isinstance(msg, DataRequest):
                await unplug()  # handlers run after the requests read before them
            if isinstance(msg, BadRequest):
                await self.framed.skip_data(prefix.data_len)
                self.server.stats["bad_requests"] += 1
                log.info(
                    "peer=%s node=%s tid=%d event=bad_request errno=%d reason=%r",
                    self.peer,
                    self.node,
                    msg.tid,
                    msg.errno,
                    msg.message,
                )
                nursery.start_soon(
                    self._in_slot, self.answer, msg.tid, msg.sub, msg.errno, msg.message
                )
            elif isinstance(msg, Attach):
                nursery.start_soon(self._in_slot, handlers.attach, self, msg)
            elif isinstance(msg, StatusRequest):
                nursery.start_soon(self._in_slot, handlers.status, self, msg)
            elif isinstance(msg, ChecksumRequest):
                nursery.start_soon(self._in_slot, handlers.checksum, self, msg)
            elif isinstance(msg, PromoteRequest):
                nursery.start_soon(self._in_slot, handlers.promote, self, msg)
            elif isinstance(msg, SyncRequest):
                nursery.start_soon(self._in_slot, handlers.sync, self, msg)
            elif isinstance(msg, DataRequest):
                pages: Pages | None = None
                pool = self.server.pool
                if isinstance(msg, WriteRequest):
                    pages = pool.acquire_nowait(prefix.data_len)
                    if pages is None:
                        await unplug()
                        pages = await pool.acquire(prefix.data_len)
                    try:
                        if self.framed.buffered < prefix.data_len:
                            await unplug()
                        await self.framed.read_data_into(pages.views)
                        check_data(prefix, pages.views)
                    except BaseException:
                        pages.release()
                        raise
                    if msg.flags & FrameFlags.RECV_ACK:  # protocol B: "it is here"
                        self.server.stats["received_acks"] += 1
                        await unplug()
                        await self.send(Received(tid=msg.tid, sub=msg.sub))
                elif isinstance(msg, ReadRequest):
                    max_bytes = self.server.limits.max_bytes
                    if msg.length > max_bytes:
                        text = f"read length {msg.length} exceeds max_bytes {max_bytes}"
                        await unplug()
                        nursery.start_soon(
                            self._in_slot, self.answer, msg.tid, msg.sub, errno.E2BIG, text
                        )
                        continue
                    pages = pool.acquire_nowait(msg.length)
                    if pages is None:
                        await unplug()
                        pages = await pool.acquire(msg.length)
                volume = self.handles.get(msg.handle)
                answer = Answer(msg, volume, pages, self.server.io.begin())
                try:
                    bio = checked_bio(self, msg, volume, pages)
                    assert volume is not None
                    layer = volume.layer
                    if complete_now(layer, bio):
                        self.server.stats["completed_inline"] += 1
                        self._answered(answer, bio, None)
                    elif bio.op is Op.WRITE and getattr(layer, "can_start", False):
                        await self._start(cast(StartingLayer, layer), answer, bio)
                        continue
                    else:
                        await unplug()  # after the requests read before it
                        nursery.start_soon(self._in_slot, self._run_request, answer, bio)
                        continue
                except BlockError as exc:
                    self._answered(answer, None, exc)
                self._answers.append(answer)  # sent when the reader would wait (_unplug)
            elif isinstance(msg, Goodbye):
                self.slots.release()
                log.info(
                    "peer=%s node=%s event=goodbye reason=%r", self.peer, self.node, msg.message
                )
                return
            else:
                # Pong and anything else the Connection let through: nothing to do.
                self.slots.release()
                await unplug()
                await self.framed.skip_data(prefix.data_len)

    async def _in_slot(self, handler: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a request's handler and give its in-flight slot back, however it ends."""
        try:
            await handler(*args)
        finally:
            self.slots.release()

    async def answer(self, tid: int, sub: int, code: int, text: str) -> None:
        await self.reply(Reply(tid=tid, sub=sub, errno=code, message=text))

    async def reply(self, reply: Message, data: list[memoryview] | None = None) -> None:
        self.conn.send(reply)
        await self._send_replies([encode_frame(reply, data or ()), *(data or ())])

    async def _send_replies(self, parts: list[Buffer]) -> None:
        """Send reply frames; a peer that is gone resends what it still wants on its next
        connection, so a failed send is not the session's error."""
        try:
            await self.framed.send_parts(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _start(self, layer: StartingLayer, answer: Answer, bio: Bio) -> None:
        """Start a WRITE on a layer that can (a replication primary's); its callback queues
        it for the answering task."""
        pending = await layer.start(bio, self._plug)
        self._started += 1
        answer.bio, answer.pending = bio, pending
        pending.then(partial(self._completed, answer))

    def _completed(self, answer: Answer) -> None:
        """A started request's callback (it runs in the task that completed it)."""
        self._started -= 1
        if self._closed:  # nobody is left to answer it
            self._retire(answer)
            self.slots.release()
            return
        self._answers.append(answer)
        if not self._started and self.framed.in_flight() == 1:  # the only request out
            self._answer_nowait()
        else:
            self._answer_wake.set()

    async def _run_request(self, answer: Answer, bio: Bio) -> None:
        """A request the volume could not complete at once: submit it, then answer."""
        assert answer.volume is not None
        try:
            error = None
            try:
                await submit(answer.volume.layer, bio)
            except BlockError as exc:
                error = exc
            self._answered(answer, bio, error)
            await self._send_replies(answer.parts)
        finally:
            self._retire(answer)

    def _answered(self, answer: Answer, bio: Bio | None, error: BlockError | None) -> None:
        """Count the request (and log a failure); make its reply frame (a READ's with the
        data)."""
        msg, stats = answer.msg, self.server.stats
        if error is None:
            assert bio is not None
            op = bio.op.name.lower()
            stats[op] += 1
            stats["bytes_" + op] += bio.length
            reply = Reply(tid=msg.tid, sub=msg.sub, errno=0, message="")
            self.conn.send(reply)
            pages, answer.ok = answer.pages, True
            if pages is not None and bio.op is Op.READ:
                answer.parts = [encode_frame(reply, pages.views), *pages.views]
            else:
                answer.parts = [encode_frame(reply)]
            return
        if isinstance(error, FencedError):
            stats["stale_writes"] += 1
        stats["errors"] += 1
        # A stale epoch is the fence doing its job (INFO); anything else is news.
        log.log(
            logging.INFO if error.errno == errno.ESTALE else logging.WARNING,
            "peer=%s node=%s volume=%s tid=%d sub=%d op=%s event=request_failed errno=%d reason=%r",
            self.peer,
            self.node,
            answer.volume.name if answer.volume is not None else "-",
            msg.tid,
            msg.sub,
            OPS[type(msg)].name.lower(),
            error.errno,
            str(error),
        )
        reply = Reply(tid=msg.tid, sub=msg.sub, errno=error.errno, message=error.message)
        self.conn.send(reply)
        answer.parts = [encode_frame(reply)]

    async def _answer(self) -> None:
        """Send the queued replies the reader and the callbacks left to it, all those queued
        at once in one write; return when the reader is done and nothing is left to send."""
        while self._reading or self._answers or self._started or self.framed.unsent:
            if not self._answers:
                if self.framed.unsent:
                    await self._send_replies([])
                    continue
                await self._answer_wake.wait()
                self._answer_wake = trio.Event()
                continue
            batch, self._answers = self._answers, []
            parts = self._parts(batch)
            self._answering = len(batch) - 1
            try:
                await self._send_replies(parts)
            finally:
                self._answering = 0
                self._retire_answers(batch)

    def _parts(self, batch: list[Answer]) -> list[Buffer]:
        """The reply frames of ``batch``, a started request's made now."""
        parts: list[Buffer] = []
        for answer in batch:
            if answer.pending is not None:
                self._answered(answer, answer.bio, answer.pending.error)
                answer.pending = None
            parts += answer.parts
        return parts

    def _retire_answers(self, batch: list[Answer]) -> None:
        for answer in batch:
            self._retire(answer)
            self.slots.release()
        batch.clear()

    def _retire(self, answer: Answer) -> None:
        """A request answered (or abandoned): its pages back, its time and outcome counted —
        the one place a server request is timed and counted by volume and op (metrics)."""
        msg, volume = answer.msg, answer.volume
        if answer.pages is not None:
            answer.pages.release()
        name = volume.name if volume is not None else "-"
        length = 0 if isinstance(msg, FlushRequest) else msg.length
        self.server.io.end(name, OPS[type(msg)].name.lower(), length, answer.began, ok=answer.ok)
