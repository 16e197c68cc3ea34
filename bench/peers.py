"""What the bench measures: each peer or dst configuration, started on loopback over a fresh
raw file and torn down after its workloads.

A configuration is a context manager that yields a :class:`Target`: the NBD URI to point the
clients at, and for dst the pids of its processes (bridge, server, secondary...) whose CPU
time and peak RSS the bench records.  Peers: ``nbdkit file`` (C), ``qemu-nbd`` (C) and
nbdkit's Python plugin over a file (:mod:`bench.nbdkit_file_plugin`, the Python peer).  dst:
bridge → one server; bridge → replicated pair (protocol C); mirror bridge over two servers
(only when ``dst nbd --help`` offers ``--mirror``).  The dst processes are the real
``python3 -m dst`` commands, started by the integration tests' harness.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dst.net.endpoints import Address
from tests.integration.harness import (
    DstProcess,
    ServerProcess,
    bridge_process,
    free_port,
    pair_processes,
)

#: How long a peer may take to listen, and a replicated pair to connect.
START_TIMEOUT_S = 30.0
PLUGIN = Path(__file__).with_name("nbdkit_file_plugin.py")
#: dst's own processes log only warnings: a line per connection would cost the run nothing,
#: but the default INFO level is not what a production deployment measures.
QUIET = ("--log-level", "WARNING")


@dataclass(frozen=True, slots=True)
class Target:
    """A running configuration: where NBD clients connect, and which dst pids to watch."""

    uri: str
    pids: dict[str, int] = field(default_factory=dict)


Config = Callable[[Path, int], AbstractContextManager[Target]]


def _image(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited early")  # type: ignore[arg-type]
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen on {port}")


@contextmanager
def _process(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def nbdkit_file(tmp: Path, size: int) -> Iterator[Target]:
    img, port = _image(tmp / "nbdkit.img", size), free_port()
    with _process(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(img)], port):
        yield Target(f"nbd://127.0.0.1:{port}")


@contextmanager
def nbdkit_python(tmp: Path, size: int) -> Iterator[Target]:
    img, port = _image(tmp / "nbdkit-python.img", size), free_port()
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "python", str(PLUGIN)]
    with _process([*argv, f"file={img}"], port):
        yield Target(f"nbd://127.0.0.1:{port}")


@contextmanager
def qemu_nbd(tmp: Path, size: int) -> Iterator[Target]:
    img, port = _image(tmp / "qemu.img", size), free_port()
    argv = ["qemu-nbd", "--persistent", "-f", "raw", "-b", "127.0.0.1", "-p", str(port)]
    argv += ["-x", "disk", "--shared=16", "--cache=writeback", str(img)]
    with _process(argv, port):
        yield Target(f"nbd://127.0.0.1:{port}/disk")


def _pid(proc: DstProcess) -> int:
    assert proc.proc is not None
    return proc.proc.pid


@contextmanager
def dst_single(tmp: Path, size: int) -> Iterator[Target]:
    """Bridge → one server → file: two hops, two Python processes."""
    port = free_port()
    server = ServerProcess(tmp / "data", port, f"bench={size}", tmp / "server.log", *QUIET)
    try:
        server.start()
        with bridge_process(tmp, server.address, "bench", *QUIET) as bridge:
            bridge.start()
            pids = {"bridge": _pid(bridge), "server": _pid(server)}
            yield Target(f"nbd://{bridge.address}/bench", pids)
    finally:
        server.stop()


def wait_replicating(address: Address) -> None:
    """Poll ``dst status`` until the pair's link is up and nothing is out of sync."""
    deadline = time.monotonic() + START_TIMEOUT_S
    argv = [sys.executable, "-m", "dst", "status", "--server", str(address), "--json"]
    while time.monotonic() < deadline:
        out = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        if out.returncode == 0:
            volume = json.loads(out.stdout)["volumes"]["bench"]
            if volume["connection"] == "connected" and volume["peer_disk"] == "up-to-date":
                return
        time.sleep(0.2)
    raise RuntimeError(f"the pair behind {address} did not connect and sync")


@contextmanager
def dst_replicated(tmp: Path, size: int) -> Iterator[Target]:
    """Bridge → primary (protocol C) → secondary: a write is acknowledged when both have it."""
    with pair_processes(tmp, f"bench={size}") as (primary, secondary):
        for proc in (secondary, primary):
            proc.argv += QUIET
            proc.start()
        wait_replicating(primary.address)
        servers = ("--server", str(secondary.address))
        with bridge_process(tmp, primary.address, "bench", *servers, *QUIET) as bridge:
            bridge.start()
            pids = {"bridge": _pid(bridge), "primary": _pid(primary)}
            pids["secondary"] = _pid(secondary)
            yield Target(f"nbd://{bridge.address}/bench", pids)


def has_mirror() -> bool:
    """Whether this dst has the mirror bridge (``dst nbd --mirror``, built on another branch)."""
    out = subprocess.run(
        [sys.executable, "-m", "dst", "nbd", "--help"], capture_output=True, check=False
    )
    return b"--mirror" in out.stdout


@contextmanager
def dst_mirror(tmp: Path, size: int) -> Iterator[Target]:
    """Mirror bridge over two standalone servers: the bridge writes both legs itself."""
    with ExitStack() as stack:
        legs = []
        for name in ("leg-a", "leg-b"):
            leg = ServerProcess(
                tmp / name, free_port(), f"bench={size}", tmp / f"{name}.log", *QUIET
            )
            stack.callback(leg.stop)
            leg.start()
            legs.append(leg)
        extra = ["--server", str(legs[1].address), "--mirror", *QUIET]
        extra += ["--state-dir", str(tmp / "mirror-state")]  # not ./dst-bridge in the cwd
        bridge = stack.enter_context(bridge_process(tmp, legs[0].address, "bench", *extra))
        bridge.start()
        pids = {"bridge": _pid(bridge), "leg-a": _pid(legs[0]), "leg-b": _pid(legs[1])}
        yield Target(f"nbd://{bridge.address}/bench", pids)


#: Every configuration, in the order runs go; the first three are the peers.
CONFIGS: dict[str, Config] = {
    "nbdkit-file": nbdkit_file,
    "qemu-nbd": qemu_nbd,
    "nbdkit-python": nbdkit_python,
    "dst": dst_single,
    "dst-repl": dst_replicated,
    "dst-mirror": dst_mirror,
}
PEERS = ("nbdkit-file", "qemu-nbd", "nbdkit-python")
