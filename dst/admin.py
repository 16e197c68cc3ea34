"""Operator commands that talk to a server: ``dst status`` (and, with replication's next
steps, ``promote`` and ``verify``).  Each opens one short admin connection, says Hello as a
client, asks, and closes."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import trio

from dst.client.link import SETUP_TIMEOUT_S, expect, handshake
from dst.net.endpoints import Address, connect
from dst.security.tls import TlsConfig
from dst.wire import StatusReply, StatusRequest, encode_frame


async def fetch_status(address: Address, tls: TlsConfig | None) -> Mapping[str, Any]:
    framed, _ = await connect(address, tls)
    try:
        with trio.fail_after(SETUP_TIMEOUT_S):
            node = f"{socket.gethostname()}:{os.getpid()}/status"
            conn, _ = await handshake(framed, role="client", node_id=node, page_size=4096)
            request = StatusRequest(tid=1)
            conn.send(request)
            await framed.send(encode_frame(request))
            reply = await expect(framed, conn, StatusReply)
    finally:
        await trio.aclose_forcefully(framed.stream)
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
            total = max(1, resync["total_bytes"])
            progress = (
                f"{100 * resync['done_bytes'] // total}% at {_size(resync['rate_bytes_s'])}/s"
            )
        else:
            progress = "-"
        oos = v.get("out_of_sync_bytes")
        lines.append(
            f"{name:<12}{_size(v['size']):>11}  {v.get('connection', '-'):<13}"
            f"{v.get('disk', 'up-to-date'):<12}{v.get('peer_disk', '-'):<11}"
            f"{(_size(oos) if oos is not None else '-'):>12}  {progress}"
        )
    return "\n".join(lines)
