"""The server's answers to the messages that are not data: the handshake (Hello, then
Welcome or Goodbye), Attach (with its claim), status, promote, sync (replication state,
split-brain resolution) and checksums (``dst verify``).

After the handshake each runs in its own task, in an in-flight slot of its session, like a
data request.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import crc32c
import trio

from dst.block import Bio, Op, Segment
from dst.errors import BlockError, ProtocolError
from dst.net.convert import limits_to_wire
from dst.replication.peer import REPLICATION_NODE_SUFFIX
from dst.server.status import status_document
from dst.wire import (
    PROTOCOL_VERSION,
    Attach,
    Attached,
    ChecksumRequest,
    Goodbye,
    Hello,
    PromoteRequest,
    Reply,
    StatusReply,
    StatusRequest,
    SyncRequest,
    Welcome,
    encode_frame,
    pack_checksums,
)

if TYPE_CHECKING:
    from dst.server.session import Session
    from dst.server.volume import Volume

log = logging.getLogger("dst.server")

# A connected peer must say Hello within this time; until then it holds one socket and a
# 256 KiB read buffer, nothing more.
HELLO_TIMEOUT_S = 10.0
ROLES = ("client", "bridge", "replica")


async def handshake(session: Session) -> bool:
    """Hello, checked, then Welcome — or a Goodbye naming the refusal (False: closed)."""
    with trio.move_on_after(HELLO_TIMEOUT_S) as scope:
        head = await session.framed.read_head()
    if scope.cancelled_caught or head is None:
        log.warning("peer=%s event=closed reason='no Hello'", session.peer)
        return False
    prefix, hello = head
    if not isinstance(hello, Hello):
        raise ProtocolError(f"expected Hello first, got {type(hello).__name__}")
    session.conn.receive(prefix, hello)
    session.node = hello.node_id
    session.role = hello.role
    refusal = _refusal(session, hello)
    if refusal is not None:
        code, text = refusal
        log.warning("peer=%s node=%s event=refused reason=%r", session.peer, session.node, text)
        await session.framed.send(encode_frame(Goodbye(errno=code, message=text)))
        return False
    srv = session.server
    await session.send(
        Welcome(
            version=PROTOCOL_VERSION,
            node_id=srv.node_id,
            role="replica",
            page_size=srv.page_size,
            limits=limits_to_wire(srv.limits),
            features=tuple(f for f in hello.features if f in srv.features),
            max_inflight=srv.max_inflight,
        )
    )
    log.info(
        "peer=%s node=%s role=%s page_size=%d event=connected",
        session.peer,
        session.node,
        hello.role,
        hello.page_size,
    )
    return True


def _refusal(session: Session, hello: Hello) -> tuple[int, str] | None:
    low, high = hello.versions
    if not low <= PROTOCOL_VERSION <= high:
        return errno.EPROTONOSUPPORT, (
            f"protocol versions {low}..{high} offered; this server speaks {PROTOCOL_VERSION}"
        )
    if hello.role not in ROLES:
        return errno.EPERM, f"role {hello.role!r} unknown"
    if session.tls_role is not None and hello.role != session.tls_role:
        return errno.EPERM, (
            f"role {hello.role!r} in Hello but the certificate says {session.tls_role!r}"
        )
    return None


async def status(session: Session, msg: StatusRequest) -> None:
    await session.reply(StatusReply(tid=msg.tid, status=status_document(session.server)))


async def promote(session: Session, msg: PromoteRequest) -> None:
    try:
        await session.server.promote(msg.volume, force=msg.force)
    except BlockError as exc:
        await session.answer(msg.tid, 0, exc.errno, exc.message)
        return
    await session.reply(Reply(tid=msg.tid, sub=0, errno=0, message=""))


async def sync(session: Session, msg: SyncRequest) -> None:
    try:
        state = await session.server.sync(msg.volume, msg.action, msg.state, session.role)
    except BlockError as exc:
        await session.answer(msg.tid, 0, exc.errno, exc.message)
        return
    await session.reply(StatusReply(tid=msg.tid, status=state))


async def checksum(session: Session, msg: ChecksumRequest) -> None:
    """crc32c of each ``extent`` of the range, read locally a chunk at a time: what
    ``dst verify`` compares across replicas without moving the data."""
    volume = session.handles.get(msg.handle)
    try:
        if volume is None:
            raise BlockError(errno.EBADF, f"handle {msg.handle} is not attached")
        if msg.offset % 512 or msg.offset + msg.length > volume.size:
            raise BlockError(
                errno.EINVAL,
                f"checksum range offset={msg.offset} length={msg.length} is misaligned "
                f"or past the end (size {volume.size})",
            )
        crcs = await _extent_crcs(session, volume, msg.offset, msg.length, msg.extent)
    except BlockError as exc:
        await session.answer(msg.tid, msg.sub, exc.errno, exc.message)
        return
    data = [memoryview(pack_checksums(crcs))]
    await session.reply(Reply(tid=msg.tid, sub=msg.sub, errno=0, message=""), data)


async def _extent_crcs(
    session: Session, volume: Volume, offset: int, length: int, extent: int
) -> list[int]:
    chunk = min(session.server.limits.max_bytes, length)
    pages = await session.server.pool.acquire(chunk)
    try:
        crcs: list[int] = []
        pos, end = offset, offset + length
        while pos < end:
            n = min(chunk, end - pos, extent - (pos - offset) % extent)
            views, left = [], n
            for v in pages.views:
                views.append(v[: min(len(v), left)])
                left -= len(views[-1])
                if not left:
                    break
            bio = Bio(Op.READ, pos, n, tuple(Segment(v, 0, len(v)) for v in views))
            await volume.layer.submit(bio)
            index = (pos - offset) // extent
            if index == len(crcs):
                crcs.append(0)
            crcs[index] = data_crc_continue(crcs[index], views)
            pos += n
        return crcs
    finally:
        pages.release()


async def attach(session: Session, msg: Attach) -> None:
    volume = session.server.volumes.get(msg.volume)
    if volume is None:
        text = f"volume {msg.volume!r} does not exist on this server"
        await session.answer(msg.tid, 0, errno.ENOENT, text)
        return
    secondary = volume.replicated is None and session.server.role == "secondary"
    if secondary and session.role != "replica":
        text = f"volume {msg.volume!r} is secondary on this server; only its primary writes to it"
        await session.answer(msg.tid, 0, errno.EROFS, text)
        return
    if volume.replicated is not None and session.node.endswith(REPLICATION_NODE_SUFFIX):
        # Another server wants to replicate into a volume that is primary here: two
        # primaries, both taking writes. Never let one overwrite the other; once one is
        # restarted as secondary, the generation ids show the split brain (sync.py).
        log.error(
            "peer=%s node=%s volume=%s event=split_brain_suspected "
            "reason='both servers are primary'",
            session.peer,
            session.node,
            volume.name,
        )
        text = (
            f"volume {msg.volume!r} is primary on this server too "
            "(split brain?): restart one side with --role secondary"
        )
        await session.answer(msg.tid, 0, errno.EBUSY, text)
        return
    # A replication peer is not an owner: its primary fenced what it sends.
    replica = session.role == "replica"
    claim = "share" if replica else msg.claim
    try:
        epoch = await volume.ownership.claim(session.node, claim, 0 if replica else msg.epoch)
    except BlockError as exc:
        await session.answer(msg.tid, 0, exc.errno, exc.message)
        return
    if claim != "share":
        session.claimed.append(volume)
    if replica and session.node.endswith(REPLICATION_NODE_SUFFIX):
        old = volume.replication_link
        if old is not None and old is not session.scope:
            log.warning(
                "peer=%s node=%s volume=%s event=replication_link_replaced",
                session.peer,
                session.node,
                volume.name,
            )
            old.cancel()
        volume.replication_link = session.scope
    handle = next((h for h, v in session.handles.items() if v is volume), None)
    if handle is None:
        handle = len(session.handles) + 1
        session.handles[handle] = volume
    await session.reply(
        Attached(
            tid=msg.tid,
            handle=handle,
            size=volume.size,
            epoch=epoch,
            limits=limits_to_wire(volume.limits),
        )
    )
    log.info(
        "peer=%s node=%s volume=%s claim=%s epoch=%d event=attached",
        session.peer,
        session.node,
        volume.name,
        claim,
        epoch,
    )


def data_crc_continue(crc: int, views: list[memoryview]) -> int:
    for v in views:
        crc = crc32c.crc32c(v, crc)
    return crc
