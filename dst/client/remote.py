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
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from dst.block import Bio, Limits, Op, split, validate_bio
from dst.block.layer import closed_error
from dst.client.link import Link, LinkBroken, open_link
from dst.errors import BlockError, ConfigError, ProtocolError
from dst.net.convert import page_runs
from dst.net.endpoints import Address
from dst.security.tls import TlsConfig
from dst.wire import (
    MAX_PAGE_RUNS,
    FlushRequest,
    Message,
    ReadRequest,
    Reply,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

log = logging.getLogger("dst.client")

#: How a connection attempt fails: unreachable, refused, broken, or answered with an error.
CONNECT_ERRORS = (OSError, trio.BrokenResourceError, ProtocolError, BlockError, trio.TooSlowError)


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
    # Other servers that hold the volume (a replicated pair): the client attaches wherever
    # the volume is primary — a secondary refuses the attach with EROFS — and after a
    # failover follows it to the other server.
    alternates: tuple[Address, ...] = ()


@dataclass(eq=False, slots=True)
class Transaction:
    remaining: int
    done: trio.Event = field(default_factory=trio.Event)
    error: BlockError | None = None

    def finish_one(self, error: BlockError | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


@dataclass(eq=False, slots=True)
class Command:
    tid: int
    sub: int
    piece: Bio
    txn: Transaction
    generation: int = -1  # the link it was last sent on


@dataclass(slots=True)
class RemoteStatistics:
    transactions: int = 0
    commands: int = 0
    resent: int = 0
    reconnects: int = 0
    failed: int = 0


class RemoteVolume:
    """The client side of one attached volume (see the module docstring)."""

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        # A command's page list must stay within MAX_PAGE_RUNS runs: a request covers at most
        # max_bytes / page_size whole pages plus two partial pages per segment.
        self.own_limits = Limits(
            page_size=config.page_size,
            max_bytes=(MAX_PAGE_RUNS // 2) * config.page_size,
            max_segments=MAX_PAGE_RUNS // 4,
        ).validate()
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
        self.stats = RemoteStatistics()

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

    def in_flight(self) -> int:
        """Commands sent or about to be sent and not yet answered."""
        return len(self._pending)

    async def wait_connected(self) -> None:
        while self._link is None:
            await self._link_changed.wait()

    async def submit(self, bio: Bio) -> None:
        if self._closed:
            raise closed_error(f"volume {self.config.volume!r}")
        if self._slots is None or (self._link is None and not self.config.resend):
            raise BlockError(errno.ENOTCONN, f"not connected to {self.config.address}")
        validate_bio(bio, self._limits, self._size)
        pieces = split(bio, self._limits)
        txn = Transaction(len(pieces))
        tid = next(self._ids)
        self.stats.transactions += 1
        for sub, piece in enumerate(pieces):
            try:  # a free slot is taken without a trip through the scheduler
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                await self._slots.acquire()
            cmd = Command(tid, sub, piece, txn)
            self._pending[(tid, sub)] = cmd
            self.stats.commands += 1
            await self._send(cmd)
        await txn.done.wait()
        if txn.error is not None:
            raise txn.error

    async def aclose(self) -> None:
        self._closed = True
        self._fail_all(BlockError(errno.ESHUTDOWN, "volume closed while the request was pending"))

    # -- sending ---------------------------------------------------------------------------

    def _request(self, cmd: Command, link: Link) -> Message:
        piece = cmd.piece
        common = {"tid": cmd.tid, "sub": cmd.sub, "handle": link.handle}
        flags = int(piece.flags)
        if piece.op is Op.READ:
            pages = page_runs(piece, self.config.page_size)
            return ReadRequest(offset=piece.offset, length=piece.length, pages=pages, **common)
        if piece.op is Op.WRITE:
            pages = page_runs(piece, self.config.page_size)
            return WriteRequest(
                offset=piece.offset,
                length=piece.length,
                epoch=link.epoch,
                pages=pages,
                flags=flags,
                **common,
            )
        if piece.op is Op.FLUSH:
            return FlushRequest(flags=flags, **common)
        cls = TrimRequest if piece.op is Op.TRIM else WriteZeroesRequest
        return cls(
            offset=piece.offset, length=piece.length, epoch=link.epoch, flags=flags, **common
        )

    async def _send(self, cmd: Command) -> None:
        """Send ``cmd`` on the current link, waiting for one if there is none.  A command
        whose link breaks stays pending; the next link resends it."""
        while True:
            link = self._link
            if link is None:
                if not self.config.resend:
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
                await link.send(self._request(cmd, link), data)
            except (LinkBroken, trio.BrokenResourceError, trio.ClosedResourceError):
                link.broken("send failed")
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
        cmd.txn.finish_one(error)

    def _fail_all(self, error: BlockError) -> None:
        for cmd in list(self._pending.values()):
            self._complete(cmd, error)

    def on_reply(self, reply: Reply) -> Command | None:
        """Called by the link's reader for each reply; returns the command for a successful
        READ so the reader can receive its data into the command's buffers first."""
        return self._pending.get((reply.tid, reply.sub))

    def on_done(self, cmd: Command, reply: Reply) -> None:
        err = None if reply.errno == 0 else BlockError(reply.errno, reply.message)
        self._complete(cmd, err)

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
                )
            except CONNECT_ERRORS as exc:
                error = exc
                continue
            self._server_index = servers.index(address)
            self._generation += 1
            return link
        assert error is not None
        raise error

    def _adopt(self, link: Link) -> None:
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
        """Supervise the connection forever: run a link, and when it breaks, get another."""
        link: Link | None = first
        task_status.started()
        failures = 0
        while True:
            if link is not None:
                failures = 0
                self._giving_up = False
                await self._run_link(link)
                self.stats.reconnects += 1
                link = None
                if self._closed:
                    return
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

    async def _run_link(self, link: Link) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run_reader)
                nursery.start_soon(
                    link.run_keepalive, self.config.keepalive_s, self.config.dead_after_s
                )
                self._set_link(link)
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
            if not self.config.resend:
                self._fail_all(BlockError(errno.ENOTCONN, f"peer link lost: {link.reason}"))
            await trio.aclose_forcefully(link.framed.stream)
        log.warning(
            "volume=%s server=%s event=disconnected reason=%r pending=%d",
            self.config.volume,
            self.config.address,
            link.reason,
            len(self._pending),
        )


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
) -> AsyncIterator[RemoteVolume]:
    """Connect to ``address``, attach ``volume`` and yield it as a block layer.

    ``address`` may list several servers (a replicated pair): the volume is attached where it
    is primary.  The first connection must succeed (so size and limits are known); later
    outages are ridden out as the module docstring describes.
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
    )
    remote = RemoteVolume(config)
    first = await remote._connect()
    remote._adopt(first)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run, first)
        try:
            yield remote
        finally:
            await remote.aclose()
            nursery.cancel_scope.cancel()
