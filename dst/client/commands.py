"""The records behind RemoteVolume: its configuration, transactions and commands, counters.

A bio becomes a :class:`Transaction` of one :class:`Command` per piece (seed 003); see
:mod:`dst.client.remote` for how they travel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from dst.block import Bio, BioFlags, Limits, Op
from dst.errors import BlockError
from dst.net.convert import page_runs
from dst.net.endpoints import Address
from dst.security.tls import TlsConfig
from dst.wire import (
    FlushRequest,
    FrameFlags,
    Message,
    ReadRequest,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

__all__ = [
    "Command",
    "RemoteConfig",
    "RemoteStatistics",
    "Transaction",
    "request_message",
]


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    address: Address
    volume: str
    tls: TlsConfig | None = None
    role: str = "client"
    node_id: str = ""
    page_size: int = 4096
    # Consecutive failed connection attempts before pending I/O fails with EIO (backoff grows
    # from 50 ms to 1 s, so the default rides out a server restart of ~15 s).
    max_retries: int = 20
    keepalive_s: float = 2.0
    # No frame at all for this long (pings included) and the connection is presumed dead.
    dead_after_s: float = 10.0
    # False for a replication peer: when the link breaks, pending commands fail at once with
    # ENOTCONN (the replication layer records them in its dirty bitmap) instead of waiting
    # for a reconnect; reconnecting goes on in the background.
    resend: bool = True
    # Limits of the caller's own, stacked on the client's and the server's (a boundary, say),
    # so that a bio becomes one transaction of commands none of which crosses them.
    limits: Limits | None = None
    # Other servers that hold the volume (a replicated pair): the client attaches wherever
    # the volume is primary — a secondary refuses the attach with EROFS — and after a
    # failover follows it to the other server.
    alternates: tuple[Address, ...] = ()
    # The deadline of a FAILFAST bio (module docstring); None: no deadline, a FAILFAST bio then
    # fails only when the server answers an error or the link dies (keepalive, dead_after_s).
    failfast_timeout_s: float | None = 1.0
    # A request with no answer for this long breaks its link (a frame lost on the way, or a
    # server stuck on it: pings still pass, so keepalive cannot tell); the next link resends
    # it.  None: wait forever.
    request_timeout_s: float | None = 60.0
    #: How the first attach claims the volume (dst/fence/claims.py): "share", "own" (a
    #: bridge) or "takeover".  Reconnects claim "own" at the epoch already held.
    claim: str = "share"


@dataclass(eq=False, slots=True)
class Transaction:
    remaining: int
    done: bool = False
    error: BlockError | None = None
    commands: list[Command] = field(default_factory=list)
    #: Replication protocols A and B: set once every command was sent (A) or received by
    #: the server (B) — or completed, whichever comes first.
    early: trio.Event | None = None
    stage: str = ""
    early_left: int = 0
    #: Called once every command is answered (:meth:`then`, the Pending protocol).
    callbacks: list[Callable[[], None]] | None = None
    #: A FAILFAST transaction's deadline (trio clock): a send of its commands that a plug
    #: held is bounded by it, as the rest of its life is.
    deadline: float = float("inf")

    async def wait(self) -> None:
        """Until every command is answered; the first error, if any, raised."""
        if not self.done:  # an event only for a transaction somebody waits for
            answered = trio.Event()
            self.then(answered.set)
            await answered.wait()
        if self.error is not None:
            raise self.error

    def then(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every command is answered (at once if they are)."""
        if self.done:
            callback()
        elif self.callbacks is None:
            self.callbacks = [callback]
        else:
            self.callbacks.append(callback)

    def finish_one(self, error: BlockError | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            self._finished()

    def fail(self, error: BlockError) -> None:
        """Complete now with ``error``: the transaction was abandoned (a FAILFAST deadline or
        trip) and its commands taken out of the pending table, so no reply finishes it."""
        if not self.done:
            self.error, self.remaining = error, 0
            self._finished()

    def _finished(self) -> None:
        self.done = True
        for callback in self.callbacks or ():
            callback()

    def reached(self, cmd: Command) -> None:
        """``cmd`` reached the early stage (or completed)."""
        if self.early is not None and not cmd.early_done:
            cmd.early_done = True
            self.early_left -= 1
            if self.early_left == 0:
                self.early.set()


@dataclass(eq=False, slots=True)
class Command:
    tid: int
    sub: int
    piece: Bio
    txn: Transaction
    generation: int = -1  # the link it was last sent on
    early_done: bool = False
    sent_at: float = 0.0  # trio clock, when it was last sent


@dataclass(slots=True)
class RemoteStatistics:
    transactions: int = 0
    commands: int = 0
    resent: int = 0
    reconnects: int = 0
    failed: int = 0
    failfast_trips: int = 0
    orphans: int = 0


def request_message(cmd: Command, handle: int, epoch: int, page_size: int) -> Message:
    """The wire request for one command on a link with ``handle`` and ``epoch``."""
    piece = cmd.piece
    common = {"tid": cmd.tid, "sub": cmd.sub, "handle": handle}
    flags = int(piece.flags)
    if piece.op is Op.READ:
        pages = page_runs(piece, page_size)
        return ReadRequest(offset=piece.offset, length=piece.length, pages=pages, **common)
    if piece.op is Op.WRITE:
        pages = page_runs(piece, page_size)
        if cmd.txn.stage == "received":
            flags |= FrameFlags.RECV_ACK
        return WriteRequest(
            offset=piece.offset,
            length=piece.length,
            epoch=epoch,
            pages=pages,
            flags=flags,
            **common,
        )
    if piece.op is Op.FLUSH:
        # FUA and PREFLUSH say nothing more about a FLUSH, and the wire allows only FAILFAST.
        return FlushRequest(flags=flags & BioFlags.FAILFAST, **common)
    cls = TrimRequest if piece.op is Op.TRIM else WriteZeroesRequest
    return cls(offset=piece.offset, length=piece.length, epoch=epoch, flags=flags, **common)
