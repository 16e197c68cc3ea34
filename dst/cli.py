"""The ``dst`` command: ``serve``, ``nbd``, ``up``, ``status``, ``promote``, ``verify``,
``certs``.  Every subcommand has ``--help``; configuration mistakes print one line naming
the flag and value and exit 2; SIGINT/SIGTERM stop a running service cleanly with exit 0.
``--config FILE`` (dst/config.py) turns a TOML file into flags before parsing; logs are set
up by dst/logs.py; ``--metrics`` serves dst/metrics.py's collectors.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from dst.config import apply_config
from dst.errors import ConfigError, DstError
from dst.logs import setup_logging
from dst.net.endpoints import Address, is_loopback, parse_address
from dst.replication.activity_log import DEFAULT_SLOTS, MAX_SLOTS
from dst.replication.resync import DEFAULT_RESYNC_RATE
from dst.security.tls import TlsConfig
from dst.server import Server, ServerConfig
from dst.server.server import DEFAULT_MAX_BYTES, DEFAULT_MAX_INFLIGHT
from dst.server.volume import parse_size, parse_volume_spec

log = logging.getLogger("dst")

UP_LISTEN = "127.0.0.1:10809"  # the NBD port


def _size(text: str) -> int:
    """A size flag's value; argparse names the flag in the one-line error."""
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _page_size(text: str) -> int:
    size = _size(text)
    if size < 512 or size & (size - 1) or size > 1 << 20:
        raise argparse.ArgumentTypeError(f"page size {text}: a power of two from 512 to 1M")
    return size


def _boundary(text: str) -> int:
    size = _size(text)
    if size % 512:
        raise argparse.ArgumentTypeError(f"--boundary {text!r}: a multiple of 512 bytes (0: none)")
    return size


def _resync_rate(text: str) -> int:
    rate = _size(text)
    if rate < 4096:
        raise argparse.ArgumentTypeError(f"--resync-rate {text!r}: at least 4K (bytes per second)")
    return rate


def _al_extents(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"--al-extents {text!r}: a count from 1 to {MAX_SLOTS}")
    return count


