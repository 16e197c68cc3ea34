"""A/B of two checkouts of dst, both running at once: is a change faster, beyond the noise?

    python3 -m bench.paired --base REV [--config dst] --only WORKLOAD [--only ...]
                            [--rounds 6] [--seconds 3] [--size 512M]

The base revision is checked out into a temporary git worktree (or ``--base`` names a
checkout's directory); this checkout is the new side.  Both stacks of ``--config`` are
started side by side, then each round runs every workload on one and then the other, the
order swapped each round, so that what this shared machine does meanwhile (its speed drifts
by a third over minutes) falls on both alike.  Prints, per workload, each side's median and
rounds, the median of the per-round new/base ratios (the figure to quote), and each side's
CPU per 4 KiB request (per MiB for the others) over all its dst processes.  Two runs of
``python3 -m bench`` a few minutes apart cannot resolve a 10 % change here; a paired run of a
few rounds can.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.peers import CONFIGS, Target
from bench.workloads import BY_NAME, cpu_seconds
from dst.server.volume import parse_size

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """``rev`` checked out in a temporary worktree, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dst-base-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev],
            check=True, capture_output=True,
        )  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                check=False, capture_output=True,
            )  # fmt: skip


@contextmanager
def stack_from(tree: Path, config: str, tmp: Path, size: int) -> Iterator[Target]:
    """``config`` started from the dst of ``tree`` (its processes run ``python3 -m dst``
    with that tree as their working directory and first import path)."""
    saved_cwd, saved_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(tree)
    os.environ["PYTHONPATH"] = str(tree)
    try:
        with CONFIGS[config](tmp, size) as target:
            os.chdir(saved_cwd)
            yield target
    finally:
        os.chdir(saved_cwd)
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.paired", description=__doc__.split("\n")[0])
    p.add_argument(
        "--base", required=True, help="the git revision (or a checkout's directory) to compare to"
    )
    p.add_argument("--config", default="dst", choices=[c for c in CONFIGS if c.startswith("dst")])
    p.add_argument("--only", action="append", required=True, choices=list(BY_NAME))
    p.add_argument("--rounds", type=int, default=6, help="rounds of every workload (6)")
    p.add_argument("--seconds", type=float, default=3.0, help="per fio run (3)")
    p.add_argument("--size", type=parse_size, default="512M", help="volume size (512M)")
    args = p.parse_args(argv)
    sides = ("base", "new")
    rates: dict[tuple[str, str], list[float]] = {(s, w): [] for s in sides for w in args.only}
    cpu: dict[tuple[str, str], list[float]] = {(s, w): [] for s in sides for w in args.only}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dst-paired-")))
        given = Path(args.base)
        tree = given.resolve() if given.is_dir() else stack.enter_context(worktree(args.base))
        trees = {"base": tree, "new": ROOT}
        targets = {}
        for side in sides:
            (tmp / side).mkdir()
            targets[side] = stack.enter_context(
                stack_from(trees[side], args.config, tmp / side, args.size)
            )
        for r in range(args.rounds):
            for name in args.only:
                workload = BY_NAME[name]
                for side in sides if r % 2 == 0 else sides[::-1]:
                    target = targets[side]
                    before = sum(cpu_seconds(pid) for pid in target.pids.values())
                    sample = workload.run(target.uri, tmp, args.size, args.seconds)
                    used = sum(cpu_seconds(pid) for pid in target.pids.values()) - before
                    requests = sample.nbytes / (4096 if "4k" in name else 1 << 20)  # or MiB
                    rates[side, name].append(sample.rate)
                    cpu[side, name].append(used / max(requests, 1) * 1e6)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{args.config}: {args.base} (base) against this checkout (new), {args.rounds} rounds")
    for name in args.only:
        base, new = rates["base", name], rates["new", name]
        ratio = statistics.median(n / b for n, b in zip(new, base, strict=True))
        unit, per = BY_NAME[name].unit, "request" if "4k" in name else "MiB"
        cpu_base, cpu_new = (statistics.median(cpu[side, name]) for side in sides)
        print(
            f"{name:20s} {unit:6s} base {statistics.median(base):9.0f}  new "
            f"{statistics.median(new):9.0f}  paired new/base {ratio:.3f}  CPU us per {per} "
            f"{cpu_base:.0f} -> {cpu_new:.0f}"
        )
        print(f"  rounds base {[round(x) for x in base]}")
        print(f"  rounds new  {[round(x) for x in new]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
