"""``python3 -m tests.chaos``: one schedule, or a soak of random seeds in rotation.

    python3 -m tests.chaos --schedule kill-secondary [--crash-point NAME] --seed 3
    python3 -m tests.chaos --soak 30 [--seed S]

Prints each run's figures block and, for a soak, a total; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from tests.chaos.runner import Report, run_schedule
from tests.chaos.schedules import ROTATION, Schedule


def run_one(schedule: Schedule, keep: bool) -> Report:
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{schedule.name}-"))
    try:
        report = trio.run(run_schedule, schedule, workdir)
    except BaseException:
        print(f"kept: {workdir}", flush=True)
        raise
    print(report.figures(), flush=True)
    if report.result.ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept: {workdir}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.chaos")
    p.add_argument("--schedule", choices=sorted({n for n, _ in ROTATION}))
    p.add_argument("--crash-point")
    p.add_argument("--seed", type=int)
    p.add_argument("--window", type=float, default=8.0)
    p.add_argument(
        "--slow-secondary",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sleep before each write on the secondary's disk",
    )
    p.add_argument("--broken", help="DST_BROKEN for the servers (the checker must object)")
    p.add_argument("--soak", type=float, metavar="MINUTES")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.soak is None:
        if args.schedule is None:
            p.error("--schedule or --soak")
        s = Schedule(
            args.schedule,
            args.seed or 0,
            args.window,
            crash_point=args.crash_point,
            slow_secondary_s=args.slow_secondary,
        )
        s.broken = args.broken
        return 0 if run_one(s, args.keep).result.ok else 1
    rng = random.Random(args.seed)
    end = time.monotonic() + args.soak * 60
    reports: list[Report] = []
    errors: list[str] = []  # runs the harness could not finish (kept, named, counted)
    i = 0
    while time.monotonic() < end:
        name, cp = ROTATION[i % len(ROTATION)]
        seed = rng.randrange(1 << 30)
        print(f"=== run {i + 1}", flush=True)
        try:
            reports.append(run_one(Schedule(name, seed, args.window, crash_point=cp), args.keep))
        except Exception as exc:  # e.g. the pair never got back in sync: a finding, go on
            errors.append(f"{name} {cp or ''} seed {seed}: {exc!r}")
            print(f"RUN FAILED: {errors[-1]}", flush=True)
        i += 1
    total = {
        "runs": len(reports),
        "ops ok/failed/unknown": "/".join(
            str(sum(getattr(r.result, k) for r in reports))
            for k in ("ops_ok", "ops_failed", "ops_unknown")
        ),
        "faults": sum(
            n for r in reports for k, n in r.faults.items() if k != "unsynced writes rolled back"
        ),
        "unsynced writes rolled back": sum(
            r.faults["unsynced writes rolled back"] for r in reports
        ),
        "kills straddling in-flight writes": sum(r.straddled for r in reports),
        "acknowledged writes lost": sum(r.result.acked_writes_lost for r in reports),
        "fenced writes applied": sum(r.result.fenced_applied for r in reports),
        "fenced writes rejected": sum(r.result.fenced_rejected for r in reports),
        "replica divergence bytes": sum(r.result.divergence_bytes for r in reports),
        "runs with violations": sum(not r.result.ok for r in reports),
        "runs that could not finish": len(errors),
    }
    print("=== soak total")
    for k, v in total.items():
        print(f"{k}: {v}")
    for e in errors:
        print(f"  could not finish: {e}")
    return 1 if total["runs with violations"] or errors else 0


if __name__ == "__main__":
    sys.exit(main())