def _add_al_extents(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument(
        "--al-extents",
        type=_al_extents,
        default=DEFAULT_SLOTS,
        metavar="N",
        help=f"{who}activity log size in 4 MiB extents (default {DEFAULT_SLOTS}, about 4 GiB): "
        "the most a crash leaves to resync; fewer mean a disk sync before more scattered "
        "writes (DRBD's al-extents)",
    )


def _failfast_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--failfast-timeout {text!r}: not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--failfast-timeout {text!r}: must be >= 0 seconds")
    return value


def _add_security(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tls", metavar="DIR", type=Path, help="node directory from `dst certs issue`")
    g.add_argument("--insecure", action="store_true", help="plaintext (loopback and tests only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dst", description="dst — a distributed network block store on Trio."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    common.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="a TOML file of this command's flags (long names as keys); flags given here win",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="export volumes from a data directory", parents=[common])
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--data", required=True, type=Path, metavar="DIR")
    p.add_argument(
        "--volume",
        required=True,
        action="append",
        metavar="NAME=SIZE",
        help="a volume to export (created sparse if absent); repeatable, e.g. vol0=1G",
    )
    p.add_argument("--page-size", type=_page_size, default=4096, metavar="BYTES")
    p.add_argument(
        "--max-bytes",
        type=_size,
        default=DEFAULT_MAX_BYTES,
        metavar="BYTES",
        help="largest request taken in one frame",
    )
    p.add_argument(
        "--boundary",
        type=_boundary,
        default=0,
        metavar="BYTES",
        help="no request may cross a multiple of this (a RAID chunk, older DRBD's 32K): "
        "clients and a replication primary split to it; 0, the default, for none",
    )
    p.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT, metavar="N")
    p.add_argument("--node-id", default="", help="name in logs and handshakes")
    p.add_argument("--peer", metavar="HOST:PORT", help="the other server of a replicated pair")
    p.add_argument(
        "--role",
        choices=["primary", "secondary"],
        help="this server's role in the pair (with --peer)",
    )
    p.add_argument(
        "--protocol",
        choices=["A", "B", "C"],
        default="C",
        help="when a replicated write is acknowledged: C (default) stable on both; B done here "
        "and received by the peer; A done here and sent. FLUSH/FUA: stable on both, always",
    )
    p.add_argument(
        "--resync-rate",
        type=_resync_rate,
        default=DEFAULT_RESYNC_RATE,
        metavar="BYTES",
        help="cap on resync traffic per second, e.g. 100M (default 64M), as DRBD's resync-rate",
    )
    _add_al_extents(p, "replication: ")
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    _add_security(p)

    p = sub.add_parser(
        "nbd",
        help="serve a dst volume as an NBD export",
        parents=[common],
        description="Serve a dst volume to NBD clients (qemu, nbdcopy, nbdfuse, nbd-client). "
        "The export is named after the volume.",
    )
    p.add_argument(
        "--listen",
        default=UP_LISTEN,
        metavar="HOST:PORT",
        help=f"NBD address (default {UP_LISTEN})",
    )
    p.add_argument(
        "--server",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help="a dst server holding the volume",
    )
    p.add_argument("--volume", required=True, metavar="NAME")
    p.add_argument(
        "--page-size",
        type=_page_size,
        default=4096,
        metavar="BYTES",
        help="the bridge's page size (segments of the bios it builds)",
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="claim the volume even while another bridge holds it (it may be partitioned or "
        "paused): the epoch moves on and every later write of the old owner is refused",
    )
    p.add_argument(
        "--claim-wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="without --takeover, how long to wait for the bridge holding the volume to let "
        "go (default 10)",
    )
    p.add_argument("--node-id", default="", help="name in logs and handshakes")
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    p.add_argument(
        "--mirror",
        action="store_true",
        help="keep a copy on every --server (a failfast mirror) instead of following a primary",
    )
    p.add_argument(
        "--failfast-timeout",
        type=_failfast_timeout,
        default=1.0,
        metavar="SECONDS",
        help="mirror: deadline of a leg's request before the leg is dropped "
        "(default 1; 0: no deadline, a hung leg is dropped at keepalive death, ~10 s)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("dst-bridge"),
        metavar="DIR",
        help="mirror: the legs' dirty bitmaps and NAME.mirror.json status (default dst-bridge)",
    )
    p.add_argument(
        "--resync-rate",
        type=_resync_rate,
        default=DEFAULT_RESYNC_RATE,
        metavar="BYTES",
        help="mirror: cap on a returning leg's resync traffic per second (default 64M)",
    )
    _add_al_extents(p, "mirror: ")
    _add_security(p)

    p = sub.add_parser(
        "up",
        help="run the embedded default on loopback",
        parents=[common],
        description="A dst server and the NBD bridge on loopback, data in DIR.",
    )
    p.add_argument("--data", type=Path, default=Path("dst-data"), metavar="DIR")
    p.add_argument(
        "--listen",
        default=UP_LISTEN,
        metavar="HOST:PORT",
        help=f"NBD address (default {UP_LISTEN})",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=1 << 30,
        metavar="SIZE",
        help="size of vol0 when it is created (default 1G)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )

    p = sub.add_parser(
        "status",
        help="show servers' roles, connections and replication state",
        parents=[common],
        description="One table per server. With --config FILE and no --server: every server "
        "the file names ([serve] listen and peer, [nbd] server) and its tls directory. "
        "Exit 1 if a server is unreachable.",
    )
    p.add_argument(
        "--server", action="append", metavar="HOST:PORT", help="a server to ask; repeatable"
    )
    p.add_argument(
        "--mirror-state",
        type=Path,
        metavar="DIR",
        help="a mirror bridge's --state-dir: each leg's state, dirty bytes and resync progress",
    )
    p.add_argument("--json", action="store_true", help="the raw status document(s)")
    p.add_argument("--tls", metavar="DIR", type=Path, help="node directory from `dst certs issue`")

    p = sub.add_parser(
        "promote",
        help="make a secondary the primary of a volume (after the primary died)",
        parents=[common],
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the secondary")
    p.add_argument("--volume", required=True, metavar="NAME")
    p.add_argument(
        "--force",
        action="store_true",
        help="even while the old primary is still connected (split brain risk)",
    )
    p.add_argument("--tls", metavar="DIR", type=Path, help="node directory from `dst certs issue`")

    p = sub.add_parser(
        "resolve",
        help="end a split brain: this primary's copy survives, the peer's is overwritten",
        parents=[common],
        description="After `dst status` reports split-brain: names the server given (which "
        "must be primary; promote it first if needed, and restart the other side with "
        "--role secondary) the survivor. Its next handshake resyncs the peer from it; the "
        "writes only the peer had since the split are discarded.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the survivor")
    p.add_argument("--volume", required=True, metavar="NAME")
    p.add_argument("--tls", metavar="DIR", type=Path, help="node directory from `dst certs issue`")

    p = sub.add_parser(
        "verify",
        help="compare a volume's replicas extent by extent (checksums only)",
        parents=[common],
        description="Asks the primary for its peer, then both servers for the crc32c of every "
        "extent, and lists the ranges that differ. Exit 0: identical; 1: differences.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the primary")
    p.add_argument("--volume", required=True, metavar="NAME")
    p.add_argument("--extent", type=_size, default=65536, metavar="BYTES")
    p.add_argument(
        "--tls",
        metavar="DIR",
        type=Path,
        help="a replica-role node directory (verify reads as a replica)",
    )

    p = sub.add_parser("certs", help="make a CA and node certificates", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


async def _run_until_signal(
    main: Callable[[trio.Nursery], Awaitable[None]], stop: trio.Event | None = None
) -> None:
    """Run ``main`` until SIGINT/SIGTERM.  With ``stop``, the signal sets it and ``main`` ends
    gracefully on its own (a bridge releasing its volume); a second signal cancels."""
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def run_main() -> None:
                await main(nursery)
                if stop is not None:  # ended gracefully: nothing left to wait for
                    nursery.cancel_scope.cancel()

            nursery.start_soon(run_main)
            async for signum in signals:
                log.info("event=stopping signal=%s", signal.Signals(signum).name)
                if stop is None or stop.is_set():
                    nursery.cancel_scope.cancel()
                    break
                stop.set()


def _serve_config(args: argparse.Namespace) -> ServerConfig:
    listen = parse_address(args.listen)
    tls = TlsConfig.load(args.tls) if args.tls else None
    if tls is None and not is_loopback(listen.host):
        log.warning("listen=%s event=insecure_on_network (plaintext, no authentication)", listen)
    return ServerConfig(
        data_dir=args.data,
        volumes=tuple(parse_volume_spec(v) for v in args.volume),
        listen=listen,
        tls=tls,
        page_size=args.page_size,
        max_bytes=args.max_bytes,
        boundary=args.boundary,
        max_inflight=args.max_inflight,
        node_id=args.node_id,
        peer=parse_address(args.peer) if args.peer else None,
        role=args.role or "standalone",
        protocol=args.protocol,
        resync_rate=args.resync_rate,
        al_extents=args.al_extents,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    server = Server(_serve_config(args))
    metrics = parse_address(args.metrics) if args.metrics else None
    server.open_volumes(server.config.volumes)  # configuration errors surface before serving

    async def main(nursery: trio.Nursery) -> None:
        if metrics is not None:
            from prometheus_client import CollectorRegistry

            from dst.metrics import ServerCollector, serve_metrics

            registry = CollectorRegistry(auto_describe=False)
            registry.register(ServerCollector(server))
            await nursery.start(serve_metrics, metrics, registry)
        await server.serve()

    trio.run(_run_until_signal, main)
    return 0


def cmd_nbd(args: argparse.Namespace) -> int:
    from dst.services import BridgeConfig, run_bridge  # the bridge is not needed to serve

    listen = parse_address(args.listen)
    tls = TlsConfig.load(args.tls) if args.tls else None
    if tls is None and not is_loopback(listen.host):
        log.warning("listen=%s event=insecure_on_network (NBD in plaintext)", listen)
    config = BridgeConfig(
        listen=listen,
        servers=tuple(parse_address(s) for s in args.server),
        volume=args.volume,
        page_size=args.page_size,
        tls=tls,
        node_id=args.node_id,
        claim="takeover" if args.takeover else "own",
        claim_wait_s=args.claim_wait,
        metrics=parse_address(args.metrics) if args.metrics else None,
        mirror=args.mirror,
        failfast_timeout_s=args.failfast_timeout or None,
        state_dir=args.state_dir,
        resync_rate=args.resync_rate,
        al_extents=args.al_extents,
    )

    stop = trio.Event()

    async def main(nursery: trio.Nursery) -> None:
        done = trio.Event()

        async def bridge(task_status: trio.TaskStatus[Address]) -> None:
            await run_bridge(config, stop=stop, task_status=task_status)
            done.set()

        address = await nursery.start(bridge)
        print(f"dst nbd: nbd://{address}/{config.volume}", flush=True)
        await done.wait()

    trio.run(_run_until_signal, main, stop)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from dst.services import UP_VOLUME, run_up

    if args.size <= 0 or args.size % 512:
        raise ConfigError(f"--size {args.size}: a positive multiple of 512 bytes")

    listen: Address = parse_address(args.listen)
    metrics = parse_address(args.metrics) if args.metrics else None
    data_dir: Path = args.data.resolve()

    async def main(nursery: trio.Nursery) -> None:
        start = partial(run_up, data_dir, listen, metrics=metrics, size=args.size)
        address = await nursery.start(start)
        name, size = UP_VOLUME[0], args.size
        uri = f"nbd://{address}/{name}"
        print(
            f"dst up: {uri}  (volume {name}, {size >> 20} MiB, replicated: {data_dir}/primary"
            f" and {data_dir}/secondary)"
        )
        print(f"  inspect:  nbdinfo {uri}")
        print(f"  copy in:  nbdcopy disk.img {uri}")
        print(f"  mount:    mkdir -p mnt && nbdfuse mnt {uri} &   # then mnt/nbd is the disk:")
        print("            losetup -f --show mnt/nbd; mkfs.ext4 /dev/loopN; mount /dev/loopN /mnt")
        print(f"  qemu:     -drive file={uri},format=raw")
        print("  Ctrl-C stops.", flush=True)

    trio.run(_run_until_signal, main)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from dst.admin import fetch_status, fetch_statuses, render_status, render_statuses
    from dst.config import servers_in_file

    if args.mirror_state is not None:
        from dst.admin import render_mirror

        files = sorted(args.mirror_state.glob("*.mirror.json"))
        if not files:
            raise ConfigError(f"--mirror-state {args.mirror_state}: no *.mirror.json there")
        docs = {f.name.removesuffix(".mirror.json"): json.loads(f.read_text()) for f in files}
        print(json.dumps(docs, indent=2) if args.json else render_mirror(docs))
        return 0
    servers: list[str] = args.server or []
    tls_dir: Path | None = args.tls
    if not servers and args.config is not None:
        servers, file_tls = servers_in_file(args.config)
        tls_dir = tls_dir or (Path(file_tls) if file_tls else None)
    if not servers:
        raise ConfigError(
            "no server to ask: give --server HOST:PORT or a --config FILE naming some"
        )
    tls = TlsConfig.load(tls_dir) if tls_dir else None
    addresses = [parse_address(s) for s in servers]
    if len(addresses) == 1 and args.config is None:  # one server: its document, as always
        doc = trio.run(fetch_status, addresses[0], tls)
        print(json.dumps(doc, indent=2, default=dict) if args.json else render_status(doc))
        return 0
    results = trio.run(fetch_statuses, addresses, tls)
    if args.json:
        pairs = zip(servers, results, strict=True)
        docs = {s: r if not isinstance(r, str) else {"error": r} for s, r in pairs}
        print(json.dumps(docs, indent=2, default=dict))
    else:
        print(render_statuses(servers, results))
    return 1 if any(isinstance(r, str) for r in results) else 0


def cmd_promote(args: argparse.Namespace) -> int:
    from dst.admin import promote

    tls = TlsConfig.load(args.tls) if args.tls else None
    trio.run(partial(promote, parse_address(args.server), args.volume, tls, force=args.force))
    print(f"dst promote: {args.volume} is primary on {args.server}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    from dst.admin import resolve

    tls = TlsConfig.load(args.tls) if args.tls else None
    trio.run(resolve, parse_address(args.server), args.volume, tls)
    print(
        f"dst resolve: {args.volume} on {args.server} survives; its peer is resynced from it "
        "at the next connection (watch `dst status`)"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from dst.admin import progress_bar, verify

    def progress(done: int, total: int) -> None:
        print(
            f"\rverify: {progress_bar(done, total)} ({done >> 20}/{total >> 20} MiB)",
            end="",
            file=sys.stderr,
            flush=True,
        )

    tls = TlsConfig.load(args.tls) if args.tls else None
    result = trio.run(
        partial(
            verify,
            parse_address(args.server),
            args.volume,
            tls,
            extent=args.extent,
            progress=progress,
        )
    )
    print(file=sys.stderr)
    extents = -(-result.size // result.extent)
    print(
        f"verified {args.volume}: {result.size} bytes, {extents} extents of {result.extent}; "
        f"{len(result.differing)} differ"
    )
    for offset, length in result.differing:
        print(f"  differs: offset {offset} length {length}")
    return 1 if result.differing else 0


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _fail(command: str, exc: BaseException) -> int:
    print(f"dst {command}: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:
        from dst.security.certs import certs_main

        return certs_main(argv[1:])
    parser = build_parser()
    try:
        argv = apply_config(parser, argv)
    except ConfigError as exc:
        return _fail(argv[0] if argv else "", exc)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "up":
            return cmd_up(args)
        if args.command == "nbd":
            return cmd_nbd(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "promote":
            return cmd_promote(args)
        if args.command == "resolve":
            return cmd_resolve(args)
    except (ConfigError, DstError, OSError) as exc:
        return _fail(args.command, exc)
    except BaseExceptionGroup as group:
        # Errors raised inside the running service arrive wrapped by Trio's nurseries.
        leaf = _first_leaf(group)
        if isinstance(leaf, ConfigError | DstError | OSError):
            return _fail(args.command, leaf)
        raise
    parser.error(f"unknown command {args.command!r}")
    return 2
