"""The NBD bridge: :func:`serve_nbd`, the Trio adapter around the sans-IO NBD core.

NBD clients (qemu, nbdcopy, nbdfuse, the kernel) reach a dst block layer through here.  Per
connection the handshake (:mod:`dst.nbd.handshake`) runs under a deadline, STARTTLS wrapping
the stream in ``trio.SSLStream`` (mutual TLS 1.3).  Then one reader task judges requests
(:mod:`dst.nbd.transmission`), answers refusals itself, and starts a task per runnable request
once it holds a slot and its bytes of the connection's and the bridge's budgets — taken before
a WRITE's payload is read, so a flooding client meets TCP backpressure, not our memory.  WRITE
payloads land in the buffer that becomes the bio; READ data leaves the bio's buffer behind its
header in one ``writev``; replies go in completion order, coalesced (:mod:`dst.net.stream`).
Bios go through :func:`~dst.block.submit_split`, so the layer sees only bios within its
limits (seed 000).  Where the layer is a StartingLayer (a bridge to one server), a READ or
WRITE takes no task: the reader starts it under the connection's plug — the requests of one
receive leave for the server in one send, flushed before the reader waits for anything — its
completion callback queues the reply, and one answering task sends the queued replies
together (the only request out sends its own, from the callback).  A connection's failure
never reaches the listener.  Logs: ``peer=... export=... event=...``.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

import trio

from dst.block import (
    Bio,
    BioFlags,
    BlockLayer,
    Op,
    Pending,
    Plug,
    Segment,
    StartingLayer,
    submit_split,
    validate_bio,
)
from dst.block.buffers import SpareBuffers
from dst.errors import BlockError, ProtocolError, RemoteProtocolError
from dst.iostats import IoStats
from dst.nbd import protocol as p
from dst.nbd import transmission as tx
from dst.nbd.flow import Budget, Wire
from dst.nbd.handshake import NeedData, OptionAnswered, Ready, ServerHandshake, StartTls
from dst.nbd.protocol import Command, CommandFlags, ExportInfo, Reply, check_exports, export_info
from dst.nbd.transmission import Request, Session
from dst.net.endpoints import Address, is_loopback
from dst.net.stream import describe
from dst.security.tls import TlsConfig, require_peer_role, server_context

__all__ = ["NbdExport", "serve_nbd"]

log = logging.getLogger("dst.nbd")

#: From accept to transmission, TLS included: a client that connects and stalls holds a
#: socket and a task no longer than this (qemu-nbd's default is the same 10 s).
HANDSHAKE_TIMEOUT_S = 10.0
#: A graceful close (TLS close_notify after NBD_CMD_DISC) may take this long, then we drop.
CLOSE_TIMEOUT_S = 5.0
#: Per-request tables (an IntFlag or IntEnum operation costs a microsecond or more; a request
#: goes through these on the data path): NBD FUA/NO_HOLE → bio flags, command → metric label.
_FLAGS_KEPT = int(CommandFlags.FUA | CommandFlags.NO_HOLE)
_BIO_FLAGS = {
    n: (BioFlags.FUA if n & CommandFlags.FUA else BioFlags.NONE)
    | (BioFlags.NO_HOLE if n & CommandFlags.NO_HOLE else BioFlags.NONE)
    for n in range(_FLAGS_KEPT + 1)
}
_OP_NAMES = {int(c): c.name.lower() for c in Command}
#: Requests in flight per connection: more than pipelining clients use (qemu 16, nbdcopy 64).
MAX_INFLIGHT = 64
#: READ buffers and WRITE payloads one connection may pin: two maximal requests pipeline.
MAX_CONNECTION_BYTES = 2 * p.MAX_REQUEST_BYTES
#: The same for all connections of one serve_nbd together: the bridge's memory bound.
MAX_BRIDGE_BYTES = 8 * p.MAX_REQUEST_BYTES
#: Request buffers kept for reuse once their request is over (dst.block.buffers).
SPARE_BYTES = 64 << 20
#: One receive during the handshake.
RECV_BYTES = 64 * 1024
#: Certificate roles that may use the bridge over TLS: NBD clients are block-device users.
NBD_CLIENT_ROLES = frozenset({"client"})
#: Option answers logged at WARNING (a refused or misbehaving client): every error reply but
#: ERR_UNSUP, which is normal probing (metadata contexts, newer extensions) and goes to DEBUG.
_REFUSALS = frozenset(r for r in Reply if r > Reply.ERR_UNSUP)
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
#: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES share their names with Op (looked up once, not per
#: request: enum lookups by name were 3% of the bridge's time under fio).
_OPS = {int(c): Op[c.name] for c in Command if c.name in Op.__members__}


@dataclass(frozen=True, slots=True)
class NbdExport:
    """One export: the dst volume ``name`` served from ``layer``."""

    name: str
    #: The top of the client-side stack (RemoteVolume, later Mirror).
    layer: BlockLayer
    description: str = ""
    #: Advertise CAN_MULTI_CONN only if a FLUSH on one connection covers every connection's
    #: acknowledged writes — the caller knows whether its stack shares one cache.
    multi_conn: bool = False

    def info(self, page_size: int) -> ExportInfo:
        lbs, size = self.layer.limits.logical_block_size, self.layer.size
        return export_info(self.name, size, lbs, page_size, self.multi_conn, self.description)


class _Connection:
    def __init__(self, bridge: _Bridge, stream: trio.SocketStream) -> None:
        self.bridge = bridge
        self.stream: trio.abc.Stream = stream  # replaced by the SSLStream after STARTTLS
        self.peer = "?"
        with suppress(OSError, ValueError):  # a socket reset already has no peer name
            self.peer = str(Address(*stream.socket.getpeername()[:2]))
        self.export = "-"
        self.requests = self.refused = 0
        self.broken = ""  # why a reply could not be sent, once one could not
        self._structured = False
        self._layer: BlockLayer | None = None
        self._slots = trio.Semaphore(MAX_INFLIGHT)
        self._budget = Budget(MAX_CONNECTION_BYTES)
        # Started requests (StartingLayer): how many are out, the finished ones waiting for
        # their reply, and the event that wakes the answering task.
        self._started = 0
        self._answers: list[_Started] = []
        self._answer_wake = trio.Event()
        self._reading = True
        self._plug = Plug()  # started requests not sent yet: flushed before any wait

    def _log(self, level: int, event: str, detail: str = "") -> None:
        log.log(level, "peer=%s export=%s event=%s%s", self.peer, self.export, event, detail)

    async def run(self) -> None:
        self._log(logging.INFO, "connect")
        reason = "closed in handshake"
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                ready = await self._handshake()
            if ready is not None:
                reason = await self._transmit(*ready)
        except (ProtocolError, trio.TooSlowError) as exc:
            reason = str(exc) or f"handshake took over {HANDSHAKE_TIMEOUT_S} s"
            self._log(logging.WARNING, "refused", f" reason={reason!r}")
        except _TRANSPORT_ERRORS as exc:
            reason = self.broken or describe(exc)
        except Exception:  # a bug in one connection must not take the listener (and all) down
            reason = "crashed"
            log.exception("peer=%s export=%s event=crashed", self.peer, self.export)
        finally:
            await trio.aclose_forcefully(self.stream)
            detail = f" reason={reason!r} requests={self.requests} refused={self.refused}"
            self._log(logging.INFO, "disconnect", detail)

    async def _handshake(self) -> tuple[Ready, bytes] | None:
        hs = ServerHandshake(self.bridge.infos, tls_required=self.bridge.context is not None)
        try:
            while True:
                event = hs.next_event()
                if out := hs.data_to_send():
                    await self.stream.send_all(out)
                if isinstance(event, NeedData):
                    hs.receive_data(await self.stream.receive_some(RECV_BYTES))
                elif isinstance(event, OptionAnswered):
                    level = logging.WARNING if event.reply in _REFUSALS else logging.DEBUG
                    detail = f" reply={p.name_of(Reply, event.reply)} detail={event.detail!r}"
                    self._log(level, f"option_{p.name_of(p.Option, event.option)}", detail)
                elif isinstance(event, StartTls):
                    await self._start_tls()
                    hs.tls_established()
                elif isinstance(event, Ready):
                    return event, hs.trailing_data
                else:  # Aborted or PeerClosed
                    return None
        except RemoteProtocolError:
            # Best effort: a queued last reply (ERR_TOO_BIG) tells the client why.
            with trio.move_on_after(CLOSE_TIMEOUT_S), suppress(*_TRANSPORT_ERRORS):
                await self.stream.send_all(hs.data_to_send())
            raise

    async def _start_tls(self) -> None:
        assert self.bridge.context is not None
        tls = trio.SSLStream(self.stream, self.bridge.context, server_side=True)
        try:
            await tls.do_handshake()
            role = require_peer_role(tls, NBD_CLIENT_ROLES)
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            raise ProtocolError(f"TLS handshake failed: {describe(exc)}", errno.EPERM) from exc
        self.stream = tls
        self._log(logging.INFO, "tls", f" role={role}")

    async def _transmit(self, ready: Ready, trailing: bytes) -> str:
        self.export, sr = ready.export.name[:64], ready.structured_replies
        self._structured, self._layer = sr, self.bridge.layers[ready.export.name]
        self._log(logging.INFO, "ready", f" flags=0x{ready.flags:x} sr={sr}")
        session = Session.for_export(ready.export, flags=ready.flags, structured_replies=sr)
        self.wire = Wire(self.stream, initial=trailing)
        # Replies another task may queue behind the sender's (started ones go in batches).
        self.wire.in_flight = lambda: MAX_INFLIGHT - self._slots.value - self._started
        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._answer)
            watchdog = await tasks.start(self.wire.watch_payloads)
            try:
                reason: str | Exception = await self._read(tasks, session)
            except (RemoteProtocolError, *_TRANSPORT_ERRORS) as exc:
                reason = exc  # raised once the in-flight bios have finished; their replies
                await trio.aclose_forcefully(self.stream)  # fail fast on the dropped socket
            finally:
                watchdog.cancel()
                self._reading = False
                self._answer_wake.set()
        if isinstance(reason, Exception):
            raise reason
        if reason == "disc":
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self.stream.aclose()  # with TLS, a close_notify, as DISC requires
        return reason

    async def _read(self, tasks: trio.Nursery, session: Session) -> str:
        try:
            return await self._read_requests(tasks, session)
        finally:  # what the plug holds must leave even when the reader fails
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._plug.flush()

    async def _read_requests(self, tasks: trio.Nursery, session: Session) -> str:
        layer, plug, wire = self._layer, self._plug, self.wire
        start = layer.start if isinstance(layer, StartingLayer) and layer.can_start else None
        while True:
            if plug and wire.buffered < p.REQUEST.size:
                await plug.flush()  # the next header needs a receive, which may wait
            elif wire.pass_done():  # hand on what this pass read (dst.net.stream)
                await plug.flush()
                await trio.lowlevel.checkpoint()
            req = await wire.read_header()
            if req is None or req.command == Command.DISC:
                return "eof" if req is None else "disc"
            self.requests += 1
            refused = tx.check_request(req, session)
            if refused is not None:
                self.refused += 1
                self._log(logging.WARNING, "bad_request", f" {req.describe()} reason={refused}")
                await plug.flush()
                await wire.skip_payload(req.payload_length)
                await self._reply(self._error_reply(req, refused))
                continue
            cost = tx.budget_bytes(req)
            await self._admit(cost)
            buf = None
            if req.command in (Command.READ, Command.WRITE):
                buf = self.bridge.spare.take(req.length)
            try:
                if buf is not None and req.command == Command.WRITE:
                    if plug and wire.buffered < req.length:
                        await plug.flush()
                    await wire.read_payload(memoryview(buf))
            except BaseException:
                self._release(cost)  # the bridge-wide budget outlives this connection
                raise
            if start is not None and buf is not None:
                await self._start(start, req, buf, cost)
            else:
                await plug.flush()  # FLUSH, TRIM, ...: after the requests read before them
                tasks.start_soon(self._execute, req, buf, cost)

    async def _admit(self, cost: int) -> None:
        """A slot and ``cost`` bytes of both budgets.  While they are free this takes no trip
        through the scheduler, so a burst of pipelined requests is read in one pass and their
        replies leave together (dst.net.stream)."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._plug.flush()  # the slots may be held by requests in the plug
            await self._slots.acquire()
        if not self._budget.acquire_nowait(cost):
            await self._plug.flush()
            await self._budget.acquire(cost)
        if not self.bridge.budget.acquire_nowait(cost):
            await self._plug.flush()
            await self.bridge.budget.acquire(cost)

    def _release(self, cost: int) -> None:
        self.bridge.budget.release(cost)
        self._budget.release(cost)
        self._slots.release()

    async def _execute(self, req: Request, buf: bytearray | None, cost: int) -> None:
        began, error = self.bridge.io.begin(), None
        try:
            try:
                await self._submit(req, buf)
            except BlockError as exc:
                error = exc
            await self._reply(*self._answer_parts(req, buf, error))
        finally:
            self._retire(req, buf, cost, began, error is None)

    def _answer_parts(
        self, req: Request, buf: bytearray | None, error: BlockError | None
    ) -> list[bytes | memoryview]:
        """A finished request's reply: the error, a READ's header and data, or OK."""
        if error is not None:
            self._log(logging.WARNING, "request_failed", f" {req.describe()} error={error}")
            return [self._error_reply(req, error)]
        if buf is not None and req.command == Command.READ:
            sr = self._structured
            head = tx.read_reply_header(req.handle, req.offset, len(buf), structured=sr)
            return [head, memoryview(buf)]
        return [tx.ok_reply(req.handle)]

    def _retire(
        self, req: Request, buf: bytearray | None, cost: int, began: float, ok: bool
    ) -> None:
        """A request's reply is sent (or cannot be): give back what it held, and count it —
        the one place a bridge request is timed and counted by export and op (metrics)."""
        if ok and buf is not None and not self.broken:  # in the kernel, nobody fills it now
            self.bridge.spare.give_back(buf)
        self._release(cost)
        op = _OP_NAMES.get(req.command) or p.name_of(Command, req.command).lower()
        self.bridge.io.end(self.export, op, req.length, began, ok=ok)

    async def _start(
        self,
        start: Callable[[Bio, Plug], Awaitable[Pending]],
        req: Request,
        buf: bytearray,
        cost: int,
    ) -> None:
        """Start a READ or WRITE on a StartingLayer, under the plug; its callback queues the
        reply."""
        layer = self._layer
        assert layer is not None
        done = _Started(req, buf, cost, self.bridge.io.begin())
        bio = _buffer_bio(req, buf)
        try:
            validate_bio(bio, layer.limits, layer.size)  # the edge check, once, here
            done.pending = await start(bio, self._plug)
        except BlockError as exc:
            done.error = exc
        except BaseException:
            self._release(cost)
            raise
        self._started += 1
        if done.pending is None:
            self._finished(done)
        else:
            done.pending.then(partial(self._finished, done))

    def _finished(self, done: _Started) -> None:
        if done.pending is not None:
            done.error = done.pending.error
        if self._started == 1 and done.error is None and self._answer_now(done):
            return
        self._answers.append(done)
        self._answer_wake.set()

    def _answer_now(self, done: _Started) -> bool:
        """The only request out: its reply goes from the task that completed it, in one
        write if the socket takes it at once — waking the answering task would cost a
        scheduler pass, and at depth 1 a request's whole path is the CPU of each process it
        crosses."""
        if not self.wire.send_nowait(self._answer_parts(done.req, done.buf, None)):
            return False
        self._started -= 1
        self._retire(done.req, done.buf, done.cost, done.began, True)
        if self.wire.unsent:
            self._answer_wake.set()
        return True

    async def _answer(self) -> None:
        """Send the replies of finished started requests, all those queued at once together;
        return when the reader is done and nothing started is still out."""
        while self._reading or self._started or self.wire.unsent:
            if not self._answers:
                if self.wire.unsent:  # the rest of a reply sent by _answer_now
                    await self._reply()
                    continue
                await self._answer_wake.wait()
                self._answer_wake = trio.Event()
                continue
            batch, self._answers = self._answers, []
            parts: list[bytes | memoryview] = []
            for done in batch:
                parts += self._answer_parts(done.req, done.buf, done.error)
            await self._reply(*parts)
            for done in batch:
                self._started -= 1
                self._retire(done.req, done.buf, done.cost, done.began, done.error is None)

    async def _submit(self, req: Request, buf: bytearray | None) -> None:
        # READ, WRITE, FLUSH, TRIM, WRITE_ZEROES share their names with Op; CACHE has no bio:
        # it is a hint, judged and acknowledged.
        op, layer = _OPS.get(req.command), self._layer
        if op is None or layer is None:
            return
        flags = _BIO_FLAGS[req.flags & _FLAGS_KEPT]
        if buf is not None:
            bios = [_buffer_bio(req, buf)]
        elif op is Op.FLUSH:
            bios = [Bio(Op.FLUSH, 0, 0, flags=flags)]
        else:  # TRIM/WRITE_ZEROES in sequential chunks: no wider fan-out than a maximal READ
            end, step = req.offset + req.length, p.MAX_REQUEST_BYTES
            starts = range(req.offset, end, step)
            bios = [Bio(op, start, min(step, end - start), flags=flags) for start in starts]
        for bio in bios:
            validate_bio(bio, layer.limits, layer.size)  # the edge check, once, here
            await submit_split(layer, bio)

    def _error_reply(self, req: Request, exc: BlockError) -> bytes:
        return tx.error_reply(req.handle, exc.errno, str(exc), structured=self._structured)

    async def _reply(self, *parts: bytes | memoryview) -> None:
        try:
            await self.wire.send_reply(*parts)
        except _TRANSPORT_ERRORS as exc:  # gone or stalled: drop it, and the reader ends too
            if not self.broken:
                self.broken = describe(exc)
                self._log(logging.WARNING, "reply_failed", f" reason={self.broken!r}")
            await trio.aclose_forcefully(self.stream)


