"""The bench's figures, and what it prints and draws from them: a table of medians with dst's
ratios to each peer, CPU seconds per GiB and peak RSS of each dst process, the targets of the
issue (met or not), and a PNG chart.  Pure functions of :class:`Results`, so a unit test can
feed canned figures, and ``results.json`` can be redrawn without rerunning anything.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workloads import BY_NAME

#: (numerator, denominator) ratio columns, each printed when both configurations ran.
RATIOS = (
    ("dst", "nbdkit-python"),
    ("dst", "qemu-nbd"),
    ("dst", "nbdkit-file"),
    ("dst-repl", "dst"),
    ("dst-mirror", "dst"),
)
#: Server RSS bound at depth 32 (the issue's target, on a 1 GiB volume).
RSS_TARGET_MIB = 256.0


@dataclass
class Results:
    """Every sample of one bench run: rates per configuration and workload (one per repeat),
    dst CPU seconds per GiB per process role, and peak RSS (MiB) per role."""

    size: int
    seconds: float
    rates: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    cpu: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    rss: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, config: str, workload: str, rate: float) -> None:
        self.rates.setdefault(config, {}).setdefault(workload, []).append(rate)

    def add_cpu(self, config: str, workload: str, role: str, s_per_gib: float) -> None:
        per_role = self.cpu.setdefault(config, {}).setdefault(workload, {})
        per_role.setdefault(role, []).append(s_per_gib)

    def add_rss(self, config: str, role: str, mib: float) -> None:
        roles = self.rss.setdefault(config, {})
        roles[role] = max(roles.get(role, 0.0), mib)

    def medians(self) -> dict[str, dict[str, float]]:
        return {
            c: {w: statistics.median(v) for w, v in per.items()} for c, per in self.rates.items()
        }

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Results:
        obj: dict[str, Any] = json.loads(text)
        return cls(**obj)


def _workloads(results: Results) -> list[str]:
    seen = {w for per in results.rates.values() for w in per}
    return [w for w in BY_NAME if w in seen] + sorted(seen - set(BY_NAME))


def _unit(workload: str) -> str:
    return BY_NAME[workload].unit if workload in BY_NAME else "?"


def rate_table(results: Results) -> str:
    med = results.medians()
    configs = list(results.rates)
    ratios = [(a, b) for a, b in RATIOS if a in med and b in med]
    repeats = max((len(v) for per in results.rates.values() for v in per.values()), default=0)
    lines = [
        f"NBD on loopback, {results.size >> 20} MiB volume, fio {results.seconds:g} s per "
        f"workload, median of {repeats} run(s)"
    ]
    head = f"{'workload':<19}{'unit':>6}" + "".join(f"{c:>14}" for c in configs)
    head += "".join(f"{a + '/' + b:>{max(14, len(a) + len(b) + 3)}}" for a, b in ratios)
    lines.append(head)
    for w in _workloads(results):
        row = f"{w:<19}{_unit(w):>6}"
        row += "".join(f"{med[c][w]:>14.0f}" if w in med[c] else f"{'-':>14}" for c in configs)
        for a, b in ratios:
            width = max(14, len(a) + len(b) + 3)
            ok = w in med[a] and w in med[b] and med[b][w] > 0
            row += f"{med[a][w] / med[b][w]:>{width}.2f}" if ok else f"{'-':>{width}}"
        lines.append(row)
    return "\n".join(lines)


def cpu_table(results: Results) -> str:
    """CPU seconds per GiB moved, per dst process, and each process's peak RSS."""
    lines = ["dst CPU seconds per GiB moved (user+sys, median), and peak RSS (VmHWM)"]
    for config, per in results.cpu.items():
        roles = sorted({r for per_role in per.values() for r in per_role})
        lines.append(f"{config:<19}" + "".join(f"{r:>12}" for r in roles))
        for w in _workloads(results):
            if w in per:
                cells = [per[w].get(r) for r in roles]
                lines.append(
                    f"  {w:<17}"
                    + "".join(
                        f"{statistics.median(c):>12.2f}" if c else f"{'-':>12}" for c in cells
                    )
                )
        rss = results.rss.get(config, {})
        lines.append(
            f"  {'peak RSS MiB':<17}" + "".join(f"{rss.get(r, 0.0):>12.0f}" for r in roles)
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    what: str
    value: float
    goal: float
    met: bool


def _ratio(med: dict[str, dict[str, float]], a: str, b: str, w: str) -> float | None:
    if w in med.get(a, {}) and w in med.get(b, {}) and med[b][w] > 0:
        return med[a][w] / med[b][w]
    return None


def targets(results: Results) -> list[Target]:
    """The issue's targets that this run's figures can judge."""
    med = results.medians()
    goals = [
        ("randread-4k-qd32", 2.0),
        ("randwrite-4k-qd32", 2.0),
        ("randread-4k-qd1", 0.5),
        ("randwrite-4k-qd1", 0.5),
        ("nbdcopy-write", 1.0),
        ("nbdcopy-read", 1.0),
    ]
    out = []
    for w, goal in goals:
        r = _ratio(med, "dst", "nbdkit-python", w)
        if r is not None:
            out.append(Target(f"dst/nbdkit-python {w}", r, goal, r >= goal))
    for w in med.get("dst-repl", {}):
        r = _ratio(med, "dst-repl", "dst", w)
        if r is not None:
            out.append(Target(f"dst-repl/dst {w}", r, 0.6, r >= 0.6))
    for w in med.get("dst", {}):
        r = _ratio(med, "dst", "qemu-nbd", w)
        if r is not None:
            out.append(Target(f"dst/qemu-nbd {w} (beyond)", r, 1.0, r >= 1.0))
    for config, roles in results.rss.items():
        for role, mib in roles.items():
            if role != "bridge":
                what = f"{config} {role} peak RSS MiB (< {RSS_TARGET_MIB:.0f})"
                out.append(Target(what, mib, RSS_TARGET_MIB, mib < RSS_TARGET_MIB))
    return out


def targets_table(found: list[Target]) -> str:
    lines = ["targets"]
    for t in found:
        mark = "met" if t.met else "NOT met"
        lines.append(f"  {t.what:<52}{t.value:>9.2f}  goal {t.goal:<6g} {mark}")
    return "\n".join(lines)


def chart(results: Results, path: Path) -> None:
    """Grouped bars, one group per workload, each bar a configuration's median relative to
    qemu-nbd's (units differ between workloads; ratios do not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = results.medians()
    base = "qemu-nbd" if "qemu-nbd" in med else next(iter(med))
    workloads = [w for w in _workloads(results) if med[base].get(w)]
    configs = list(med)
    width = 0.8 / max(1, len(configs))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.4 * len(workloads)), 5))
    for i, c in enumerate(configs):
        xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(workloads))]
        ys = [med[c].get(w, 0.0) / med[base][w] for w in workloads]
        ax.bar(xs, ys, width, label=c)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads, rotation=20, ha="right")
    ax.set_ylabel(f"throughput relative to {base} (log)")
    ax.set_title(f"NBD on loopback, {results.size >> 20} MiB volume (higher is better)")
    ax.legend(fontsize="small", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
