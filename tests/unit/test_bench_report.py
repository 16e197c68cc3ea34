"""The bench's table, ratios and targets, on canned figures (the bench itself is too slow for
the suite; tests/integration/test_bench.py runs a tiny one through real processes)."""

from __future__ import annotations

from pathlib import Path

from bench import report
from bench.__main__ import write


def canned() -> report.Results:
    results = report.Results(size=512 << 20, seconds=5.0)
    for rate in (900.0, 1000.0, 5000.0):  # median 1000, the outlier ignored
        results.add("nbdkit-python", "randread-4k-qd32", rate)
    for rate in (2500.0, 2000.0, 100.0):  # median 2000
        results.add("dst", "randread-4k-qd32", rate)
    results.add("qemu-nbd", "randread-4k-qd32", 4000.0)
    results.add("dst", "nbdcopy-write", 150.0)
    results.add("nbdkit-python", "nbdcopy-write", 200.0)
    results.add("dst-repl", "nbdcopy-write", 60.0)
    results.add_cpu("dst", "nbdcopy-write", "server", 3.0)
    results.add_rss("dst", "server", 120.0)
    results.add_rss("dst", "server", 300.0)  # the peak over repeats counts
    results.add_rss("dst", "bridge", 999.0)  # the RSS target is about servers
    return results


def test_medians_and_ratio_columns() -> None:
    table = report.rate_table(canned())
    row = next(line for line in table.splitlines() if line.startswith("randread-4k-qd32"))
    cells = row.split()
    # configurations in the order they ran (dst-repl ran no randread), then
    # dst/nbdkit-python and dst/qemu-nbd
    assert cells[2:6] == ["1000", "2000", "4000", "-"]
    assert cells[6:8] == ["2.00", "0.50"]
    assert "dst-repl/dst" in table


def test_targets_judge_each_goal() -> None:
    found = {t.what: t for t in report.targets(canned())}
    assert found["dst/nbdkit-python randread-4k-qd32"].met  # 2.0 >= 2
    assert not found["dst/nbdkit-python nbdcopy-write"].met  # 0.75 < 1
    repl = found["dst-repl/dst nbdcopy-write"]
    assert repl.value == 0.4 and not repl.met
    rss = [t for t in found.values() if "peak RSS" in t.what]
    assert [(t.value, t.met) for t in rss] == [(300.0, False)]


def test_write_round_trips_and_draws(tmp_path: Path) -> None:
    text = write(canned(), tmp_path)
    assert "NOT met" in text and "peak RSS MiB" in text
    again = report.Results.from_json((tmp_path / "results.json").read_text())
    assert again.medians() == canned().medians()
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
