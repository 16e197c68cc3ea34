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
from functools import partial
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from dst.block import BlockLayer
from dst.client import open_remote
from dst.fence.handoff import Handoff
from dst.iostats import IoStats
from dst.metrics import BridgeCollector, ServerCollector, serve_metrics
from dst.mirror import open_mirror
from dst.nbd.bridge import NbdExport, serve_nbd
from dst.net.endpoints import Address
from dst.replication.activity_log import DEFAULT_SLOTS
from dst.replication.resync import DEFAULT_RESYNC_RATE
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
    #: "own": attach when the volume is free (or its previous owner is gone); "takeover":
    #: whatever holds it — the old owner's later writes are refused (dst/fence).
    claim: str = "own"
    #: How long an "own" claim waits for the previous owner to let go (EBUSY meanwhile).
    claim_wait_s: float = 10.0
    #: Serve Prometheus metrics on this address (``--metrics``).
    metrics: Address | None = None
    # A failfast mirror over every server (dst.mirror) instead of following a primary.
    mirror: bool = False
    failfast_timeout_s: float | None = 1.0  # None: no deadline (keepalive death only)
    state_dir: Path = Path("dst-bridge")  # the mirror legs' bitmaps and status file
    resync_rate: int = DEFAULT_RESYNC_RATE  # bytes/s, a returning leg's resync
    al_extents: int = DEFAULT_SLOTS  # the mirror's activity log slots


async def run_bridge(
    config: BridgeConfig,
    *,
    stop: trio.Event | None = None,
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config.volume`` over NBD; ``task_status`` gets the address.  Runs until
    cancelled, or until ``stop`` is set: then it releases the volume gracefully (finishes what
    is under way, FLUSHes, detaches — dst/fence/handoff.py) and returns.  The bridge's metrics
    go to ``registry`` if given (the caller serves it), else to an endpoint of their own on
    ``config.metrics`` if set."""
    io = IoStats()
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
            claim=config.claim,
            resync_rate=config.resync_rate,
            al_extents=config.al_extents,
        )
    else:
        stack = open_remote(
            config.servers,
            config.volume,
            tls=config.tls,
            role="bridge",
            node_id=config.node_id,
            page_size=config.page_size,
            claim=config.claim,
            claim_wait_s=config.claim_wait_s,
        )
    async with stack as volume:
        # Every NBD connection shares this one stack, and a FLUSH reaches the server's
        # fdatasync, which covers every write any connection had acknowledged: so a flush on
        # one connection covers all of them, which is what CAN_MULTI_CONN promises.
        handoff = Handoff(volume, config.volume)
        export = NbdExport(config.volume, handoff, multi_conn=True)
        log.info(
            "volume=%s size=%d claim=%s mirror=%s event=attached",
            config.volume,
            volume.size,
            config.claim,
            config.mirror,
        )
        node = config.node_id or "bridge"
        collector = BridgeCollector(io, node, lambda: {config.volume: export.layer})
        async with trio.open_nursery() as nursery:
            if registry is not None:
                registry.register(collector)
            elif config.metrics is not None:
                own = CollectorRegistry(auto_describe=False)
                own.register(collector)
                await nursery.start(serve_metrics, config.metrics, own)
            serve = partial(serve_nbd, tls=config.tls, page_size=config.page_size, io=io)
            address = await nursery.start(serve, config.listen, [export])
            task_status.started(address)
            if stop is None:
                await trio.sleep_forever()
            await stop.wait()
            await handoff.release()
            nursery.cancel_scope.cancel()


async def run_up(
    data_dir: Path,
    listen: Address,
    *,
    metrics: Address | None = None,
    size: int = UP_VOLUME[1],
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A replicated pair (primary in ``DIR/primary``, secondary in ``DIR/secondary``) on
    ephemeral loopback ports, and the NBD bridge on ``listen`` in front of the primary; with
    ``metrics``, one Prometheus endpoint for all three."""
    loopback = Address("127.0.0.1", 0)

    def server(role: str, peer: Address | None) -> Server:
        srv = Server(
            ServerConfig(
                data_dir=data_dir / role,
                volumes=((UP_VOLUME[0], size),),
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
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(primary))
        registry.register(ServerCollector(secondary))
        nbd_address = await nursery.start(partial(run_bridge, bridge, registry=registry))
        if metrics is not None:
            await nursery.start(serve_metrics, metrics, registry)
        task_status.started(nbd_address)