def _buffer_bio(req: Request, buf: bytearray) -> Bio:
    """A READ or WRITE over its request buffer.  One contiguous buffer, one segment: the link
    below describes it to the server as runs of its pages (page_runs), so cutting it into
    page-sized segments here only cost (a 1 MiB request: 256 segments made, checked and
    merged again)."""
    n = len(buf)  # built directly: Bio.from_buffer's checks and cuts were 4 % of the bridge
    segments = (Segment(memoryview(buf), 0, n),)
    return Bio(_OPS[req.command], req.offset, n, segments, _BIO_FLAGS[req.flags & _FLAGS_KEPT])


@dataclass(slots=True)
class _Started:
    """A READ or WRITE started on a StartingLayer, until its reply is sent."""

    req: Request
    buf: bytearray
    cost: int
    began: float
    pending: Pending | None = None
    error: BlockError | None = None


class _Bridge:
    """What every connection of one serve_nbd shares."""

    def __init__(
        self,
        exports: Sequence[NbdExport],
        tls: TlsConfig | None,
        page_size: int,
        io: IoStats | None = None,
    ):
        self.page_size = page_size
        self.io = io if io is not None else IoStats()
        self.layers = {e.name: e.layer for e in exports}
        self.infos = [e.info(page_size) for e in exports]
        check_exports(self.infos)
        self.context = server_context(tls) if tls is not None else None
        self.budget = Budget(MAX_BRIDGE_BYTES)
        self.spare = SpareBuffers(SPARE_BYTES)

    async def handle(self, stream: trio.SocketStream) -> None:
        await _Connection(self, stream).run()


async def serve_nbd(
    listen: Address,
    exports: Sequence[NbdExport],
    *,
    tls: TlsConfig | None = None,
    page_size: int = 4096,
    io: IoStats | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``exports`` over NBD on ``listen`` until cancelled; ``task_status.started`` gets
    the bound address (port 0 allowed).  With ``tls`` every client must STARTTLS and present a
    client certificate from the same CA (FORCEDTLS); without, on a non-loopback address, the
    bridge warns and serves (refusing is the CLI's call: ``--insecure``).  Bad configuration
    (no exports, duplicate or over-long names, a bad page size) is a ConfigError up front."""
    bridge = _Bridge(exports, tls, page_size, io)
    if tls is None and not is_loopback(listen.host):
        log.warning("listen=%s event=plaintext reason='no TLS on a non-loopback address'", listen)
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    host, port = listeners[0].socket.getsockname()[:2]
    bound = Address(str(host), int(port))
    names = ",".join(e.name[:64] for e in exports)
    log.info("listen=%s exports=%s tls=%s event=listening", bound, names, bool(tls))
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, bridge.handle, listeners)
        task_status.started(bound)
