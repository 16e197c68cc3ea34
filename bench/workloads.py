"""The workloads, each run by a real NBD client against a :class:`~bench.peers.Target`, and
the per-process figures read from ``/proc`` around them.

A workload returns a :class:`Sample`: its rate (MiB/s or IOPS, as its unit says) and the bytes
it moved, which turn the CPU seconds the dst processes spent during it into seconds per GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Sample:
    rate: float
    nbytes: int


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    unit: str  # "MiB/s" or "IOPS"
    run: Callable[[str, Path, int, float], Sample]


def _nbdcopy(src: str, dst: str, size: int) -> Sample:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", "--flush", src, dst], check=True, timeout=900)
    return Sample(size / MiB / (time.perf_counter() - start), size)


def source_image(tmp: Path, size: int) -> Path:
    """Random bytes to write (made once per run: urandom of 512 MiB is not free)."""
    img = tmp / f"src-{size}.img"
    if not img.exists() or img.stat().st_size != size:
        with open(img, "wb") as f:
            for _ in range(0, size, 64 * MiB):
                f.write(os.urandom(min(64 * MiB, size - f.tell())))
    return img


def nbdcopy_write(uri: str, tmp: Path, size: int, seconds: float) -> Sample:
    return _nbdcopy(str(source_image(tmp, size)), uri, size)


def nbdcopy_read(uri: str, tmp: Path, size: int, seconds: float) -> Sample:
    out = tmp / "read.img"
    try:
        return _nbdcopy(uri, str(out), size)
    finally:
        out.unlink(missing_ok=True)


def fio(rw: str, bs: str, depth: int) -> Callable[[str, Path, int, float], Sample]:
    def run(uri: str, tmp: Path, size: int, seconds: float) -> Sample:
        argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}"]
        argv += [f"--bs={bs}", f"--iodepth={depth}", f"--runtime={seconds}", "--time_based"]
        argv += [f"--size={size}", "--output-format=json"]
        out = subprocess.run(argv, check=True, capture_output=True, timeout=seconds * 10 + 60)
        # the nbd engine prints "fio: connected to NBD server" ahead of the JSON
        text = out.stdout.decode()
        job = json.loads(text[text.index("{") :])["jobs"][0]
        side = job["read"] if "read" in rw else job["write"]
        rate = float(side["iops"]) if bs == "4k" else float(side["bw_bytes"]) / MiB
        return Sample(rate, int(side["io_bytes"]))

    return run


WORKLOADS = (
    Workload("nbdcopy-write", "MiB/s", nbdcopy_write),
    Workload("nbdcopy-read", "MiB/s", nbdcopy_read),
    Workload("randread-4k-qd1", "IOPS", fio("randread", "4k", 1)),
    Workload("randread-4k-qd32", "IOPS", fio("randread", "4k", 32)),
    Workload("randwrite-4k-qd1", "IOPS", fio("randwrite", "4k", 1)),
    Workload("randwrite-4k-qd32", "IOPS", fio("randwrite", "4k", 32)),
    Workload("seqwrite-1m-qd8", "MiB/s", fio("write", "1M", 8)),
    Workload("seqread-1m-qd8", "MiB/s", fio("read", "1M", 8)),
)
BY_NAME = {w.name: w for w in WORKLOADS}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (fields 14 and 15 of /proc/PID/stat)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time of ``pid`` so far, seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of ``pid`` (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
