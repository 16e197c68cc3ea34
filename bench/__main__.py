"""dst beside its peers, measured in the same run on this machine.

    python3 -m bench [--size 512M] [--seconds 5] [--repeat 3] [--only WORKLOAD ...]
                     [--configs NAME ...] [--quick] [--out DIR] [--no-micro]

Runs every configuration of :mod:`bench.peers` (nbdkit file, qemu-nbd, nbdkit's Python plugin;
dst bridge → one server, → replicated pair, mirror bridge) through every workload of
:mod:`bench.workloads` (nbdcopy write/read of the whole volume, fio's nbd engine at 4 KiB
random depth 1 and 32 and 1 MiB sequential depth 8), ``--repeat`` times, configurations
interleaved within each repeat so drift on a shared machine hits them all alike.  Prints the
medians with dst's ratios to each peer, the dst processes' CPU seconds per GiB and peak RSS,
which of the issue's targets the run meets, and the microbenchmarks; writes ``results.json``,
``table.txt`` and ``chart.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench import micro, report
from bench.peers import CONFIGS, has_mirror
from bench.workloads import BY_NAME, WORKLOADS, GiB, cpu_seconds, peak_rss_mib
from dst.server.volume import parse_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512M", type=parse_size, help="volume size (512M)")
    parser.add_argument("--seconds", default=5.0, type=float, help="per fio workload (5)")
    parser.add_argument("--repeat", default=1, type=int, help="runs; figures are medians (1)")
    parser.add_argument(
        "--only", action="append", choices=list(BY_NAME), metavar="WORKLOAD",
        help=f"run only these workloads (repeatable): {', '.join(BY_NAME)}",
    )  # fmt: skip
    parser.add_argument(
        "--configs", action="append", choices=list(CONFIGS), metavar="NAME",
        help=f"run only these configurations (repeatable): {', '.join(CONFIGS)}",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="64 MiB volume, 2 s per fio workload, one run"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), metavar="DIR")
    parser.add_argument("--no-micro", action="store_true", help="skip the microbenchmarks")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.seconds, args.repeat = 64 << 20, 2.0, 1
    if args.repeat < 1 or args.seconds <= 0 or args.size < (1 << 20):
        parser.error(f"--repeat {args.repeat}, --seconds {args.seconds}, --size {args.size}")
    return args


def run(args: argparse.Namespace) -> report.Results:
    configs = args.configs or list(CONFIGS)
    if "dst-mirror" in configs and not has_mirror():
        print("skipping dst-mirror: this dst nbd has no --mirror", file=sys.stderr)
        configs.remove("dst-mirror")
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only]
    results = report.Results(args.size, args.seconds)
    with tempfile.TemporaryDirectory(prefix="dst-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for r in range(args.repeat):
            for name in configs:
                print(f"run {r + 1}/{args.repeat}: {name}", file=sys.stderr, flush=True)
                where = tmp / name
                where.mkdir()
                try:
                    with CONFIGS[name](where, args.size) as target:
                        for w in workloads:
                            before = {role: cpu_seconds(p) for role, p in target.pids.items()}
                            sample = w.run(target.uri, tmp, args.size, args.seconds)
                            results.add(name, w.name, sample.rate)
                            for role, pid in target.pids.items():
                                used = cpu_seconds(pid) - before[role]
                                results.add_cpu(name, w.name, role, used / (sample.nbytes / GiB))
                            print(f"  {w.name}: {sample.rate:.0f} {w.unit}", file=sys.stderr)
                        for role, pid in target.pids.items():
                            results.add_rss(name, role, peak_rss_mib(pid))
                finally:
                    shutil.rmtree(where, ignore_errors=True)
    return results


def write(results: report.Results, out: Path, extra: str = "") -> str:
    text = "\n\n".join(
        part
        for part in (
            report.rate_table(results),
            report.cpu_table(results),
            report.targets_table(report.targets(results)),
            extra,
        )
        if part
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(results.to_json())
    (out / "table.txt").write_text(text + "\n")
    report.chart(results, out / "chart.png")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    extra = "" if args.no_micro else micro.table(micro.run())
    print(write(results, args.out, extra))
    print(f"\nwritten: {args.out}/table.txt, results.json, chart.png")


if __name__ == "__main__":
    main()
