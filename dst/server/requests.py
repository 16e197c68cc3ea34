"""A server's data requests — READ, WRITE, FLUSH, TRIM, WRITE_ZEROES — as bios checked at the
edge (:func:`checked_bio`), run on a volume's stack at once (``submit_nowait``, by the
session's reader), started (``start``, a replication primary's WRITEs) or in a task
(``submit``), and their answers on the way out (:class:`Answer`)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from dst import chaos
from dst.block import Bio, BioFlags, BlockLayer, Op, Pending, Segment, validate_bio
from dst.errors import BlockError, FencedError
from dst.net.framed import Buffer
from dst.wire import (
    FlushRequest,
    FrameFlags,
    ReadRequest,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

if TYPE_CHECKING:
    from dst.server.pool import Pages
    from dst.server.session import Session
    from dst.server.volume import Volume

DataRequest = ReadRequest | WriteRequest | FlushRequest | TrimRequest | WriteZeroesRequest
OPS: dict[type, Op] = {
    ReadRequest: Op.READ,
    WriteRequest: Op.WRITE,
    FlushRequest: Op.FLUSH,
    TrimRequest: Op.TRIM,
    WriteZeroesRequest: Op.WRITE_ZEROES,
}


class Answer:
    """A data request on its way out: its reply frame's parts, what to release after."""

    __slots__ = ("began", "bio", "msg", "ok", "pages", "parts", "pending", "volume")

    def __init__(
        self, msg: DataRequest, volume: Volume | None, pages: Pages | None, began: float
    ) -> None:
        self.msg, self.volume, self.pages, self.began = msg, volume, pages, began
        self.parts: list[Buffer] = []
        self.ok = False
        #: A started request: its bio and outcome, made into ``parts`` when it is answered.
        self.bio: Bio | None = None
        self.pending: Pending | None = None


def complete_now(layer: BlockLayer, bio: Bio) -> bool:
    """Complete ``bio`` on ``layer`` at once if the layer can (``submit_nowait``): True if it
    did, False if it must be submitted; BlockError if it failed."""
    nowait = getattr(layer, "submit_nowait", None)
    if nowait is None:
        return False
    try:
        return bool(nowait(bio))
    except BlockError as exc:
        if not _eio_as_zeros(exc, bio):
            raise
        return True


async def submit(layer: BlockLayer, bio: Bio) -> None:
    """``layer.submit(bio)``, with the broken build's EIO-as-zeros as in complete_now."""
    try:
        await layer.submit(bio)
    except BlockError as exc:
        if not _eio_as_zeros(exc, bio):
            raise


def _eio_as_zeros(exc: BlockError, bio: Bio) -> bool:
    """Broken build ``eio-as-zeros``: a READ that failed with EIO is filled with zeros and
    answered as a success (True).  The real build never does this (False)."""
    if not (chaos.BROKEN and chaos.broken("eio-as-zeros")):
        return False
    if bio.op is not Op.READ or exc.errno != errno.EIO:
        return False
    for view in bio.views():
        view[:] = bytes(len(view))
    return True


# Per request: a table lookup, not an IntFlag construction (a microsecond or more each).
_BIO_FLAGS = {int(f): f for f in (BioFlags(n) for n in range(16))}
_NOT_RECV_ACK = ~int(FrameFlags.RECV_ACK)


def _bio_flags(bits: int) -> BioFlags:
    return _BIO_FLAGS[bits] if bits in _BIO_FLAGS else BioFlags(bits)


def checked_bio(
    session: Session, msg: DataRequest, volume: Volume | None, pages: Pages | None
) -> Bio:
    """The request's bio, checked at the edge: attached handle, no replayed write, an
    owner's epoch, a valid shape — or BlockError."""
    if volume is None:
        raise BlockError(errno.EBADF, f"handle {msg.handle} is not attached")
    # The Fence checks an owner's epoch; a replication peer's writes come fenced by its
    # primary already (epoch 0 passes), and a client's 0 is just old.
    epoch = 0
    if isinstance(msg, WriteRequest | TrimRequest | WriteZeroesRequest):
        if not session.replays.admit(msg.tid, msg.sub):
            session.server.stats["replayed_writes"] += 1
            raise BlockError(
                errno.EALREADY,
                f"write (tid {msg.tid}, sub {msg.sub}) was already applied on "
                "this connection: a replay is not applied again",
            )
        epoch = msg.epoch if session.role != "replica" else 0
        if session.role != "replica" and msg.epoch == 0:
            raise FencedError(f"epoch 0 is older than volume epoch {volume.epoch}")
    bio = bio_for(msg, pages, epoch)
    validate_bio(bio, volume.limits, volume.size)
    return bio


def bio_for(msg: DataRequest, pages: Pages | None, epoch: int = 0) -> Bio:
    op = OPS[type(msg)]
    if isinstance(msg, FlushRequest):
        return Bio(Op.FLUSH, 0, 0, (), _bio_flags(msg.flags))
    segments: tuple[Segment, ...] = ()
    if pages is not None:
        segments = tuple(Segment(v, 0, len(v)) for v in pages.views)
    # RECV_ACK is about the wire (answered by the read loop), not the block request.
    return Bio(op, msg.offset, msg.length, segments, _bio_flags(msg.flags & _NOT_RECV_ACK), epoch)
