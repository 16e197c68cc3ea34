"""The chaos CI tier: each schedule once on a fixed seed against real `dst serve` processes.

Each test asserts the checker found no violation AND that the schedule did what it claims:
its faults were injected, at least one kill straddled in-flight writes, and the heal it
implies happened (a resync, or unknown operations from a killed workload).  The teeth test
runs a deliberately broken build and asserts the checker objects.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.runner import run_schedule
from tests.chaos.schedules import ROTATION, Schedule

pytestmark = pytest.mark.slow

SEEDS = {
    ("kill-secondary", None): 1,
    ("kill-primary-promote", None): 1,
    ("kill-client", None): 2,
    ("kill-secondary", "secondary.after-write-before-fsync"): 2,
    ("kill-primary-promote", "primary.after-local-write"): 3,
    ("kill-primary-promote", "primary.after-peer-ack"): 4,
    ("kill-bridge", None): 1,
    ("power-loss-secondary", None): 1,
    ("power-loss-primary-promote", None): 1,
    ("bad-blocks-primary", None): 1,
    ("kill-both-promote", None): 1,
    ("resync-interrupted", None): 1,
    ("migration", None): 1,
    ("migration", "takeover.mid"): 1,
    ("proxy-replication", None): 1,
    ("mirror-leg-frozen", None): 1,
    ("power-loss-both", None): 1,
    ("split-brain", None): 1,
}


@pytest.mark.parametrize(("name", "crash_point"), ROTATION, ids=[f"{n}-{c}" for n, c in ROTATION])
async def test_schedule_keeps_every_invariant(
    tmp_path: Path, name: str, crash_point: str | None
) -> None:
    schedule = Schedule(name, SEEDS[(name, crash_point)], window_s=7.0, crash_point=crash_point)
    report = await run_schedule(schedule, tmp_path)
    print(report.figures())
    r = report.result
    assert r.ok, r.violations[:10]
    assert sum(report.faults.values()) >= 1 and not any("not reached" in k for k in report.faults)
    disk = schedule.target == "disk"
    assert disk or report.straddled >= 1, "no kill landed while writes were in flight"
    assert r.writes_acked > 500 and r.reads_checked > 100 and r.sectors_checked > 10_000
    assert r.acked_writes_lost == 0 and r.divergence_bytes == 0 and r.fenced_applied == 0
    if schedule.power_loss:
        assert report.faults["unsynced writes rolled back"] > 0  # the power cut took something
    if disk:
        assert r.ops_failed >= 1  # reads of the bad blocks failed, as they must
    elif name in ("kill-client", "kill-bridge"):
        assert r.ops_unknown >= 1  # the kill left operations without an answer
    elif name == "split-brain":
        # invariant 9: only a forced promote split the pair, and the sides saw it on meeting
        assert report.faults["unforced promote refused"] == 1, report.faults
        assert report.faults["split brain detected"] == 1, report.faults
        assert r.discarded_writes > 0 and report.resync_bytes > 0
    elif name == "migration":
        # A's late writes reached the server and bounced; or, when the primary died in the
        # takeover, A's reconnect found its epoch fenced on the promoted replica
        assert report.stale_refused >= 1 or crash_point == "takeover.mid"
        assert report.bridges_fenced == 1  # A knows it lost the volume (event=fenced)
        assert r.ops_failed >= 1  # and A's users got errors for them, not successes
    else:
        assert report.resync_bytes > 0  # the returning side was resynced
    assert report.resume_s and max(report.resume_s) < 10


#: Teeth: (schedule, broken build, the invariants of which one must catch it, why)
TEETH = [
    ("kill-primary-promote", "resync-wrong-side", {1, 2},
     "resyncs the returning old primary's stale data over the survivor's"),
    ("power-loss-both", "skip-fsync", {1},
     "FLUSH does not sync: a power cut of both takes writes a FLUSH had covered"),
    ("bad-blocks-primary", "eio-as-zeros", {6}, "answers a failed READ with zeros"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "broken", "caught_by", "why"), TEETH, ids=[f"{t[1]}-{t[0]}" for t in TEETH]
)
async def test_checker_catches_a_broken_build(
    tmp_path: Path, name: str, broken: str, caught_by: set[int], why: str
) -> None:
    schedule = Schedule(name, 1, window_s=7.0)
    schedule.broken = broken
    report = await run_schedule(schedule, tmp_path)
    print(report.figures())
    assert caught_by & {v.invariant for v in report.result.violations}, (why, report.figures())


@pytest.mark.parametrize("broken", [None, "ack-before-sync"])
async def test_checker_catches_an_ack_before_the_peer_has_the_write(
    tmp_path: Path, broken: str | None
) -> None:
    """Teeth: with a slow disk under the secondary, a build that acknowledges protocol C
    writes before the peer completes them loses acknowledged writes when the primary's host
    is lost, the secondary's process dies with it and is promoted (invariant 1); the real
    build, waiting for the slow peer, loses none on the same seed.

    Both die: if only the primary did, whether the secondary finished the writes it had
    under way would depend on a FIN or a RST reaching it first (it finishes them after a
    clean EOF), and the broken build would slip through about half the time."""
    schedule = Schedule("kill-both-promote", 1, window_s=6.0, slow_secondary_s=0.2)
    schedule.broken = broken
    report = await run_schedule(schedule, tmp_path)
    print(report.figures())
    if broken is None:
        assert report.result.ok, report.result.violations[:10]
        assert report.result.writes_acked > 30
    else:
        assert 1 in {v.invariant for v in report.result.violations}, report.figures()
        assert report.result.acked_writes_lost > 0
