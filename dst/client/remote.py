"""RemoteVolume: a block layer whose storage is a volume on a dst server.

``open_remote(address, volume)`` connects, says Hello, attaches the volume and yields a
``RemoteVolume``: ``limits``, ``size``, ``submit(bio)``, ``aclose()``, like every layer.

A bio becomes a *transaction* (seed 003): ``split(bio, limits)`` cuts it into the runs the
server takes as one request each, every run is sent as a command ``(tid, sub)``, and the
transaction completes when its last reply arrives — in any order; the first error wins.
Many transactions are in flight at once, up to the server's ``max_inflight``.

One supervisor task owns the connection.  When the server goes away (EOF, reset, a frame that
fails its crc, keepalive silence), the supervisor reconnects with backoff, attaches again and
resends every command that has no reply yet — writes are idempotent, and none of them was
acknowledged to the user, so resending is safe.  After ``max_retries`` consecutive failed
attempts, pending and new I/O fails with EIO until a connection succeeds again.

**FAILFAST** (seed 004, for mirror legs): a bio with ``BioFlags.FAILFAST`` is never resent
and never waits for a link; it has a deadline (``failfast_timeout_s``).  The first FAILFAST bio
that fails or expires *trips* the volume: every FAILFAST bio pending on it fails back at once
with the same error (not each after its own timeout), and new FAILFAST bios fail at once until
the server answers something again.  Commands failed back while on the wire become orphans
(:mod:`dst.client.failfast`).  Bios without the flag behave exactly as before (full retries).
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from dst.block import Bio, BioFlags, Limits, Op, Plug, split, validate_bio
from dst.block.layer import closed_error
from dst.client.commands import (
    Command,
    RemoteConfig,
    RemoteStatistics,
    Transaction,
    request_message,
)
from dst.client.failfast import Orphans, Tripwire
from dst.client.link import Link, LinkBroken, open_link
from dst.errors import BlockError, ConfigError, FencedError, ProtocolError
from dst.net.endpoints import Address
from dst.security.tls import TlsConfig
from dst.wire import (
    MAX_PAGE_RUNS,
    Received,
    Reply,
)

__all__ = ["CONNECT_ERRORS", "RemoteConfig", "RemoteVolume", "open_remote"]

log = logging.getLogger("dst.client")

#: How a connection attempt fails: unreachable, refused, broken, or answered with an error.
CONNECT_ERRORS = (OSError, trio.BrokenResourceError, ProtocolError, BlockError, trio.TooSlowError)

_FAILFAST = int(BioFlags.FAILFAST)  # tested per bio: int & int, not IntFlag's slow __and__


class RemoteVolume:
    """The client side of one attached volume (see the module docstring)."""

    #: A StartingLayer: :meth:`start` sends a bio and returns its Transaction (a Pending).
    can_start = True

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        # A command's page list must stay within MAX_PAGE_RUNS runs: a request covers at most
        # max_bytes / page_size whole pages plus two partial pages per segment.
        self.own_limits = Limits(
            page_size=config.page_size,
            max_bytes=(MAX_PAGE_RUNS // 2) * config.page_size,
            max_segments=MAX_PAGE_RUNS // 4,
        ).validate()
        if config.limits is not None:
            self.own_limits = self.own_limits.stack(config.limits)
        self._limits = self.own_limits
        self._size = 0
        self._ids = itertools.count(1)
        self._pending: dict[tuple[int, int], Command] = {}
        self._link: Link | None = None
        self._link_changed = trio.Event()
        self._generation = 0
        self._server_index = 0
        self._giving_up = False
        self._slots: trio.Semaphore | None = None
        self._closed = False
        #: The epoch this volume was granted, and why it was fenced (then nothing is sent).
        self.epoch = 0
        self.fenced = ""
        self.stats = RemoteStatistics()
        #: Run on each new link before it carries a request (the replication handshake);
        #: raising BlockError refuses the link, which is retried like a failed connect.
        self.on_link: Callable[[Link], Awaitable[None]] | None = None
        # FAILFAST (module docstring): the tripwire over the FAILFAST bios in flight, and the
        # commands failed back while on the wire.
        self._tripwire = Tripwire(
            f"volume={config.volume} server={config.address}",
            self.stats,
            self._abandon,
            self._expired,
        )
        self._orphans = Orphans()

    # -- the block layer interface --------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def size(self) -> int:
        return self._size

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def link(self) -> Link | None:
        return self._link

    def new_tid(self) -> int:
        """A transaction id no other request on this volume's links uses."""
        return next(self._ids)

    def in_flight(self) -> int:
        """Commands sent or about to be sent and not yet answered."""
        return len(self._pending)

    async def wait_connected(self) -> None:
        while self._link is None:
            await self._link_changed.wait()

    async def submit(self, bio: Bio, *, early: trio.Event | None = None, stage: str = "") -> None:
        """Complete ``bio`` on the server.  With ``early``, set that event as soon as the
        whole bio was handed to the socket (``stage="sent"``) or the server said it received
        it (``"received"``, writes only) — replication protocols A and B."""
        self._check_submit(bio)
        if int(bio.flags) & _FAILFAST:
            txn = Transaction(0)
            await self._start_failfast(bio, txn, None)
            await txn.wait()  # the deadline's trip fails it back (Tripwire.watch)
        else:
            await self._submit(bio, Transaction(0, early=early, stage=stage))

    async def start(self, bio: Bio, plug: Plug | None = None) -> Transaction:
        """Send ``bio`` and return its transaction: ``await txn.wait()`` completes it, or
        ``txn.then(callback)`` is called back (the Pending protocol).  A caller overlaps its
        own work with the server's without a task of its own (the replicated write path:
        send to the peer, write locally, then wait; the NBD bridge; the mirror's legs).
        With ``plug``, the commands wait in it while a link is up, and leave with every
        other command held there in one gathered write when the plug is flushed.  A
        FAILFAST bio keeps its rules: its deadline and the volume's trip fail it back."""
        self._check_submit(bio)
        txn = Transaction(0)
        if int(bio.flags) & _FAILFAST:
            await self._start_failfast(bio, txn, plug)
        else:
            await self._start(bio, txn, plug)
        return txn

    def _check_submit(self, bio: Bio) -> None:
        if self._closed:
            raise closed_error(f"volume {self.config.volume!r}")
        if self.fenced:
            raise FencedError(self.fenced)
        if self._slots is None or (self._link is None and not self.config.resend):
            raise BlockError(errno.ENOTCONN, f"not connected to {self.config.address}")
        validate_bio(bio, self._limits, self._size)

    async def _submit(self, bio: Bio, txn: Transaction) -> None:
        await self._start(bio, txn)
        await txn.wait()

    async def _start(
        self,
        bio: Bio,
        txn: Transaction,
        plug: Plug | None = None,
        pieces: list[Bio] | None = None,
    ) -> None:
        """Send every command of ``bio``'s transaction (its ``pieces``, if split already),
        waiting for free slots, or hold them in ``plug``; a wait for a slot flushes the plug
        first — the slots may be held by commands in it.  With a plug, a link and a free slot
        for every piece, this never waits."""
        assert self._slots is not None
        if pieces is None:
            pieces = split(bio, self._limits)
        txn.remaining = txn.early_left = len(pieces)
        tid = next(self._ids)
        self.stats.transactions += 1
        batch: list[Command] = []  # sent together when the next slot must be waited for
        for sub, piece in enumerate(pieces):
            try:  # a free slot is taken without a trip through the scheduler
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                if plug:
                    await plug.flush()
                await self._send_batch(batch)
                batch = []
                await self._slots.acquire()
            cmd = Command(tid, sub, piece, txn)
            txn.commands.append(cmd)
            self._pending[(tid, sub)] = cmd
            self.stats.commands += 1
            batch.append(cmd)
        if plug is not None and self._link is not None:
            plug.hold(self._send_held, batch)
        else:
            await self._send_batch(batch)

    # -- FAILFAST (module docstring) ----------------------------------------------------------

    @property
    def failfast_tripped(self) -> bool:
        return self._tripwire.error is not None

    async def _start_failfast(self, bio: Bio, txn: Transaction, plug: Plug | None) -> None:
        """Send a FAILFAST bio's commands, and watch its transaction until its deadline
        (:class:`~dst.client.failfast.Tripwire`): the trip fails it back then.  A wait for a
        slot or for the socket on the way is bounded by the same deadline (a scope the trip
        cancels too), and so is the send of commands a plug held (:meth:`_send_held`)."""
        wire = self._tripwire  # tripped, or no link: it fails at once
        if wire.error is not None:
            raise wire.error
        if self._link is None:
            raise wire.trip(BlockError(errno.ENOTCONN, f"{self.config.address} not connected"))
        assert self._slots is not None
        txn.deadline = self._deadline()
        pieces = split(bio, self._limits)
        if plug is not None and self._link is not None and self._slots.value >= len(pieces):
            await self._start(bio, txn, plug, pieces)  # cannot wait: no deadline scope
        else:
            scope = wire.arm(txn.deadline)
            with scope:
                try:
                    await self._start(bio, txn, plug, pieces)
                finally:
                    wire.disarm(scope)
            if scope.cancelled_caught:
                self._orphan(txn)
                raise wire.trip(self._expired())
        txn.then(lambda: self._failfast_done(txn))  # before the caller's callbacks
        wire.watch(txn, txn.deadline)

    def _deadline(self) -> float:
        """The deadline of a FAILFAST bio starting now."""
        timeout = self.config.failfast_timeout_s
        return trio.current_time() + timeout if timeout else math.inf

    def _failfast_done(self, txn: Transaction) -> None:
        if txn.error is not None:
            txn.error = self._tripwire.trip(txn.error)

    def _abandon(self, txn: Transaction, error: BlockError) -> None:
        """The tripwire fails a started FAILFAST transaction back."""
        self._orphan(txn)
        txn.fail(error)

    def _expired(self) -> BlockError:
        timeout = self.config.failfast_timeout_s
        return BlockError(
            errno.ETIMEDOUT, f"no answer from {self.config.address} within {timeout} s"
        )

    def _orphan(self, txn: Transaction) -> None:
        """Take an abandoned transaction's commands out of ``_pending``.  One already on the
        wire keeps its slot until its answer (or its link's death) — the server counts it."""
        assert self._slots is not None
        link = self._link
        for cmd in txn.commands:
            if self._pending.pop((cmd.tid, cmd.sub), None) is None:
                continue
            self.stats.failed += 1
            if link is not None and cmd.generation == link.generation:
                self._orphans.add((cmd.tid, cmd.sub))
                self.stats.orphans += 1
            else:
                self._slots.release()

    async def wait_orphans_settled(self) -> None:
        """Wait until no failed-back command can still land on the server."""
        await self._orphans.wait_settled()

    async def aclose(self) -> None:
        self._closed = True
        self._fail_all(BlockError(errno.ESHUTDOWN, "volume closed while the request was pending"))

    # -- sending ---------------------------------------------------------------------------

    async def _send_batch(self, cmds: list[Command]) -> None:
        """Send new commands in one gathered write on the current link (a 1 MiB write split at
        a server's 32 KiB boundary is 32 of them); without a link, one by one as
        :meth:`_send` does."""
        link = self._link
        if len(cmds) <= 1 or link is None:
            for cmd in cmds:
                await self._send(cmd)
            return
        frames = []
        now = trio.current_time()
        for cmd in cmds:
            cmd.generation, cmd.sent_at = link.generation, now
            data = cmd.piece.views() if cmd.piece.op is Op.WRITE else ()
            msg = request_message(cmd, link.handle, link.epoch, self.config.page_size)
            frames.append((msg, data))
        try:
            await link.send_many(frames)
        except (LinkBroken, trio.BrokenResourceError, trio.ClosedResourceError):
            link.broken("send failed")  # pending: the next link resends them
            return
        except trio.Cancelled:
            link.broken("send cancelled")
            raise
        for cmd in cmds:
            _sent(cmd)

    async def _send_held(self, cmds: list[Command]) -> None:
        """Send commands a plug held: those still pending and not resent already by a link
        adopted meanwhile.  A send that waits past a FAILFAST command's deadline breaks the
        link (as a send cancelled in :meth:`_start_failfast`'s scope does)."""
        link = self._link
        if link is not None:
            generation, pending = link.generation, self._pending
            cmds = [c for c in cmds if c.generation != generation and (c.tid, c.sub) in pending]
        deadline = min([c.txn.deadline for c in cmds], default=math.inf)
        if deadline == math.inf:
            await self._send_batch(cmds)
            return
        with trio.move_on_at(deadline):
            await self._send_batch(cmds)

    async def _send(self, cmd: Command) -> None:
        """Send ``cmd`` on the current link, waiting for one if there is none.  A command
        whose link breaks stays pending; the next link resends it."""
        while True:
            if (cmd.tid, cmd.sub) not in self._pending:
                return  # answered, or failed while we waited (fenced, closed)
            link = self._link
            if link is None:
                if not self.config.resend or cmd.piece.flags & BioFlags.FAILFAST:
                    self._complete(cmd, BlockError(errno.ENOTCONN, "peer link down"))
                    return
                if self._giving_up:
                    self._complete(cmd, BlockError(errno.EIO, self._down_message()))
                    return
                await self._link_changed.wait()
                continue
            if cmd.generation == link.generation or (cmd.tid, cmd.sub) not in self._pending:
                return  # already sent on this link by a resend, or already answered
            cmd.generation = link.generation
            data = cmd.piece.views() if cmd.piece.op is Op.WRITE else ()
            try:
                msg = request_message(cmd, link.handle, link.epoch, self.config.page_size)
                cmd.sent_at = trio.current_time()
                await link.send(msg, data)
            except (LinkBroken, trio.BrokenResourceError, trio.ClosedResourceError):
                link.broken("send failed")
                return
            except trio.Cancelled:
                # A FAILFAST deadline (or the caller) cut the send short: the frame may be half
                # on the wire and the connection state counts it; the link is not usable again.
                link.broken("send cancelled")
                raise
            _sent(cmd)
            return

    def _down_message(self) -> str:
        servers = ", ".join(str(a) for a in (self.config.address, *self.config.alternates))
        return f"{servers} unreachable after {self.config.max_retries} connection attempts"

    # -- completion ------------------------------------------------------------------------

    def _complete(self, cmd: Command, error: BlockError | None) -> None:
        if self._pending.pop((cmd.tid, cmd.sub), None) is None:
            return
        assert self._slots is not None
        self._slots.release()
        if error is not None:
            self.stats.failed += 1
        cmd.txn.reached(cmd)
        cmd.txn.finish_one(error)

    def _fail_all(self, error: BlockError) -> None:
        for cmd in list(self._pending.values()):
            self._complete(cmd, error)

    def on_reply(self, reply: Reply) -> Command | None:
        """Called by the link's reader for each reply; returns the command for a successful
        READ so the reader can receive its data into the command's buffers first."""
        key = (reply.tid, reply.sub)
        if self._orphans.answered(key):
            assert self._slots is not None
            self._slots.release()  # the server has finished it: the slot is free again
        return self._pending.get(key)

    def on_received(self, msg: Received) -> None:
        """Protocol B: the server has a write's data (its Reply follows)."""
        cmd = self._pending.get((msg.tid, msg.sub))
        if cmd is not None:
            cmd.txn.reached(cmd)

    def on_done(self, cmd: Command, reply: Reply) -> None:
        err: BlockError | None = None
        if reply.errno == errno.ESTALE and cmd.piece.op is not Op.READ:
            self._fence(reply.message)
            err = FencedError(reply.message)
        elif reply.errno:
            err = BlockError(reply.errno, reply.message)
        else:
            self._tripwire.error = None  # the server answers again
        self._complete(cmd, err)

    def _fence(self, why: str) -> None:
        """Another owner took the volume over: fail everything now and later, never retry."""
        if self.fenced:
            return
        self.fenced = why
        log.error(
            "volume=%s epoch=%d event=fenced reason=%r: failing %d pending requests",
            self.config.volume,
            self.epoch,
            why,
            len(self._pending),
        )
        self._fail_all(FencedError(f"fenced: {why}"))
        if self._link is not None:
            self._link.broken("fenced")
        self._link_changed.set()  # wake senders waiting for a link that will not come
        self._link_changed = trio.Event()

    # -- the connection supervisor ---------------------------------------------------------

    def _set_link(self, link: Link | None) -> None:
        self._link = link
        self._link_changed.set()
        self._link_changed = trio.Event()

    async def _connect(self) -> Link:
        """A link to the first server, starting with the last good one, that attaches."""
        cfg = self.config
        servers = [cfg.address, *cfg.alternates]
        order = servers[self._server_index :] + servers[: self._server_index]
        error: BaseException | None = None
        for address in order:
            try:
                link = await open_link(
                    address,
                    cfg.volume,
                    tls=cfg.tls,
                    role=cfg.role,
                    node_id=cfg.node_id or f"{socket.gethostname()}:{os.getpid()}",
                    page_size=cfg.page_size,
                    generation=self._generation,
                    tid=next(self._ids),
                    owner=self,
                    claim=self._claim(),
                    # A replication link is not an owner: nothing to fence, no epoch to name.
                    epoch=self.epoch if cfg.role != "replica" else 0,
                )
            except BlockError as exc:
                if exc.errno == errno.ESTALE:
                    self._fence(str(exc))
                    raise
                # A secondary's EROFS only says "not here"; another server's reason is news.
                if error is None or getattr(error, "errno", None) == errno.EROFS:
                    error = exc
                continue
            except CONNECT_ERRORS as exc:
                error = exc
                continue
            self._server_index = servers.index(address)
            self._generation += 1
            return link
        assert error is not None
        raise error

    def _claim(self) -> str:
        if self.config.claim == "share" or not self.epoch:
            return self.config.claim
        return "own"  # a reconnect: keep the epoch already granted

    def _adopt(self, link: Link) -> None:
        self.epoch = link.epoch
        limits = self.own_limits.stack(link.limits)
        if self._size and (link.size != self._size or limits != self._limits):
            log.warning(
                "volume=%s event=geometry_changed size=%d->%d",
                self.config.volume,
                self._size,
                link.size,
            )
        self._size = link.size
        self._limits = limits
        if self._slots is None:
            self._slots = trio.Semaphore(link.max_inflight)

    async def run(self, first: Link | None, *, task_status: trio.TaskStatus[None]) -> None:
        """Supervise the connection forever: run a link, and when it breaks, get another;
        and trip the volume when a started FAILFAST bio reaches its deadline."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tripwire.watch_deadlines)
            await self._supervise(first, task_status)
            nursery.cancel_scope.cancel()

    async def _supervise(self, first: Link | None, task_status: trio.TaskStatus[None]) -> None:
        link: Link | None = first
        task_status.started()
        failures = 0
        while True:
            if link is not None:
                refusal = await self._run_link(link)
                link = None
                if self._closed or self.fenced:
                    return
                if refusal is None:
                    failures = 0
                    self._giving_up = False
                    self.stats.reconnects += 1
                else:
                    failures += 1
                    await trio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))
                    continue
            try:
                first_ever = self._slots is None
                link = await self._connect()
                self._adopt(link)
                servers = [self.config.address, *self.config.alternates]
                log.info(
                    "volume=%s server=%s event=%s",
                    self.config.volume,
                    servers[self._server_index],
                    "connected" if first_ever else "reconnected",
                )
            except CONNECT_ERRORS as exc:
                if self.fenced:
                    return
                failures += 1
                # The first failure is news; a peer retrying for hours should not flood the log.
                level = logging.WARNING if failures == 1 or failures % 60 == 0 else logging.DEBUG
                log.log(
                    level,
                    "volume=%s server=%s attempt=%d event=connect_failed reason=%r",
                    self.config.volume,
                    self.config.address,
                    failures,
                    str(exc),
                )
                if failures >= self.config.max_retries and not self._giving_up:
                    self._giving_up = True
                    self._fail_all(BlockError(errno.EIO, self._down_message()))
                    self._link_changed.set()
                    self._link_changed = trio.Event()
                await trio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))

    async def _watch_requests(self, link: Link, timeout_s: float) -> None:
        """Break ``link`` when a request sent on it stays unanswered for ``timeout_s``."""
        while True:
            await trio.sleep(min(1.0, timeout_s / 4))
            sent = [c.sent_at for c in self._pending.values() if c.generation == link.generation]
            age = trio.current_time() - min(sent, default=trio.current_time())
            if age > timeout_s:
                link.broken(f"a request unanswered for {age:.1f} s")
                return

    async def _run_link(self, link: Link) -> str | None:
        """Run ``link`` until it breaks; the reason ``on_link`` refused it, or None."""
        refusal: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run_reader)
                nursery.start_soon(
                    link.run_keepalive, self.config.keepalive_s, self.config.dead_after_s
                )
                if self.config.request_timeout_s is not None:
                    nursery.start_soon(self._watch_requests, link, self.config.request_timeout_s)
                if self.on_link is not None:
                    try:
                        await self.on_link(link)
                    except (BlockError, LinkBroken, ProtocolError) as exc:
                        refusal = str(exc)
                        link.broken(f"refused: {refusal}")
                if refusal is None:
                    self._set_link(link)
                    self._tripwire.error = None  # a new link: the server answers again
                    # Resend what the last link left unanswered, oldest first.
                    for key in sorted(self._pending):
                        cmd = self._pending[key]
                        if cmd.generation != link.generation:
                            if cmd.generation != -1:
                                self.stats.resent += 1
                            nursery.start_soon(self._send, cmd)
                await link.wait_broken()
                nursery.cancel_scope.cancel()
        finally:
            self._set_link(None)
            for _ in range(self._orphans.link_died()):  # never to be answered now
                assert self._slots is not None
                self._slots.release()
            lost = BlockError(errno.ENOTCONN, f"link lost: {link.reason}")
            if not self.config.resend:
                self._fail_all(lost)
            else:  # FAILFAST commands are never resent
                for cmd in list(self._pending.values()):
                    if cmd.piece.flags & BioFlags.FAILFAST:
                        self._complete(cmd, lost)
            await trio.aclose_forcefully(link.framed.stream)
        if refusal is None:
            log.warning(
                "volume=%s server=%s event=disconnected reason=%r pending=%d",
                self.config.volume,
                self.config.address,
                link.reason,
                len(self._pending),
            )
        return refusal


@asynccontextmanager
async def open_remote(
    address: Address | str | Sequence[Address | str],
    volume: str,
    *,
    tls: TlsConfig | None = None,
    role: str = "client",
    node_id: str = "",
    page_size: int = 4096,
    max_retries: int = 20,
    keepalive_s: float = 2.0,
    dead_after_s: float = 10.0,
    failfast_timeout_s: float | None = 1.0,
    must_connect: bool = True,
    claim: str = "share",
    claim_wait_s: float = 0.0,
    request_timeout_s: float | None = 60.0,
) -> AsyncIterator[RemoteVolume]:
    """Connect to ``address``, attach ``volume`` and yield it as a block layer.

    ``address`` may list several servers (a replicated pair): the volume is attached where it
    is primary.  ``claim`` is how the attach claims the volume (dst/fence/claims.py); an
    ``own`` claim refused because another node holds the volume is retried for up to
    ``claim_wait_s`` seconds.  A request unanswered for ``request_timeout_s`` breaks its link
    (RemoteConfig).  The first connection must succeed (so size and limits are
    known) unless ``must_connect`` is False; later outages are ridden out as the module
    docstring describes.
    """
    from dst.net.endpoints import parse_address

    many = [address] if isinstance(address, str | Address) else list(address)
    servers = [parse_address(a) if isinstance(a, str) else a for a in many]
    if not servers:
        raise ConfigError("no server address given")
    if page_size < 512 or page_size & (page_size - 1):
        raise ConfigError(f"page size {page_size}: must be a power of two >= 512")
    config = RemoteConfig(
        servers[0],
        volume,
        tls,
        role,
        node_id,
        page_size,
        max_retries,
        keepalive_s,
        dead_after_s,
        alternates=tuple(servers[1:]),
        failfast_timeout_s=failfast_timeout_s,
        claim=claim,
        request_timeout_s=request_timeout_s,
    )
    remote = RemoteVolume(config)
    first: Link | None = None
    try:
        first = await _first_link(remote, claim_wait_s)
        remote._adopt(first)
    except CONNECT_ERRORS as exc:
        if must_connect:
            raise
        # A mirror leg that is down at start: the supervisor keeps trying; until it connects,
        # ``size`` is 0 and submits fail with ENOTCONN.
        log.warning(
            "volume=%s server=%s event=connect_failed reason=%r", volume, servers[0], str(exc)
        )
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run, first)
        try:
            yield remote
        finally:
            await remote.aclose()
            nursery.cancel_scope.cancel()


async def _first_link(remote: RemoteVolume, claim_wait_s: float) -> Link:
    """The first connection; an ``own`` claim refused because another node holds the volume
    (EBUSY) is retried until ``claim_wait_s`` has passed — the holder may be letting go."""
    deadline = trio.current_time() + claim_wait_s
    while True:
        try:
            return await remote._connect()
        except BlockError as exc:
            if exc.errno != errno.EBUSY or trio.current_time() >= deadline:
                raise
            log.info("volume=%s event=claim_waiting reason=%r", remote.config.volume, str(exc))
            await trio.sleep(0.2)


def _sent(cmd: Command) -> None:
    """``cmd`` is on the wire: the early stage of protocol A (and of every non-write)."""
    if cmd.txn.stage == "sent" or (cmd.txn.stage and cmd.piece.op is not Op.WRITE):
        cmd.txn.reached(cmd)
