"""The NBD bridge beside its peers, measured in the same run on this machine.

    python3 -m bench.nbd_compare [--size 256M] [--seconds 5] [--repeat 1]

Peers, each serving a raw file on loopback: ``nbdkit file`` (C), ``qemu-nbd`` (C), and dst
(``dst serve`` → ``dst nbd``: two hops and two Python processes).  Workloads: nbdcopy write and
read of the whole volume; fio ``--ioengine=nbd`` 4 KiB random read and write at queue depth 1
and 32; 1 MiB sequential write at depth 8.  Prints one table: MiB/s or IOPS per peer, and
dst's ratio to each peer.  Figures are medians over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from dst.server.volume import parse_size

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited early")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen on {port}")


@contextmanager
def _procs(*argvs: tuple[list[str], int | None]) -> Iterator[None]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, port in argvs:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            if port is not None:
                _wait_port(port, proc)
        yield
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def nbdkit_file(tmp: Path, size: int) -> Iterator[str]:
    path = tmp / "nbdkit.img"
    with open(path, "wb") as f:
        f.truncate(size)
    port = _free_port()
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(path)]
    with _procs((argv, port)):
        yield f"nbd://127.0.0.1:{port}"


@contextmanager
def qemu_nbd(tmp: Path, size: int) -> Iterator[str]:
    path = tmp / "qemu.img"
    with open(path, "wb") as f:
        f.truncate(size)
    port = _free_port()
    argv = [
        "qemu-nbd",
        "--persistent",  # outlive the first client
        "-f",
        "raw",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "-x",
        "disk",
        "--shared=16",
        "--cache=writeback",
        str(path),
    ]
    with _procs((argv, port)):
        yield f"nbd://127.0.0.1:{port}/disk"


@contextmanager
def dst_bridge(tmp: Path, size: int) -> Iterator[str]:
    sport, nport = _free_port(), _free_port()
    dst = [sys.executable, "-m", "dst"]
    server = [
        *dst,
        "serve",
        "--listen",
        f"127.0.0.1:{sport}",
        "--data",
        str(tmp / "dst"),
        "--volume",
        f"bench={size}",
        "--insecure",
        "--log-level",
        "WARNING",
    ]
    bridge = [
        *dst,
        "nbd",
        "--listen",
        f"127.0.0.1:{nport}",
        "--server",
        f"127.0.0.1:{sport}",
        "--volume",
        "bench",
        "--insecure",
        "--log-level",
        "WARNING",
    ]
    with _procs((server, sport), (bridge, nport)):
        yield f"nbd://127.0.0.1:{nport}/bench"


PEERS: dict[str, Callable[[Path, int], AbstractContextManager[str]]] = {
    "dst": dst_bridge,
    "nbdkit-file": nbdkit_file,
    "qemu-nbd": qemu_nbd,
}


def _nbdcopy(src: str, dst: str, size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", "--flush", src, dst], check=True, timeout=600)
    return size / MiB / (time.perf_counter() - start)


def _fio(uri: str, rw: str, bs: str, depth: int, seconds: float, size: int) -> float:
    out = subprocess.run(
        [
            "fio",
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={depth}",
            f"--runtime={seconds}",
            "--time_based",
            f"--size={size}",
            "--output-format=json",
        ],
        check=True,
        capture_output=True,
        timeout=seconds * 10 + 60,
    )
    # the nbd engine prints "fio: connected to NBD server" ahead of the JSON
    text = out.stdout.decode()
    job = json.loads(text[text.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["iops"]) if bs == "4k" else float(side["bw_bytes"]) / MiB


def measure(uri: str, tmp: Path, size: int, seconds: float) -> dict[str, float]:
    img = tmp / "src.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.write(os.urandom(size))
    out = tmp / "out.img"
    results = {
        "nbdcopy write MiB/s": _nbdcopy(str(img), uri, size),
        "nbdcopy read MiB/s": _nbdcopy(uri, str(out), size),
    }
    out.unlink()
    for rw, depth in [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]:
        results[f"fio 4k {rw} qd{depth} IOPS"] = _fio(uri, rw, "4k", depth, seconds, size)
    results["fio 1M write qd8 MiB/s"] = _fio(uri, "write", "1M", 8, seconds, size)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M", type=parse_size)
    parser.add_argument("--seconds", default=5.0, type=float)
    parser.add_argument("--repeat", default=1, type=int)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[float]]] = {peer: {} for peer in PEERS}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for r in range(args.repeat):
            for peer, start in PEERS.items():
                print(f"run {r + 1}/{args.repeat}: {peer} ...", file=sys.stderr, flush=True)
                with start(tmp, args.size) as uri:
                    for name, value in measure(uri, tmp, args.size, args.seconds).items():
                        runs[peer].setdefault(name, []).append(value)
    med = {p: {k: statistics.median(v) for k, v in m.items()} for p, m in runs.items()}
    names = list(med["dst"])
    print(f"\nNBD on loopback, {args.size // MiB} MiB volume, median of {args.repeat} run(s)")
    print(
        f"{'workload':<26}{'dst':>10}{'nbdkit-file':>13}{'qemu-nbd':>10}"
        f"{'dst/nbdkit':>12}{'dst/qemu':>10}"
    )
    for name in names:
        d, k, q = med["dst"][name], med["nbdkit-file"][name], med["qemu-nbd"][name]
        print(f"{name:<26}{d:>10.0f}{k:>13.0f}{q:>10.0f}{d / k:>12.2f}{d / q:>10.2f}")


if __name__ == "__main__":
    main()
