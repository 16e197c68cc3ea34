"""A server's state as one JSON-like document: what ``dst status`` shows and ``StatusReply``
carries.  Built from live counters on each request; nothing here is cached or persisted."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from dst.wire.messages import StatusValue

if TYPE_CHECKING:
    from dst.server.server import Server
    from dst.server.volume import Volume


def status_document(server: Server) -> dict[str, StatusValue]:
    cfg = server.config
    return {
        "node": server.node_id,
        "role": server.role,
        "listen": str(server.listen_address),
        "peer": str(cfg.peer) if cfg.peer else None,
        "page_size": server.page_size,
        "uptime_s": int(trio.current_time() - server.started_at),
        "sessions": {role: n for role, n in sorted(server.sessions.items()) if n},
        "requests": {k: int(v) for k, v in sorted(server.stats.items())},
        "pool": {
            "pages_total": server.pool.statistics().pages_total,
            "pages_free": server.pool.statistics().pages_free,
        },
        "volumes": {name: _volume(server, v) for name, v in sorted(server.volumes.items())},
    }


def _volume(server: Server, volume: Volume) -> dict[str, StatusValue]:
    doc: dict[str, StatusValue] = {
        "size": volume.size,
        "epoch": volume.epoch,
        "path": str(volume.data_dir / f"{volume.name}.img"),
    }
    rep = volume.replicated
    if rep is not None:
        s = rep.statistics()
        doc["connection"] = "connected" if s.peer_connected else "disconnected"
        doc["protocol"] = rep.protocol
        doc["disk"] = "up-to-date"
        doc["peer_disk"] = "up-to-date" if s.peer_up_to_date else "outdated"
        doc["out_of_sync_bytes"] = s.out_of_sync_bytes
        doc["resync"] = {
            "active": bool(s.peer_connected and s.out_of_sync_bytes),
            "total_bytes": s.resync_total_bytes,
            "done_bytes": s.resync_done_bytes,
            "rate_bytes_s": int(s.resync_rate_bytes_s),
        }
        doc["degraded_writes"] = s.degraded_writes
    elif server.role == "secondary":
        doc["connection"] = "connected" if server.links.get("replication") else "disconnected"
        doc["disk"] = "secondary"
    state = volume.state
    if state is not None:
        gens = state.generations
        doc["generations"] = {
            "current": f"{gens.current:#018x}",
            "bitmap": f"{gens.bitmap:#018x}",
            "history": tuple(f"{h:#018x}" for h in gens.history),
            "crashed_primary": gens.crashed_primary,
            "inconsistent": gens.inconsistent,
        }
        doc["handshake"] = state.verdict
        doc["split_brain"] = state.split_brain
        if state.split_brain:
            doc["connection"] = "split-brain"
        if gens.inconsistent:
            doc["disk"] = "inconsistent"
    return doc
