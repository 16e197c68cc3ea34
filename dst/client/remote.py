"""RemoteVolume: a block layer whose storage is a volume on a dst server.

``open_remote(address, volume)`` (:mod:`dst.client.supervisor`) connects, says Hello,
attaches the volume and yields a ``RemoteVolume``: ``limits``, ``size``, ``submit(bio)``,
``aclose()``, like every layer.

A bio becomes a *transaction* (seed 003): ``split(bio, limits)`` cuts it into the runs the
server takes as one request each, every run is sent as a command ``(tid, sub)``, and the
transaction completes when its last reply arrives — in any order; the first error wins.
Many transactions are in flight at once, up to the server's ``max_inflight``.

One supervisor task owns the connection (:mod:`dst.client.supervisor`): it reconnects and
resends what has no reply yet.

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
from collections.abc import Awaitable, Callable

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
from dst.client.link import Link, LinkBroken
from dst.errors import BlockError, FencedError
from dst.wire import (
    MAX_PAGE_RUNS,
    Received,
    Reply,
)

__all__ = ["RemoteConfig", "RemoteVolume"]

log = logging.getLogger("dst.client")

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
        self._wake_senders()  # waiting for a link that will not come

    # -- the connection supervisor ---------------------------------------------------------

    def _set_link(self, link: Link | None) -> None:
        self._link = link
        self._wake_senders()

    def _wake_senders(self) -> None:
        """Wake the senders waiting for a link: one came, went, or will not come."""
        self._link_changed.set()
        self._link_changed = trio.Event()

    async def run(self, first: Link | None, *, task_status: trio.TaskStatus[None]) -> None:
        """Supervise the connection forever: run a link, and when it breaks, get another;
        and trip the volume when a started FAILFAST bio reaches its deadline."""
        from dst.client.supervisor import supervise  # it builds RemoteVolumes: imports this

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tripwire.watch_deadlines)
            await supervise(self, first, task_status)
            nursery.cancel_scope.cancel()


def _sent(cmd: Command) -> None:
    """``cmd`` is on the wire: the early stage of protocol A (and of every non-write)."""
    if cmd.txn.stage == "sent" or (cmd.txn.stage and cmd.piece.op is not Op.WRITE):
        cmd.txn.reached(cmd)
