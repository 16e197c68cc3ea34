"""A tiny run of ``python3 -m bench`` through real processes: one fio workload against the
Python peer and dst bridge → one server, so the bench's plumbing (process start, /proc
figures, table) cannot rot unnoticed.  Figures are not asserted: the machine is shared."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench.__main__ import parse_args, run, write


def test_bench_runs_one_workload_per_configuration(tmp_path: Path) -> None:
    configs = ["--configs", "nbdkit-python", "--configs", "dst", "--out", str(tmp_path)]
    args = parse_args(["--size", "8M", "--seconds", "1", "--only", "randread-4k-qd1", *configs])
    results = run(args)
    assert set(results.rates) == {"nbdkit-python", "dst"}
    assert all(v[0] > 0 for per in results.rates.values() for v in per.values())
    assert set(results.rss["dst"]) == {"bridge", "server"}
    assert all(mib > 0 for mib in results.rss["dst"].values())
    text = write(results, tmp_path)
    assert "dst/nbdkit-python" in text
    assert (tmp_path / "chart.png").exists()


def test_the_trio_floor_reports_a_round_trip_and_its_cpu_beside_blocking_sockets() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.floor", "--count", "500"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.findall(
        r"^(trio|blocking sockets, no event loop) ping-pong, .* round trip ([\d.]+) us; "
        r".* ([\d.]+) us \(user ([\d.]+), sys ([\d.]+)\)$",
        out,
        re.M,
    )
    assert [name for name, *_ in found] == ["trio", "blocking sockets, no event loop"], out
    for _, *figures in found:
        trip, cpu, user, system = map(float, figures)
        assert trip > 0 and cpu > 0 and abs(user + system - cpu) < 0.2, out


def test_a_paired_run_measures_both_sides_in_alternating_rounds() -> None:
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-m", "bench.paired", "--base", str(root), "--size", "64M"]
    argv += ["--only", "randwrite-4k-qd1", "--rounds", "2", "--seconds", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True, cwd=root)
    found = re.search(
        r"randwrite-4k-qd1 +IOPS +base +(\d+) +new +(\d+) +paired new/base ([\d.]+) +"
        r"CPU us per request (\d+) -> (\d+)",
        out.stdout,
    )
    assert found, out.stdout + out.stderr
    base, new, ratio, cpu_base, cpu_new = map(float, found.groups())
    assert base > 0 and new > 0 and ratio > 0 and cpu_base > 0 and cpu_new > 0
    assert out.stdout.count("rounds base [") == 1 and "round 2/2 done" in out.stderr
