"""Where a dst configuration spends its time under one workload: py-spy on every dst process.

    python3 -m bench.profile [--config dst] [--workload randread-4k-qd32] [--seconds 15]

Starts the configuration (bench/peers.py) on a fresh volume, records each of its processes
with ``py-spy record --format raw`` while the workload runs, and prints per process: CPU
microseconds per request (from /proc, the figure that holds still on a shared machine), and
the Python functions that dominate — by self time and inclusive — among the samples that were
not waiting for the kernel (epoll and the socket syscalls are reported as one share: on
loopback a ``writev`` also pays for the receiver's TCP work).  The raw stacks stay in --out for
flame graphs (``flamegraph.pl`` or speedscope).  This is the profile issue 8's changes cite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.peers import CONFIGS
from bench.workloads import BY_NAME, cpu_split

MiB = 1 << 20
#: Leaf frames that mean "in the kernel, waiting or moving bytes", not Python work.
WAITING = (
    "get_events",
    "_epoll_wait",
    "_writev",
    "_readv",
    "_preadv",
    "_pwritev",
    "WorkerThread._work",  # a worker thread idle in trio's thread cache
)


def _where(frame: str) -> str:
    """``func (file.py:123)`` -> ``func (file.py)``: lines of one function counted together."""
    name, _, rest = frame.partition(" (")
    return f"{name} ({rest.split(':')[0]})"


def summarize(raw: Path, top: int) -> str:
    """The top functions of one py-spy raw file (``frame;frame;... count`` lines)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    waiting = total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [_where(f) for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        total += n
        if any(w in frames[-1] for w in WAITING):
            waiting += n
            continue
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    busy = total - waiting
    if not busy:
        return "  no samples"
    kernel, python = 100 * waiting / total, 100 * busy / total
    lines = [
        f"  samples {total}: in kernel waits/socket syscalls {kernel:.0f}%, "
        f"Python {python:.0f}% (shares below are of the Python samples)"
    ]
    lines.append("  self:")
    lines += [f"    {100 * n / busy:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive (dst and trio frames):")
    picked = [(f, n) for f, n in inclusive.most_common() if "dst/" in f or "trio/" in f]
    lines += [f"    {100 * n / busy:5.1f}%  {f}" for f, n in picked[:top]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="dst", choices=[c for c in CONFIGS if c.startswith("dst")])
    p.add_argument("--workload", default="randread-4k-qd32", choices=sorted(BY_NAME))
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--size", type=int, default=1024, help="volume MiB (1024)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", type=Path, help="keep the raw stacks here (default: a temp dir)")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="dst-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    workload = BY_NAME[args.workload]
    size = args.size * MiB
    with tempfile.TemporaryDirectory() as tmp, CONFIGS[args.config](Path(tmp), size) as t:
        spies = {}
        for name, pid in t.pids.items():
            argv = ["py-spy", "record", "--format", "raw", "--rate", "250", "--pid", str(pid)]
            argv += ["--duration", str(int(args.seconds)), "--output", str(out / f"{name}.txt")]
            spies[name] = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        cpu0 = {name: cpu_split(pid) for name, pid in t.pids.items()}
        sample = workload.run(t.uri, Path(tmp), size, args.seconds)
        cpu = {
            name: tuple(b - a for a, b in zip(cpu0[name], cpu_split(pid), strict=True))
            for name, pid in t.pids.items()
        }
        for spy in spies.values():
            spy.wait(args.seconds + 60)
    per = "request" if workload.unit == "IOPS" else "MiB"
    requests = sample.nbytes / (4096 if per == "request" else MiB)
    print(f"{args.config} {workload.name}: {sample.rate:.0f} {workload.unit}")
    for name in t.pids:
        user, system = (seconds * 1e6 / requests for seconds in cpu[name])
        print(f"\n{name}: {user + system:.0f} us CPU per {per} (user {user:.0f}, sys {system:.0f})")
        print(summarize(out / f"{name}.txt", args.top))
    print(f"\nraw stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
