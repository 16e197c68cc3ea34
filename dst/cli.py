"""The ``dst`` command: ``serve``, ``nbd``, ``up``, ``status``, ``promote``, ``verify``,
``certs``.  Every subcommand has ``--help``; configuration mistakes print one line naming
the flag and value and exit 2; SIGINT/SIGTERM stop a running service cleanly with exit 0.
``--config FILE`` (dst/config.py) turns a TOML file into flags before parsing; logs are set
up by dst/logs.py; ``--metrics`` serves dst/metrics.py's collectors.  The options themselves
are in dst/options.py.
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
from dst.options import build_parser
from dst.security.tls import TlsConfig
from dst.server import Server, ServerConfig
from dst.server.volume import parse_volume_spec

log = logging.getLogger("dst")


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
