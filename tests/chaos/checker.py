"""The chaos checker: from every workload history and a final read of the volume, check the
invariants of ../shared/TESTING.md exactly as stated, and count what happened.

Each sector names the write that produced it (tests/chaos/sectors.py), so a read maps to
exactly one write and checking needs no search.  Writes are ordered by wall time on one
machine-wide monotonic clock: W precedes X when W completed before X was invoked.  A write
with no reply (the process died) or a failed write may have landed: it is concurrent with
everything after its invocation — unless a fence bounds it: a write of epoch e cannot land
after a fence to an epoch > e completed, so the fence's time is its latest possible landing.

A power cut on every replica at once (``power_cuts``) may take what no FLUSH made stable, as
a disk's volatile cache may: an acknowledged write that no FLUSH invoked after its ack had
completed by the cut becomes a "maybe" (:func:`volatile_at_cuts`).  Everything a completed
FLUSH covered must survive — skipping the fsync is caught there.

A split brain the operator resolved (``discards``) throws away what the losing side's
writers had acknowledged while the sides were apart: those writes become "maybes" too, and
are counted; every other acknowledged write must survive the resolution.

Invariants checked (numbers as in TESTING.md):

1. the final content of each sector is not older than the last acknowledged write to it;
2. a read returns the last acknowledged write before it, or a write concurrent with it, never
   a write invoked after the read completed (future) nor one superseded before it began;
3. no read that succeeded returned a corrupt, torn, misdirected or phantom sector;
4. no write of a fenced epoch is seen landing after its fence; fenced-rejected (ESTALE)
   writes are never seen at all;
5. replica files are identical (divergence bytes), and resync copied no more than was dirty;
6. errors propagate: a read that succeeded never returned zeros where acknowledged data was
   (an error turned into data), and a write rejected as fenced is not applied.
"""

from __future__ import annotations

import errno as errno_mod
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests.chaos.history import Op
from tests.chaos.sectors import SECTOR, Kind, decode

INF = math.inf


@dataclass(frozen=True)
class Fence:
    """A fence completed at ``at``: from then on, writes of epochs below ``epoch`` bounce."""

    at: float
    epoch: int


@dataclass(frozen=True)
class Discard:
    """The writes ``writers`` had acknowledged in ``(start, end]`` went to a split brain's
    losing side, which the operator's resolution overwrote."""

    writers: frozenset[int]
    start: float
    end: float


@dataclass(frozen=True)
class Violation:
    invariant: int
    what: str


@dataclass
class Result:
    ops_ok: int = 0
    ops_failed: int = 0
    ops_unknown: int = 0
    writes_acked: int = 0
    reads_checked: int = 0
    sectors_checked: int = 0
    acked_writes_lost: int = 0
    stale_reads: int = 0
    future_reads: int = 0
    corrupt_returned: int = 0
    fenced_applied: int = 0
    fenced_rejected: int = 0
    zeros_for_data: int = 0
    divergence_bytes: int = 0
    resync_bytes: int | None = None
    dirty_bytes: int | None = None
    #: acknowledged writes no FLUSH had made stable by a power cut on every replica
    volatile_writes: int = 0
    #: acknowledged writes on a split brain's losing side, discarded by its resolution
    discarded_writes: int = 0
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, invariant: int, what: str) -> None:
        if len(self.violations) < 200:  # keep the report readable; counters keep counting
            self.violations.append(Violation(invariant, what))
        else:
            self.violations.append(Violation(invariant, "..."))

    def figures(self) -> dict[str, object]:
        return {
            "operations ok/failed/unknown": f"{self.ops_ok}/{self.ops_failed}/{self.ops_unknown}",
            "writes acknowledged": self.writes_acked,
            "reads checked (sectors)": f"{self.reads_checked} ({self.sectors_checked})",
            "acknowledged writes lost": self.acked_writes_lost,
            "stale reads": self.stale_reads,
            "future reads": self.future_reads,
            "corrupt/torn/misdirected returned": self.corrupt_returned,
            "zeros returned for data": self.zeros_for_data,
            "fenced writes applied": self.fenced_applied,
            "fenced writes rejected": self.fenced_rejected,
            "replica divergence bytes": self.divergence_bytes,
            "resync bytes / dirty bytes": f"{self.resync_bytes} / {self.dirty_bytes}",
            "acked writes unflushed at a power cut of both (may be lost)": self.volatile_writes,
            "acked writes on a split brain's losing side (discarded)": self.discarded_writes,
            "violations": len(self.violations),
        }


