"""The replication peer link's life: its handshake, the epoch, and the resync.

Each new link to the secondary is handshaken before it carries a write (:func:`handshake`):
first, extents the old peer had completed but not flushed are marked, since a peer that
restarted lost them; then both sides compare generation ids (``sync.py``).  A takeover's epoch
is shared at once if the peer is there (:func:`share_epoch`), else by the next handshake.
:func:`resync_forever` runs in ``Replicated.run_resync``: while the peer is connected and the
bitmap has dirty extents it copies them over (``resync.py`` runs the copies), each under its
extent's range lock, then ends the resync in the generation ids of both sides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from dst import chaos
from dst.block import Bio, Op
from dst.client.link import Link, LinkBroken
from dst.errors import BlockError
from dst.replication.resync import copy_dirty_extents
from dst.replication.sync import connect_handshake
from dst.wire import SyncRequest

if TYPE_CHECKING:
    from dst.replication.layer import Replicated

__all__ = ["handshake", "resync_forever", "share_epoch"]

log = logging.getLogger("dst.replication")


async def handshake(layer: Replicated, link: Link) -> None:
    """The peer link's ``on_link``: run before a new link takes any write."""
    # A new link may lead to a peer that restarted — after a crash or a power cut that took
    # whatever it had completed but not flushed (DRBD clears its transfer log into the
    # bitmap on a lost connection for the same reason).  Those extents are resynced;
    # without this, protocol C's acknowledged-but-unflushed writes were missing on the peer
    # for good when it came back before the next FLUSH.
    if layer._unflushed or layer._unflushed_overflow or layer._resync_unflushed:
        unflushed = layer._unflushed | layer._resync_unflushed
        overflow = layer._unflushed_overflow
        layer._unflushed, layer._unflushed_overflow = set(), False
        layer._resync_unflushed = set()
        await layer._mark_unflushed(unflushed, overflow, "peer_relinked", "unflushed on peer")
    await connect_handshake(layer.state, partial(_sync, layer, link))


async def _sync(
    layer: Replicated, link: Link, action: str, state: Mapping[str, Any]
) -> Mapping[str, Any]:
    """A SyncRequest to the peer on ``link``; its state in answer."""
    msg = SyncRequest(layer.peer.new_tid(), layer.peer.config.volume, action, state)
    return (await link.call(msg, layer.peer.config.request_timeout_s)).status


async def share_epoch(layer: Replicated, epoch: int) -> None:
    """Tell the peer about a takeover's epoch; if it is away, the next handshake does."""
    link = layer.peer.link
    if link is None:
        return
    try:
        await _sync(layer, link, "epoch", {"epoch": epoch})
    except (BlockError, LinkBroken) as exc:
        log.warning("event=epoch_not_shared epoch=%d reason=%r", epoch, str(exc))


async def resync_forever(layer: Replicated) -> None:
    """When the peer is connected and extents are dirty, copy them over; when none are left,
    end the resync in the generation ids of both sides."""
    while True:
        await layer.peer.wait_connected()
        if layer.bitmap.dirty_bytes:
            await _resync_pass(layer)
        if not layer.bitmap.dirty_bytes and layer.state.needs_finish:
            await _finish_resync(layer)
        await trio.sleep(0.2)


async def _finish_resync(layer: Replicated) -> None:
    """The source's step, persisted, then the target adopts our tuple (sync.py)."""
    state = layer.state
    try:
        await layer.peer.submit(Bio(Op.FLUSH, 0, 0))
        if not await state.finish_as_source():
            return
        link = layer.peer.link
        if link is None:
            log.warning("event=resync_finish_interrupted reason='link lost before adopt'")
            return
        await _sync(layer, link, "adopt", {"generations": state.generations.to_json()})
    except (BlockError, LinkBroken) as exc:
        log.warning("event=resync_finish_interrupted reason=%r", str(exc))
        return
    state.peer_needs_adopt = False
    state.verdict = "in sync"
    log.info("event=in_sync generations=%s", state.generations.to_json()["current"])


async def _resync_pass(layer: Replicated) -> None:
    started = trio.current_time()
    progress = layer._progress
    log.info("event=resync_started out_of_sync=%d", layer.bitmap.dirty_bytes)
    interrupted = ""
    try:
        await copy_dirty_extents(
            layer.bitmap,
            layer.size,
            partial(_copy, layer),
            rate=layer.resync_rate,
            progress=progress,
        )
        await layer.peer.submit(Bio(Op.FLUSH, 0, 0))
        layer._resync_unflushed.clear()  # the copies are stable on the peer now
        await trio.to_thread.run_sync(layer.bitmap.flush)
    except* BlockError as group:
        interrupted = str(group.exceptions[0])
    if interrupted:
        log.warning("event=resync_interrupted done=%d reason=%r", progress.done_bytes, interrupted)
        return
    log.info(
        "event=resync_finished bytes=%d seconds=%.2f",
        progress.done_bytes,
        trio.current_time() - started,
    )


async def _copy(layer: Replicated, offset: int, view: memoryview) -> None:
    """Copy one extent local → peer and clear its bit, all under the extent's lock: a write
    racing the copy lands on both sides after it, and a write that degrades marks the extent
    after the clear, never before it."""
    async with layer._locks.locked(offset, offset + len(view)):
        if chaos.BROKEN and chaos.broken("resync-wrong-side"):
            # Broken build: the stale peer's bytes overwrite the up-to-date local ones.
            await layer.peer.submit(Bio.from_buffer(Op.READ, offset, view))
            await layer.local.submit(Bio.from_buffer(Op.WRITE, offset, view))
        else:
            await layer.local.submit(Bio.from_buffer(Op.READ, offset, view))
            await layer.peer.submit(Bio.from_buffer(Op.WRITE, offset, view))
        layer.bitmap.clear(offset, len(view))
        step = layer.bitmap.extent_size
        layer._resync_unflushed.update(range(offset // step, (offset + len(view) - 1) // step + 1))
        layer._resynced += len(view)
