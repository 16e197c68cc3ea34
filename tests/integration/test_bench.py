"""A tiny run of ``python3 -m bench`` through real processes: one fio workload against the
Python peer and dst bridge → one server, so the bench's plumbing (process start, /proc
figures, table) cannot rot unnoticed.  Figures are not asserted: the machine is shared."""

from __future__ import annotations

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
