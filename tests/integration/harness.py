"""Helpers for integration tests: in-process servers on port 0, and `dst serve` as a real
process that tests may SIGKILL.  Every process a test starts is killed by pid when the test
ends, pass or fail."""

from __future__ import annotations

import filecmp
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from dst.admin import fetch_status
from dst.net.endpoints import Address, parse_address
from dst.security.tls import TlsConfig
from dst.server import Server, ServerConfig


@asynccontextmanager
async def running_server(
    data_dir: Path,
    volumes: tuple[tuple[str, int], ...] = (("vol0", 64 << 20),),
    *,
    page_size: int = 4096,
    tls: TlsConfig | None = None,
    max_bytes: int = 1 << 20,
    max_inflight: int = 64,
    pool_bytes: int = 64 << 20,
    peer: Address | None = None,
    role: str = "standalone",
    node_id: str = "test-server",
    protocol: str = "C",
    listen: str = "127.0.0.1:0",
) -> AsyncIterator[Server]:
    config = ServerConfig(
        data_dir=data_dir,
        volumes=volumes,
        listen=parse_address(listen),
        tls=tls,
        page_size=page_size,
        max_bytes=max_bytes,
        max_inflight=max_inflight,
        pool_bytes=pool_bytes,
        node_id=node_id,
        peer=peer,
        role=role,
        protocol=protocol,
    )
    server = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DstProcess:
    """A `dst ...` command in a child process, restartable, ready once its port accepts."""

    def __init__(self, argv: list[str], address: Address, log_path: Path) -> None:
        self.argv = argv
        self.address = address
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        #: Added to the child's environment at each start (DST_CRASH_AT, DST_STORE_FAULTS...).
        self.env: dict[str, str] = {}
        #: A command the child runs under, e.g. ``unshare -m sh -c 'mount ... && exec "$@"'``
        #: (it must exec the dst command, so the pid stays the server's).
        self.prefix: list[str] = []

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "dst", *self.argv],
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dst {self.argv[0]} exited: {self.log_path.read_text()}")
            try:
                socket.create_connection((self.address.host, self.address.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"dst {self.argv[0]} did not start listening")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGCONT)
        self.kill(signal.SIGKILL)


class ServerProcess(DstProcess):
    """`dst serve` on a free loopback port."""

    def __init__(self, data_dir: Path, port: int, volume: str, log_path: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.volume = volume
        address = Address("127.0.0.1", port)
        argv = ["serve", "--listen", str(address), "--data", str(data_dir), "--volume", volume]
        argv += ["--insecure", *extra]
        super().__init__(argv, address, log_path)


@contextmanager
def server_process(tmp_path: Path, volume: str = "vol0=64M") -> Iterator[ServerProcess]:
    sp = ServerProcess(tmp_path / "data", free_port(), volume, tmp_path / "server.log")
    try:
        yield sp
    finally:
        sp.stop()


@contextmanager
def pair_processes(
    tmp_path: Path, volume: str = "vol0=64M", *extra: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A replicated pair (primary, secondary) of `dst serve` processes, not yet started;
    ``extra`` goes on both command lines."""
    pport, sport = free_port(), free_port()
    secondary = ServerProcess(
        tmp_path / "secondary",
        sport,
        volume,
        tmp_path / "secondary.log",
        "--peer",
        f"127.0.0.1:{pport}",
        "--role",
        "secondary",
        *extra,
    )
    primary = ServerProcess(
        tmp_path / "primary",
        pport,
        volume,
        tmp_path / "primary.log",
        "--peer",
        f"127.0.0.1:{sport}",
        "--role",
        "primary",
        *extra,
    )
    try:
        yield primary, secondary
    finally:
        primary.stop()
        secondary.stop()


@contextmanager
def bridge_process(
    tmp_path: Path, server: Address, volume: str = "vol0", *extra: str
) -> Iterator[DstProcess]:
    """`dst nbd` in front of ``server``; its NBD URI is ``nbd://{address}/{volume}``."""
    address = Address("127.0.0.1", free_port())
    argv = [
        "nbd",
        "--listen",
        str(address),
        "--server",
        str(server),
        "--volume",
        volume,
        "--insecure",
        *extra,
    ]
    bp = DstProcess(argv, address, tmp_path / "bridge.log")
    try:
        yield bp
    finally:
        bp.stop()


async def wait_in_sync(address: Address, timeout_s: float = 60) -> Mapping[str, Any]:
    """Poll `status` until the volume's replication link is up and the peer is up to date:
    nothing out of sync, and the resync concluded in both sides' generation ids."""
    with trio.fail_after(timeout_s):
        while True:
            doc = await fetch_status(address, None)
            v = doc["volumes"]["vol0"]
            if v["connection"] == "connected" and v["peer_disk"] == "up-to-date":
                return doc
            await trio.sleep(0.2)


def same_files(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)
