"""The ``dst`` command line: every subcommand's options, and the checks of their values.

:func:`build_parser` is the whole of it (``dst/cli.py`` runs what it parses).  A value
argparse cannot take fails with one line naming the flag and the value, and exit 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dst.errors import ConfigError
from dst.replication.activity_log import DEFAULT_SLOTS, MAX_SLOTS
from dst.replication.resync import DEFAULT_RESYNC_RATE
from dst.server.server import DEFAULT_MAX_BYTES, DEFAULT_MAX_INFLIGHT
from dst.server.volume import parse_size

__all__ = ["UP_LISTEN", "build_parser"]

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


def _add_resync_rate(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--resync-rate", type=_resync_rate, default=DEFAULT_RESYNC_RATE, metavar="BYTES", help=help
    )


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )


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
    _add_resync_rate(
        p, "cap on resync traffic per second, e.g. 100M (default 64M), as DRBD's resync-rate"
    )
    _add_al_extents(p, "replication: ")
    _add_metrics(p)
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
    _add_metrics(p)
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
    _add_resync_rate(p, "mirror: cap on a returning leg's resync traffic per second (default 64M)")
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
    _add_metrics(p)

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