class Checker:
    def __init__(self, ops: Sequence[Op], fences: Sequence[Fence] = (), volume: int = 0) -> None:
        self.volume = volume
        self.fences = sorted(fences, key=lambda f: f.at)
        self.result = Result()
        self.writes: dict[tuple[int, int], Op] = {}
        self.by_sector: dict[int, list[Op]] = defaultdict(list)
        self.reads: list[Op] = []
        for op in ops:
            if op.ok is None:
                self.result.ops_unknown += 1
            elif op.ok:
                self.result.ops_ok += 1
            else:
                self.result.ops_failed += 1
            if op.op == "write":
                self.writes[(op.writer, op.seq)] = op
                for s in range(op.first, op.first + op.nsectors):
                    self.by_sector[s].append(op)
                if op.ok:
                    self.result.writes_acked += 1
                if op.errno == errno_mod.ESTALE:
                    self.result.fenced_rejected += 1
            elif op.op == "read" and op.ok:
                self.reads.append(op)

    # -- time bounds -------------------------------------------------------------------------

    def fence_bound(self, w: Op) -> float:
        for f in self.fences:
            if f.epoch > w.epoch and f.at >= w.invoked:
                return f.at
            if f.epoch > w.epoch and f.at < w.invoked:
                return w.invoked  # invoked after its epoch was fenced: it cannot land at all
        return INF

    def landed_by(self, w: Op) -> float:
        """The latest time ``w`` may have taken effect."""
        if w.ok and w.completed is not None:
            return w.completed
        return self.fence_bound(w)

    # -- one sector's value --------------------------------------------------------------------

    def check_value(self, sector: int, seen: object, start: float, end: float, where: str) -> str:
        """Check the value ``seen`` of ``sector`` observed between ``start`` and ``end``;
        return "" or the kind of violation found ("lost", "stale", ...)."""
        r = self.result
        r.sectors_checked += 1
        acked_before = [
            x for x in self.by_sector.get(sector, ()) if x.ok and (x.completed or INF) < start
        ]
        if seen == 0:
            if acked_before:
                x = max(acked_before, key=lambda o: o.completed or 0)
                self.result.zeros_for_data += 1
                return self._bad("zeros", sector, where, f"zeros, acked write {x.writer}:{x.seq}")
            return ""
        if seen == "corrupt" or (isinstance(seen, list) and seen[0] == "misdirected"):
            r.corrupt_returned += 1
            r.add(3, f"{where}: sector {sector} returned {seen}")
            return "corrupt"
        assert isinstance(seen, list)
        w = self.writes.get((seen[0], seen[1]))
        if w is None or w.op != "write" or not w.covers(sector):
            r.corrupt_returned += 1
            r.add(3, f"{where}: sector {sector} names write {seen}, which never covered it")
            return "corrupt"
        if w.errno == errno_mod.ESTALE:
            r.fenced_applied += 1
            r.add(4, f"{where}: sector {sector} holds fenced-rejected write {w.writer}:{w.seq}")
            return "fenced"
        if w.invoked > end:
            r.future_reads += 1
            r.add(2, f"{where}: sector {sector} holds write {w.writer}:{w.seq} from the future")
            return "future"
        landed = self.landed_by(w)
        newer = [x for x in acked_before if x is not w and landed < x.invoked]
        if newer:
            x = newer[0]
            kind = "stale"
            if not w.ok and landed < INF and (w.completed is None or w.completed > landed):
                kind = "fenced"
            return self._bad(kind, sector, where, f"{w.writer}:{w.seq} over {x.writer}:{x.seq}")
        return ""

    def _bad(self, kind: str, sector: int, where: str, what: str) -> str:
        r = self.result
        final = where == "final"
        if kind == "fenced":
            r.fenced_applied += 1
            r.add(4, f"{where}: sector {sector}: a fenced write landed after its fence: {what}")
        elif final:
            r.add(1, f"final: sector {sector}: acknowledged write lost: {what}")
        elif kind == "zeros":
            r.stale_reads += 1
            r.add(6, f"{where}: sector {sector}: read returned {what}")
        else:
            r.stale_reads += 1
            r.add(2, f"{where}: sector {sector}: stale read: {what}")
        return kind

    # -- whole checks --------------------------------------------------------------------------

    def check_reads(self) -> None:
        for rd in self.reads:
            self.result.reads_checked += 1
            assert rd.completed is not None
            where = f"read {rd.writer}:{rd.id}@{rd.offset}"
            for i, seen in enumerate(rd.sectors):
                self.check_value(rd.first + i, seen, rd.invoked, rd.completed, where)

    def check_final(self, image: bytes | memoryview, first_sector: int = 0) -> None:
        """Check the volume's final content: ``image`` holds sectors from ``first_sector``."""
        view = memoryview(image)
        lost: set[tuple[int, int]] = set()
        for i in range(len(view) // SECTOR):
            s = first_sector + i
            d = decode(view[i * SECTOR : (i + 1) * SECTOR], s)
            seen: object
            if d.kind is Kind.NEVER:
                seen = 0
            elif d.kind is Kind.CORRUPT:
                seen = "corrupt"
            else:
                assert d.stamp is not None
                if d.stamp.volume != self.volume or d.kind is Kind.MISDIRECTED:
                    seen = ["misdirected", d.stamp.writer, d.stamp.seq]
                else:
                    w = self.writes.get((d.stamp.writer, d.stamp.seq))
                    seen = [d.stamp.writer, d.stamp.seq]
                    if w is not None and w.epoch != d.stamp.epoch:
                        seen = "corrupt"
            if self.check_value(s, seen, INF, INF, "final") in ("lost", "stale", "zeros"):
                acked = [x for x in self.by_sector.get(s, ()) if x.ok]
                last = max(acked, key=lambda o: o.completed or 0)
                lost.add((last.writer, last.seq))
        self.result.acked_writes_lost += len(lost)

    def check_replicas(
        self, files: Sequence[Path], resync_bytes: int | None = None, dirty_bytes: int | None = None
    ) -> None:
        self.result.resync_bytes, self.result.dirty_bytes = resync_bytes, dirty_bytes
        if len(files) >= 2:
            self.result.divergence_bytes = divergence(files[0], files[1])
            if self.result.divergence_bytes:
                self.result.add(
                    5, f"replicas differ in {self.result.divergence_bytes} bytes after heal"
                )
        if resync_bytes is not None and dirty_bytes is not None and resync_bytes > dirty_bytes:
            self.result.add(5, f"resync copied {resync_bytes} B, only {dirty_bytes} B dirty")


def divergence(a: Path, b: Path, chunk: int = 1 << 20) -> int:
    """Bytes that differ between two files (a length difference counts in full)."""
    diff = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if not ca and not cb:
                return diff
            if ca != cb:
                n = min(len(ca), len(cb))
                diff += sum(1 for i in range(n) if ca[i] != cb[i]) + abs(len(ca) - len(cb))


def _maybes(ops: list[Op], lost: Callable[[Op], bool]) -> tuple[list[Op], int]:
    """``ops`` with every acknowledged write ``lost`` names turned into a "maybe" (no reply),
    and how many; a read ``lost`` names is left out (it saw a history that was thrown away)."""
    out, n = [], 0
    for op in ops:
        if op.completed is not None and op.op in ("write", "read") and op.ok and lost(op):
            if op.op == "read":
                continue
            op = replace(op, ok=None, completed=None)
            n += 1
        out.append(op)
    return out, n


def volatile_at_cuts(ops: list[Op], cuts: Sequence[float]) -> tuple[list[Op], int]:
    """``ops`` with every acknowledged write that no completed FLUSH covered at a power cut
    turned into a "maybe", and how many there were.  A FLUSH covers the writes acknowledged
    before it was sent (dst's FLUSH syncs the whole volume on every replica, so any
    connection's FLUSH counts)."""
    flushes = [op for op in ops if op.op == "flush" and op.ok and op.completed is not None]
    # per cut: the latest invocation of a FLUSH that had completed by then
    covered = [
        max((f.invoked for f in flushes if f.completed is not None and f.completed <= t),
            default=-INF)
        for t in cuts
    ]  # fmt: skip

    def lost(op: Op) -> bool:
        done = op.completed
        assert done is not None
        return op.op == "write" and any(c < done <= t for t, c in zip(cuts, covered, strict=True))

    return _maybes(ops, lost)


def discarded_by_resolution(ops: list[Op], discards: Sequence[Discard]) -> tuple[list[Op], int]:
    """``ops`` with the writes each Discard names turned into "maybes", and how many.  The
    losing side's reads in that time are left out: they saw its own, discarded history."""

    def lost(op: Op) -> bool:
        done = op.completed
        assert done is not None
        return any(op.writer in d.writers and d.start < done <= d.end for d in discards)

    return _maybes(ops, lost)


def check(
    ops: Iterable[Op],
    image: bytes | memoryview | None = None,
    *,
    first_sector: int = 0,
    fences: Sequence[Fence] = (),
    replicas: Sequence[Path] = (),
    resync_bytes: int | None = None,
    dirty_bytes: int | None = None,
    volume: int = 0,
    power_cuts: Sequence[float] = (),
    discards: Sequence[Discard] = (),
) -> Result:
    """Run every check; the result's ``violations`` is empty when all invariants hold."""
    checked, volatile = volatile_at_cuts(list(ops), power_cuts)
    checked, discarded = discarded_by_resolution(checked, discards)
    c = Checker(checked, fences, volume)
    c.result.volatile_writes = volatile
    c.result.discarded_writes = discarded
    c.check_reads()
    if image is not None:
        c.check_final(image, first_sector)
    c.check_replicas(replicas, resync_bytes, dirty_bytes)
    return c.result
