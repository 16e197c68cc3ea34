"""The connection supervisor of a RemoteVolume, and ``open_remote``, which starts one.

``open_remote(address, volume)`` connects, says Hello, attaches the volume and yields a
:class:`~dst.client.remote.RemoteVolume`, whose ``run`` task supervises the connection from
then on (:func:`supervise`).  When the server goes away (EOF, reset, a frame that fails its
crc, keepalive silence, a request unanswered for ``request_timeout_s``), the supervisor
reconnects with backoff — to the first of the listed servers that attaches, starting with the
last good one — attaches again and resends every command that has no reply yet: writes are
idempotent, and none of them was acknowledged to the user, so resending is safe.  After
``max_retries`` consecutive failed attempts, pending and new I/O fails with EIO until a
connection succeeds again.  A link that the volume's ``on_link`` refuses (the replication
handshake) is retried like a failed connect.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from dst.block import BioFlags
from dst.client.commands import RemoteConfig
from dst.client.link import Link, LinkBroken, open_link
from dst.client.remote import RemoteVolume
from dst.errors import BlockError, ConfigError, ProtocolError
from dst.net.endpoints import Address
from dst.security.tls import TlsConfig

__all__ = ["CONNECT_ERRORS", "open_remote", "supervise"]

log = logging.getLogger("dst.client")

#: How a connection attempt fails: unreachable, refused, broken, or answered with an error.
CONNECT_ERRORS = (OSError, trio.BrokenResourceError, ProtocolError, BlockError, trio.TooSlowError)


async def connect(remote: RemoteVolume) -> Link:
    """A link to the first server, starting with the last good one, that attaches."""
    cfg = remote.config
    servers = [cfg.address, *cfg.alternates]
    order = servers[remote._server_index :] + servers[: remote._server_index]
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
                generation=remote._generation,
                tid=next(remote._ids),
                owner=remote,
                claim=_claim(remote),
                # A replication link is not an owner: nothing to fence, no epoch to name.
                epoch=remote.epoch if cfg.role != "replica" else 0,
            )
        except BlockError as exc:
            if exc.errno == errno.ESTALE:
                remote._fence(str(exc))
                raise
            # A secondary's EROFS only says "not here"; another server's reason is news.
            if error is None or getattr(error, "errno", None) == errno.EROFS:
                error = exc
            continue
        except CONNECT_ERRORS as exc:
            error = exc
            continue
        remote._server_index = servers.index(address)
        remote._generation += 1
        return link
    assert error is not None
    raise error


def _claim(remote: RemoteVolume) -> str:
    if remote.config.claim == "share" or not remote.epoch:
        return remote.config.claim
    return "own"  # a reconnect: keep the epoch already granted


def adopt(remote: RemoteVolume, link: Link) -> None:
    remote.epoch = link.epoch
    limits = remote.own_limits.stack(link.limits)
    if remote._size and (link.size != remote._size or limits != remote._limits):
        log.warning(
            "volume=%s event=geometry_changed size=%d->%d",
            remote.config.volume,
            remote._size,
            link.size,
        )
    remote._size = link.size
    remote._limits = limits
    if remote._slots is None:
        remote._slots = trio.Semaphore(link.max_inflight)


async def supervise(
    remote: RemoteVolume, first: Link | None, task_status: trio.TaskStatus[None]
) -> None:
    """Run a link, and when it breaks, get another (module docstring); forever, unless the
    volume is closed or fenced."""
    link: Link | None = first
    task_status.started()
    failures = 0
    while True:
        if link is not None:
            refusal = await _run_link(remote, link)
            link = None
            if remote._closed or remote.fenced:
                return
            if refusal is None:
                failures = 0
                remote._giving_up = False
                remote.stats.reconnects += 1
            else:
                failures += 1
                await trio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))
                continue
        try:
            first_ever = remote._slots is None
            link = await connect(remote)
            adopt(remote, link)
            servers = [remote.config.address, *remote.config.alternates]
            log.info(
                "volume=%s server=%s event=%s",
                remote.config.volume,
                servers[remote._server_index],
                "connected" if first_ever else "reconnected",
            )
        except CONNECT_ERRORS as exc:
            if remote.fenced:
                return
            failures += 1
            # The first failure is news; a peer retrying for hours should not flood the log.
            level = logging.WARNING if failures == 1 or failures % 60 == 0 else logging.DEBUG
            log.log(
                level,
                "volume=%s server=%s attempt=%d event=connect_failed reason=%r",
                remote.config.volume,
                remote.config.address,
                failures,
                str(exc),
            )
            if failures >= remote.config.max_retries and not remote._giving_up:
                remote._giving_up = True
                remote._fail_all(BlockError(errno.EIO, remote._down_message()))
                remote._wake_senders()
            await trio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))


async def _watch_requests(remote: RemoteVolume, link: Link, timeout_s: float) -> None:
    """Break ``link`` when a request sent on it stays unanswered for ``timeout_s``."""
    while True:
        await trio.sleep(min(1.0, timeout_s / 4))
        sent = [c.sent_at for c in remote._pending.values() if c.generation == link.generation]
        age = trio.current_time() - min(sent, default=trio.current_time())
        if age > timeout_s:
            link.broken(f"a request unanswered for {age:.1f} s")
            return


async def _run_link(remote: RemoteVolume, link: Link) -> str | None:
    """Run ``link`` until it breaks; the reason ``on_link`` refused it, or None."""
    refusal: str | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run_reader)
            nursery.start_soon(
                link.run_keepalive, remote.config.keepalive_s, remote.config.dead_after_s
            )
            if remote.config.request_timeout_s is not None:
                nursery.start_soon(_watch_requests, remote, link, remote.config.request_timeout_s)
            if remote.on_link is not None:
                try:
                    await remote.on_link(link)
                except (BlockError, LinkBroken, ProtocolError) as exc:
                    refusal = str(exc)
                    link.broken(f"refused: {refusal}")
            if refusal is None:
                remote._set_link(link)
                remote._tripwire.error = None  # a new link: the server answers again
                # Resend what the last link left unanswered, oldest first.
                for key in sorted(remote._pending):
                    cmd = remote._pending[key]
                    if cmd.generation != link.generation:
                        if cmd.generation != -1:
                            remote.stats.resent += 1
                        nursery.start_soon(remote._send, cmd)
            await link.wait_broken()
            nursery.cancel_scope.cancel()
    finally:
        remote._set_link(None)
        for _ in range(remote._orphans.link_died()):  # never to be answered now
            assert remote._slots is not None
            remote._slots.release()
        lost = BlockError(errno.ENOTCONN, f"link lost: {link.reason}")
        if not remote.config.resend:
            remote._fail_all(lost)
        else:  # FAILFAST commands are never resent
            for cmd in list(remote._pending.values()):
                if cmd.piece.flags & BioFlags.FAILFAST:
                    remote._complete(cmd, lost)
        await trio.aclose_forcefully(link.framed.stream)
    if refusal is None:
        log.warning(
            "volume=%s server=%s event=disconnected reason=%r pending=%d",
            remote.config.volume,
            remote.config.address,
            link.reason,
            len(remote._pending),
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
        first = await first_link(remote, claim_wait_s)
        adopt(remote, first)
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


async def first_link(remote: RemoteVolume, claim_wait_s: float) -> Link:
    """The first connection; an ``own`` claim refused because another node holds the volume
    (EBUSY) is retried until ``claim_wait_s`` has passed — the holder may be letting go."""
    deadline = trio.current_time() + claim_wait_s
    while True:
        try:
            return await connect(remote)
        except BlockError as exc:
            if exc.errno != errno.EBUSY or trio.current_time() >= deadline:
                raise
            log.info("volume=%s event=claim_waiting reason=%r", remote.config.volume, str(exc))
            await trio.sleep(0.2)
