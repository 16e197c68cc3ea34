"""Server: the volumes of one data directory, exported over dst frames.

``Server`` owns the volumes, the page pool and the listener; each accepted, authenticated
connection becomes a ``Session``.  ``serve`` runs until cancelled and reports the bound
addresses through ``task_status`` (so tests and ``dst up`` can listen on port 0).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from dst.block import Limits
from dst.client.remote import RemoteVolume
from dst.errors import BlockError, ConfigError
from dst.iostats import IoStats
from dst.net.endpoints import Address, serve
from dst.net.framed import FramedStream
from dst.replication.activity_log import DEFAULT_SLOTS
from dst.replication.peer import open_peer
from dst.replication.resync import DEFAULT_RESYNC_RATE
from dst.replication.sync import answer
from dst.security.tls import TlsConfig
from dst.server.pool import PagePool
from dst.server.session import Session
from dst.server.volume import Volume

log = logging.getLogger("dst.server")

# Largest request the server takes in one frame: big enough that a 1 MiB sequential bio is one
# command, small enough that the pool holds many in flight.
DEFAULT_MAX_BYTES = 1 << 20
# Per-connection cap on outstanding requests (announced in Welcome).
DEFAULT_MAX_INFLIGHT = 64
# All request data held by the server at once, across connections.
DEFAULT_POOL_BYTES = 64 << 20
FEATURES = ("fua", "flush", "trim", "write_zeroes", "epoch")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    volumes: tuple[tuple[str, int], ...]
    listen: Address
    tls: TlsConfig | None = None
    page_size: int = 4096
    max_bytes: int = DEFAULT_MAX_BYTES
    #: No request crosses a multiple of this (0: none); advertised with the limits.
    boundary: int = 0
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    pool_bytes: int = DEFAULT_POOL_BYTES
    node_id: str = ""
    #: Replication: the other server, and this one's role for the volumes.
    peer: Address | None = None
    role: str = "standalone"  # "primary" | "secondary" | "standalone"
    #: When a replicated write is acknowledged (dst/replication/layer.py PROTOCOLS).
    protocol: str = "C"
    #: Bytes per second a resync may copy (``--resync-rate``).
    resync_rate: int = DEFAULT_RESYNC_RATE
    #: Activity log slots of each replicated volume (``--al-extents``).
    al_extents: int = DEFAULT_SLOTS


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.node_id = config.node_id or f"{socket.gethostname()}:{config.listen.port}"
        self.page_size = config.page_size
        self.limits = Limits(
            logical_block_size=512,
            page_size=config.page_size,
            max_bytes=config.max_bytes,
            boundary=config.boundary,
        ).validate()
        self.max_inflight = config.max_inflight
        self.features = FEATURES
        self.pool = PagePool(config.page_size, max(config.pool_bytes, config.max_bytes))
        self.volumes: dict[str, Volume] = {}
        self.peers: list[RemoteVolume] = []
        #: "primary" | "secondary" | "standalone"; starts as configured, promote changes it.
        self.role = config.role
        self._nursery: trio.Nursery | None = None
        if (config.peer is None) != (config.role == "standalone"):
            raise ConfigError(
                f"role {config.role!r} with peer {config.peer}: --peer and --role go together"
            )
        self.stats: Counter[str] = Counter()
        self.io = IoStats()  # per volume and op, for metrics (see dst.iostats)
        self.sessions: Counter[str] = Counter()  # live sessions by peer role
        self.links: Counter[str] = Counter()  # the same, with "replication" for peer links
        self.started_at = 0.0
        self.listen_address: Address | None = None

    def open_volumes(self, specs: Iterable[tuple[str, int]]) -> None:
        for name, size in specs:
            replica = self.role != "standalone"
            volume = Volume.open(
                self.config.data_dir,
                name,
                size,
                limits=self.limits,
                replica=replica,
                al_extents=self.config.al_extents,
            )
            if self.role == "primary":
                volume.become_primary(
                    self._peer_link(name), self.config.protocol, self.config.resync_rate
                )
            self.volumes[name] = volume
            log.info(
                "volume=%s size=%d epoch=%d path=%s event=opened",
                name,
                size,
                volume.epoch,
                self.config.data_dir / f"{name}.img",
            )

    def _peer_link(self, volume: str) -> RemoteVolume:
        assert self.config.peer is not None
        peer = open_peer(self.config.peer, volume, self.config.tls, self.node_id)
        self.peers.append(peer)
        return peer

    async def promote(self, name: str, *, force: bool) -> None:
        """Make this secondary the primary of ``name`` (the old primary died): from now on it
        takes clients' writes, replicates to the configured peer when that comes back as a
        secondary, and records in its bitmap what the peer misses meanwhile."""
        volume = self.volumes.get(name)
        if volume is None:
            raise BlockError(errno.ENOENT, f"volume {name!r} does not exist on this server")
        if volume.replicated is not None:
            return  # already primary: promote is idempotent
        if self.role != "secondary":
            raise BlockError(errno.EINVAL, f"this server is {self.role}, not a secondary")
        if self.links.get("replication") and not force:
            raise BlockError(
                errno.EBUSY,
                "the primary is still connected to this secondary; stop it first "
                "(or promote with force)",
            )
        if not force and self.config.peer is not None:
            # No link is not proof of death: a primary behind a partition goes on writing
            # alone, and promoting here would make a split brain with acknowledged writes on
            # both sides.  Only a refused connection says its server is down.
            alive = await primary_may_be_alive(self.config.peer)
            if alive is not None:
                raise BlockError(
                    errno.EBUSY,
                    f"the primary {self.config.peer} {alive}; stop it first, or promote "
                    "with force once you are sure it is down (else: split brain)",
                )
        state = volume.state
        assert state is not None and self._nursery is not None
        if state.generations.inconsistent:
            if not force:
                raise BlockError(
                    errno.EROFS,
                    "a resync towards this replica was interrupted: its data is a mix "
                    "(promote with force to accept that)",
                )
            await state.update(state.generations.declare_survivor())
        replicated = volume.become_primary(
            self._peer_link(name), self.config.protocol, self.config.resync_rate
        )
        await self._nursery.start(replicated.peer.run, None)
        self._nursery.start_soon(replicated.run_resync)
        self.role = "primary"
        log.warning("volume=%s peer=%s event=promoted force=%s", name, self.config.peer, force)

    async def sync(
        self, name: str, action: str, given: Mapping[str, Any], role: str
    ) -> dict[str, Any]:
        """A SyncRequest: the peer primary's handshake steps, or the operator's resolve."""
        volume = self.volumes.get(name)
        if volume is None or volume.state is None:
            what = "does not exist" if volume is None else "is not replicated"
            raise BlockError(errno.ENOENT, f"volume {name!r} {what} on this server")
        if action == "resolve":
            self.resolve(name)
        elif role != "replica":
            raise BlockError(errno.EPERM, f"sync {action}: only a replica peer may ask")
        elif volume.replicated is not None:
            raise BlockError(
                errno.EBUSY, f"volume {name!r} is primary here too (split brain?): not a target"
            )
        else:
            return await answer(volume.state, action, given)
        return volume.state.describe()

    def resolve(self, name: str) -> None:
        """The operator names this primary's copy of ``name`` the survivor of a split brain:
        its next handshake with the peer makes it the resync source (sync.py)."""
        volume = self.volumes.get(name)
        if volume is None:
            raise BlockError(errno.ENOENT, f"volume {name!r} does not exist on this server")
        if volume.replicated is None or volume.state is None:
            raise BlockError(
                errno.EINVAL,
                f"volume {name!r} is not primary here: run resolve on the survivor, "
                "promoted first if it is a secondary, and restart the other as secondary",
            )
        volume.state.survivor = True
        log.warning("volume=%s event=resolve survivor=%s", name, self.node_id)

    async def _on_connection(self, framed: FramedStream, role: str | None, peer: str) -> None:
        self.stats["connections"] += 1
        await Session(self, framed, role, peer).run()

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the volumes, listen, and serve until cancelled."""
        if not self.volumes:
            self.open_volumes(self.config.volumes)
        self.started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for volume in self.volumes.values():
                    if volume.replicated is not None:
                        await nursery.start(volume.replicated.peer.run, None)
                        nursery.start_soon(volume.replicated.run_resync)
                listeners = await nursery.start(
                    serve, self.config.listen, self.config.tls, self._on_connection
                )
                host, port = listeners[0].socket.getsockname()[:2]
                self.listen_address = Address(str(host), int(port))
                log.info(
                    "node=%s listen=%s tls=%s page_size=%d role=%s peer=%s event=serving",
                    self.node_id,
                    self.listen_address,
                    "on" if self.config.tls else "off",
                    self.page_size,
                    self.role,
                    self.config.peer,
                )
                task_status.started(self.listen_address)
        finally:
            with trio.CancelScope(shield=True):
                for volume in self.volumes.values():
                    await volume.aclose()


#: how long promote waits for the old primary's port to answer or refuse
PROBE_TIMEOUT_S = 2.0


async def primary_may_be_alive(address: Address) -> str | None:
    """None when ``address`` refuses TCP connections (no server listens: the primary is down);
    otherwise why it may be alive (it accepts connections, or it cannot be reached at all)."""
    try:
        with trio.move_on_after(PROBE_TIMEOUT_S):
            stream = await trio.open_tcp_stream(address.host, address.port)
            await stream.aclose()
            return "accepts connections: it is running"
        return f"did not answer within {PROBE_TIMEOUT_S:.0f} s: it may be alive behind a partition"
    except OSError as exc:
        # open_tcp_stream wraps each address's error in one "all attempts failed"
        inner = getattr(exc.__cause__, "exceptions", None) or [exc]
        if all(getattr(e, "errno", None) == errno.ECONNREFUSED for e in inner):
            return None
        why = "; ".join(str(e) for e in inner)
        return f"cannot be reached ({why}): it may be alive behind a partition"
