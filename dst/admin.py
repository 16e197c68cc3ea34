"""Operator commands that talk to servers: ``dst status``, ``dst promote``, ``dst resolve``,
``dst verify``.
Each opens short admin connections of its own, asks, and closes."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from dst.client.link import SETUP_TIMEOUT_S, handshake, request
from dst.errors import BlockError, ConfigError, DstError, ProtocolError
from dst.net.endpoints import Address, connect
from dst.net.framed import FramedStream, describe
from dst.security.tls import TlsConfig, own_role
from dst.wire import (
    Attach,
    Attached,
    ChecksumRequest,
    Connection,
    PromoteRequest,
    Reply,
    StatusReply,
    StatusRequest,
    SyncRequest,
    encode_frame,
    unpack_checksums,
)


@asynccontextmanager
async def _session(
    address: Address, tls: TlsConfig | None, purpose: str, *, role: str | None = None
) -> AsyncIterator[tuple[FramedStream, Connection]]:
    """A short admin connection: connected, Hello answered, closed on exit.  The Hello
    claims ``role``, by default the role in our certificate (a server's own replica
    directory works for ``dst status`` on that host), or client without TLS."""
    if role is None:
        role = own_role(tls) if tls is not None else "client"
    framed, _ = await connect(address, tls)
    try:
        node = f"{socket.gethostname()}:{os.getpid()}/{purpose}"
        with trio.fail_after(SETUP_TIMEOUT_S):
            conn, _ = await handshake(framed, role=role, node_id=node, page_size=4096)
        yield framed, conn
    finally:
        await trio.aclose_forcefully(framed.stream)


async def fetch_status(address: Address, tls: TlsConfig | None) -> Mapping[str, Any]:
    async with _session(address, tls, "status") as (framed, conn):
        with trio.fail_after(SETUP_TIMEOUT_S):
            reply = await request(framed, conn, StatusRequest(tid=1), StatusReply)
    return reply.status


async def fetch_statuses(
    addresses: Sequence[Address], tls: TlsConfig | None
) -> list[Mapping[str, Any] | str]:
    """The status of every server, asked at once; an unreachable one gives the reason."""
    results: list[Mapping[str, Any] | str] = ["" for _ in addresses]

    async def one(i: int, address: Address) -> None:
        try:
            with trio.fail_after(2 * SETUP_TIMEOUT_S):
                results[i] = await fetch_status(address, tls)
        except (OSError, DstError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            results[i] = describe(exc) if not isinstance(exc, trio.TooSlowError) else "timed out"

    async with trio.open_nursery() as nursery:
        for i, address in enumerate(addresses):
            nursery.start_soon(one, i, address)
    return results


async def promote(address: Address, volume: str, tls: TlsConfig | None, *, force: bool) -> None:
    """Ask a secondary to become the primary of ``volume``; BlockError if it refuses."""
    async with _session(address, tls, "promote") as (framed, conn):
        with trio.fail_after(SETUP_TIMEOUT_S):
            msg = PromoteRequest(tid=1, volume=volume, force=force)
            reply = await request(framed, conn, msg, Reply)
    if reply.errno:
        raise BlockError(reply.errno, reply.message)


async def resolve(address: Address, volume: str, tls: TlsConfig | None) -> Mapping[str, Any]:
    """Name the server at ``address`` (a primary) the survivor of a split brain on ``volume``;
    its state in answer.  BlockError if it refuses."""
    async with _session(address, tls, "resolve") as (framed, conn):
        with trio.fail_after(SETUP_TIMEOUT_S):
            msg = SyncRequest(tid=1, volume=volume, action="resolve", state={})
            reply = await request(framed, conn, msg, StatusReply)
    return reply.status


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def render_status(doc: Mapping[str, Any]) -> str:
    """The status document as a table an operator reads at a glance."""
    sessions = ", ".join(f"{k} {v}" for k, v in doc.get("sessions", {}).items()) or "none"
    lines = [
        f"node {doc['node']}  role {doc['role']}  listen {doc['listen']}  "
        f"peer {doc.get('peer') or '-'}  uptime {doc['uptime_s']}s",
        f"sessions: {sessions}",
        "",
        f"{'VOLUME':<12}{'SIZE':>11}  {'CONNECTION':<13}{'DISK':<12}{'PEER-DISK':<11}"
        f"{'OUT-OF-SYNC':>12}  RESYNC",
    ]
    for name, v in doc.get("volumes", {}).items():
        resync = v.get("resync") or {}
        if resync.get("active"):
            bar = progress_bar(resync["done_bytes"], resync["total_bytes"])
            progress = f"{bar} at {_size(resync['rate_bytes_s'])}/s"
        else:
            progress = "-"
        oos = v.get("out_of_sync_bytes")
        lines.append(
            f"{name:<12}{_size(v['size']):>11}  {v.get('connection', '-'):<13}"
            f"{v.get('disk', 'up-to-date'):<12}{v.get('peer_disk', '-'):<11}"
            f"{(_size(oos) if oos is not None else '-'):>12}  {progress}"
        )
        if v.get("split_brain"):
            lines.append(f"  {name}: {v.get('handshake')}")
    return "\n".join(lines)


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """``[#########...........]  45%``: resync in ``dst status``, ``dst verify``'s pass."""
    fraction = min(1.0, done / total) if total > 0 else 1.0
    filled = int(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {int(fraction * 100):3d}%"


def render_mirror(docs: Mapping[str, Mapping[str, Any]]) -> str:
    """A mirror bridge's status files (``dst status --mirror-state DIR``): a row per leg."""
    lines = []
    for volume, doc in docs.items():
        lines.append(f"mirror {volume}  size {_size(doc['size'])}")
        lines.append(f"  {'LEG':<22}{'STATE':<12}{'DIRTY':>11}  {'RESYNC':<34}REASON")
        for leg in doc["legs"]:
            resync = "-"
            if leg["state"] == "resyncing":
                bar = progress_bar(leg["resync_done_bytes"], leg["resync_total_bytes"])
                resync = f"{bar} {_size(leg['resync_rate_bytes_s'])}/s"
            lines.append(
                f"  {leg['leg']:<22}{leg['state']:<12}{_size(leg['dirty_bytes']):>11}  "
                f"{resync:<34}{leg['reason'] or '-'}"
            )
    return "\n".join(lines)


def render_statuses(servers: Sequence[str], results: Sequence[Mapping[str, Any] | str]) -> str:
    """Several servers (``dst status --config``): one block each, unreachable ones named."""
    blocks = []
    for server, doc in zip(servers, results, strict=True):
        body = render_status(doc) if not isinstance(doc, str) else f"unreachable: {doc}"
        blocks.append(f"== {server} ==\n{body}")
    return "\n\n".join(blocks)


# -- dst verify ---------------------------------------------------------------------------

#: Checksums asked for in one request: 1024 extents of 64 KiB = 64 MiB read per request.
VERIFY_EXTENTS_PER_REQUEST = 1024


@dataclass(frozen=True, slots=True)
class VerifyResult:
    size: int
    extent: int
    differing: tuple[tuple[int, int], ...]  # (offset, length) runs that still differ


class _ChecksumPeer:
    """An admin session attached to a volume, asking for extent checksums."""

    def __init__(self, framed: FramedStream, conn: Connection, attached: Attached) -> None:
        self.framed, self.conn = framed, conn
        self.handle, self.size = attached.handle, attached.size
        self._tid = 1

    @classmethod
    @asynccontextmanager
    async def open(
        cls, address: Address, volume: str, tls: TlsConfig | None
    ) -> AsyncIterator[_ChecksumPeer]:
        # Checksums are a replica-level read: a secondary refuses every other role.
        async with _session(address, tls, "verify", role="replica") as (framed, conn):
            with trio.fail_after(SETUP_TIMEOUT_S):
                attached = await request(framed, conn, Attach(tid=1, volume=volume), Attached)
            yield cls(framed, conn, attached)

    async def checksums(self, offset: int, length: int, extent: int) -> tuple[int, ...]:
        self._tid += 1
        req = ChecksumRequest(
            tid=self._tid, sub=0, handle=self.handle, offset=offset, length=length, extent=extent
        )
        self.conn.send(req)
        await self.framed.send(encode_frame(req))
        head = await self.framed.read_head()
        if head is None:
            raise trio.BrokenResourceError("server closed the connection during verify")
        prefix, raw = head
        reply = self.conn.receive(prefix, raw)
        data = bytearray(prefix.data_len)
        await self.framed.read_data_into([memoryview(data)])
        if not isinstance(reply, Reply):
            raise ProtocolError(f"expected a Reply, got {type(reply).__name__}")
        if reply.errno:
            raise BlockError(reply.errno, reply.message)
        return unpack_checksums(data)


async def verify(
    primary: Address,
    volume: str,
    tls: TlsConfig | None,
    *,
    extent: int = 65536,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyResult:
    """Compare the replicas of ``volume`` extent by extent, with checksums over the wire (no
    data moves).  Extents that differ are checked a second time, so a write in flight during
    the first pass does not count as a difference."""
    status = await fetch_status(primary, tls)
    if status.get("role") != "primary" or not status.get("peer"):
        raise ConfigError(f"{primary} is not a replication primary (role {status.get('role')})")
    from dst.net.endpoints import parse_address

    secondary = parse_address(str(status["peer"]))
    async with (
        _ChecksumPeer.open(primary, volume, tls) as a,
        _ChecksumPeer.open(secondary, volume, tls) as b,
    ):
        if a.size != b.size:
            raise ConfigError(f"replica sizes differ: {a.size} and {b.size}")
        step = extent * VERIFY_EXTENTS_PER_REQUEST
        suspects: list[int] = []
        for offset in range(0, a.size, step):
            length = min(step, a.size - offset)
            ours = await a.checksums(offset, length, extent)
            theirs = await b.checksums(offset, length, extent)
            suspects += [
                offset + i * extent
                for i, (x, y) in enumerate(zip(ours, theirs, strict=True))
                if x != y
            ]
            if progress is not None:
                progress(offset + length, a.size)
        differing = []
        for offset in suspects:  # second look: was it only a write in flight?
            length = min(extent, a.size - offset)
            if await a.checksums(offset, length, extent) != await b.checksums(
                offset, length, extent
            ):
                differing.append((offset, length))
    return VerifyResult(a.size, extent, tuple(differing))
