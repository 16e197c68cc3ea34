"""The long-running services behind ``dst nbd`` and ``dst up``, as async functions.

``run_bridge`` attaches a volume through the client-side stack (one ``RemoteVolume``, or with
``mirror`` a failfast :class:`~dst.mirror.Mirror` over one per server) and serves it as an NBD
export.  ``run_up`` is the embedded default: a replicated pair and the
bridge in one process on loopback, for a laptop, a demo or a test.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import trio

from dst.block import BlockLayer
from dst.client import open_remote
from dst.mirror import open_mirror
from dst.nbd.bridge import NbdExport, serve_nbd
from dst.net.endpoints import Address
from dst.security.tls import TlsConfig
from dst.server import Server, ServerConfig

log = logging.getLogger("dst.bridge")

UP_VOLUME = ("vol0", 1 << 30)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    listen: Address
    servers: tuple[Address, ...]
    volume: str
    page_size: int = 4096
    tls: TlsConfig | None = None
    node_id: str = ""
    # A failfast mirror over every server (dst.mirror) instead of following a primary.
    mirror: bool = False
    failfast_timeout_s: float | None = 1.0  # None: no deadline (keepalive death only)
    state_dir: Path = Path("dst-bridge")  # the mirror legs' bitmaps and status file


async def run_bridge(
    config: BridgeConfig, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``config.volume`` over NBD until cancelled; ``task_status`` gets the address."""
    stack: AbstractAsyncContextManager[BlockLayer]
    if config.mirror:
        stack = open_mirror(
            config.servers,
            config.volume,
            state_dir=config.state_dir,
            failfast_timeout_s=config.failfast_timeout_s,
            tls=config.tls,
            node_id=config.node_id,
            page_size=config.page_size,
        )
    else:
        stack = open_remote(
            config.servers,
            config.volume,
            tls=config.tls,
            role="bridge",
            node_id=config.node_id,
            page_size=config.page_size,
        )
    async with stack as volume:
        # Every NBD connection shares this one stack, and a FLUSH reaches the server's
        # fdatasync, which covers every write any connection had acknowledged: so a flush on
        # one connection covers all of them, which is what CAN_MULTI_CONN promises.
        export = NbdExport(config.volume, volume, multi_conn=True)
        log.info("volume=%s size=%d event=attached", config.volume, volume.size)
        await serve_nbd(
            config.listen,
            [export],
            tls=config.tls,
            page_size=config.page_size,
            task_status=task_status,
        )


async def run_up(
    data_dir: Path,
    listen: Address,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A replicated pair (primary in ``DIR/primary``, secondary in ``DIR/secondary``) on
    ephemeral loopback ports, and the NBD bridge on ``listen`` in front of the primary."""
    loopback = Address("127.0.0.1", 0)

    def server(role: str, peer: Address | None) -> Server:
        srv = Server(
            ServerConfig(
                data_dir=data_dir / role,
                volumes=(UP_VOLUME,),
                listen=loopback,
                node_id=f"up-{role}",
                peer=peer,
                role=role,
            )
        )
        srv.open_volumes(srv.config.volumes)
        return srv

    async with trio.open_nursery() as nursery:
        secondary = server("secondary", loopback)  # its peer address is only informational
        secondary_address = await nursery.start(secondary.serve)
        primary = server("primary", secondary_address)
        primary_address = await nursery.start(primary.serve)
        bridge = BridgeConfig(
            listen=listen, servers=(primary_address,), volume=UP_VOLUME[0], node_id="up-bridge"
        )
        nbd_address = await nursery.start(run_bridge, bridge)
        task_status.started(nbd_address)
