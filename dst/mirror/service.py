"""open_mirror: a Mirror over one RemoteVolume per server, with its state on disk; and the
status file an operator reads.

State directory (``dst nbd --mirror --state-dir DIR``)::

    DIR/NAME.HOST_PORT.bitmap   one DirtyBitmap per leg: what that leg misses (persistent)
    DIR/NAME.al                 the ActivityLog: extents with writes in flight (bridge crash)
    DIR/NAME.mirror.json        status: every leg's state, reason, dirty bytes, resync progress

The status file is rewritten (atomically: temporary file, then rename) at every leg state
change and once a second while the bridge runs, so ``cat``/``jq`` show resync progress live.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from dst.client import open_remote
from dst.errors import ConfigError
from dst.mirror.layer import Leg, Mirror
from dst.net.endpoints import Address
from dst.replication.activity_log import DEFAULT_SLOTS, ActivityLog
from dst.replication.bitmap import DirtyBitmap
from dst.replication.resync import DEFAULT_RESYNC_RATE
from dst.security.tls import TlsConfig

__all__ = ["bitmap_path", "open_mirror", "status_document", "status_path"]

#: How often the status file is rewritten when nothing changes (resync progress).
STATUS_EVERY_S = 1.0


def bitmap_path(state_dir: Path, volume: str, server: Address) -> Path:
    return state_dir / f"{volume}.{server.host}_{server.port}.bitmap"


def status_path(state_dir: Path, volume: str) -> Path:
    return state_dir / f"{volume}.mirror.json"


def status_document(mirror: Mirror) -> dict[str, Any]:
    """Every leg's state, for the status file (and tests)."""
    legs = []
    for i, leg in enumerate(mirror.legs):
        progress = leg.progress
        legs.append(
            {
                "leg": leg.name,
                "state": mirror.state(i).value,
                "reason": leg.reason,
                "dirty_bytes": leg.bitmap.dirty_bytes,
                "resync_total_bytes": progress.total_bytes,
                "resync_done_bytes": progress.done_bytes,
                "resync_rate_bytes_s": round(progress.rate_bytes_s),
                "resynced_bytes": leg.resynced_bytes,
                "errors": leg.errors,
            }
        )
    return {"size": mirror.size, "legs": legs}


def _write_atomically(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


async def write_status_forever(mirror: Mirror, path: Path) -> None:
    while True:
        await trio.to_thread.run_sync(_write_atomically, path, status_document(mirror))
        with trio.move_on_after(STATUS_EVERY_S):
            await mirror.wait_changed()


@asynccontextmanager
async def open_mirror(
    servers: Sequence[Address],
    volume: str,
    *,
    state_dir: Path,
    failfast_timeout_s: float | None = 1.0,
    tls: TlsConfig | None = None,
    node_id: str = "",
    page_size: int = 4096,
    resync_rate: int = DEFAULT_RESYNC_RATE,
    al_extents: int = DEFAULT_SLOTS,
    status_file: bool = True,
    claim: str = "share",
) -> AsyncIterator[Mirror]:
    """Attach ``volume`` on every server (each must answer now) and yield the Mirror over
    them, its legs' return and resync running in the background.  ``claim`` is how each leg
    claims its server's volume (dst/fence/claims.py)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        remotes = []
        for server in servers:
            # A leg whose server is down now starts ERRED and returns when it answers; the
            # Mirror refuses to start only if no reachable leg is in sync.
            remote = await stack.enter_async_context(
                open_remote(
                    server,
                    volume,
                    tls=tls,
                    role="bridge",
                    node_id=node_id,
                    page_size=page_size,
                    failfast_timeout_s=failfast_timeout_s,
                    must_connect=False,
                    claim=claim,
                )
            )
            remotes.append((server, remote))
        size = max(remote.size for _, remote in remotes)
        if not size:
            raise ConfigError(f"volume {volume!r}: no mirror leg is reachable")
        legs = []
        for server, remote in remotes:
            path = bitmap_path(state_dir, volume, server)
            bitmap = await trio.to_thread.run_sync(DirtyBitmap.open, path, size)
            stack.callback(bitmap.close)
            legs.append(Leg(str(server), remote, bitmap))
        al_path = state_dir / f"{volume}.al"
        al = await trio.to_thread.run_sync(
            partial(ActivityLog.open, al_path, size, slots=al_extents)
        )
        stack.callback(al.close)
        mirror = Mirror(legs, resync_rate=resync_rate, activity_log=al)
        try:
            await mirror.recover()
            async with trio.open_nursery() as nursery:
                await nursery.start(mirror.run)  # before the first start()
                if status_file:
                    path = status_path(state_dir, volume)
                    nursery.start_soon(write_status_forever, mirror, path)
                try:
                    yield mirror
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            await mirror.aclose()
