"""Chaos schedules: seeded, bounded plans of faults against a replicated pair.

A schedule says which process it kills and how: SIGKILL at random times drawn from its seed,
or — with ``crash_point`` set — a kill where the code's named crash point says
(``DST_CRASH_AT``, dst/chaos.py), so the kill lands mid-transaction.  It is bounded in time
(``window_s``, the workload's life) and count (``max_faults``).  The runner (runner.py)
carries the faults out; a schedule is only the plan, so the same seed gives the same plan.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: schedule name → the process it kills
TARGETS = {
    "kill-secondary": "secondary",
    "kill-primary-promote": "primary",
    "kill-client": "workload",
    "kill-bridge": "bridge",
    "power-loss-secondary": "secondary",
    "power-loss-primary-promote": "primary",
    # the primary's host lost for good and the secondary's process killed with it (a rack
    # losing power, the secondary's page cache surviving): the secondary restarts, is
    # promoted, and must hold every write the primary acknowledged
    "kill-both-promote": "both",
    # every replica loses power at once: what no FLUSH covered may go, nothing else
    "power-loss-both": "both",
    # the secondary killed, then the primary dies at a crash point in the middle of the
    # resync that brings it back (an extent copied, the pass unfinished), and restarts
    "resync-interrupted": "secondary",
    # seed 002 under load: bridge A frozen (SIGSTOP) with writes in flight, bridge B takes
    # the volume over (--takeover) and writes, A resumed: its late writes must bounce
    "migration": "bridge-takeover",
    # frame faults on the replication link (tests/chaos/proxy.py between primary and
    # secondary): bit flips, duplicated, replayed, delayed and dropped frames both ways,
    # then a silent black hole towards the secondary, then a reset
    "proxy-replication": "link",
    # seed 004: a failfast mirror bridge (dst nbd --mirror) over two plain servers; one
    # leg frozen (SIGSTOP) under load past the failfast deadline, then resumed and resynced
    "mirror-leg-frozen": "leg",
    # the pair cut apart with the primary alive; promote refused, then forced; both sides
    # written; healed: detected, resolved by command, the loser resynced from the survivor
    "split-brain": "split",
    "bad-blocks-primary": "disk",
}
#: which side hits each crash point
CRASH_SIDE = {
    "primary.after-local-write": "primary",
    "primary.after-peer-ack": "primary",
    "secondary.after-write-before-fsync": "secondary",
    "resync.mid": "primary",
    # the primary dies inside bridge B's takeover claim: the new epoch fenced, drained and
    # persisted on both replicas, B not yet told (schedule "migration" only)
    "takeover.mid": "primary",
}


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the workload started
    down_s: float  # how long the killed process stays dead


@dataclass
class Schedule:
    name: str
    seed: int
    window_s: float = 8.0
    max_faults: int = 2
    crash_point: str | None = None
    workloads: int = 2
    faults: list[Fault] = field(default_factory=list)
    crash_hit: int = 1
    #: DST_BROKEN for every server: a deliberately broken build the checker must catch
    broken: str | None = None
    #: bytes at the volume's start the workload writes; power loss wants a wide one, so that
    #: flushed extents outside what was written while the node was down exist (skip-fsync)
    region: int = 2 << 20
    #: a slow disk under the secondary (storage shim): every write there waits this long, so
    #: a primary that acknowledges before its peer is done has a wide window to be caught in
    slow_secondary_s: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in TARGETS:
            raise ValueError(f"schedule {self.name!r}: one of {', '.join(TARGETS)}")
        if self.crash_point is not None and self.crash_point not in CRASH_SIDE:
            raise ValueError(f"crash point {self.crash_point!r}: one of {', '.join(CRASH_SIDE)}")
        if self.crash_point and (self.crash_point == "takeover.mid") != self.migration:
            raise ValueError("crash point takeover.mid goes with schedule migration, only")
        if self.power_loss:
            self.region = 32 << 20
        rng = random.Random(f"{self.name}/{self.seed}")
        n = rng.randint(1, self.max_faults)
        self.crash_hit = rng.randint(30, 400)  # the Nth pass through the crash point dies
        if self.resync_interrupted:
            self.crash_hit = rng.randint(1, 8)  # the Nth extent of the resync (<= 32 dirty)
        if self.migration:
            self.crash_hit = 1  # bridge B's takeover is the first claim that moves the epoch
        # spread the faults over the first 70% of the window, leaving time to heal under load
        # (40% when the heal has two steps: the secondary's restart, then the primary's)
        late = 0.4 if self.resync_interrupted or self.name == "split-brain" else 0.7
        slots = sorted(rng.uniform(0.8, self.window_s * late) for _ in range(n))
        gap = 3.0 if self.name.endswith("-promote") else 1.5
        at = 0.0
        for t in slots:
            at = max(t, at + gap)
            if at < self.window_s - 1.5:
                self.faults.append(Fault(at, rng.uniform(0.2, 1.0)))

    @property
    def power_loss(self) -> bool:
        """The killed server also loses what it had not synced (dst/block/faults.py)."""
        return self.name.startswith("power-loss-")

    @property
    def resync_interrupted(self) -> bool:
        """The primary is armed at ``resync.mid`` and dies in the resync the kill causes."""
        return self.name == "resync-interrupted"

    @property
    def migration(self) -> bool:
        return self.name == "migration"

    @property
    def target(self) -> str:
        """The process the schedule kills (a crash point may name the other side)."""
        if self.crash_point is not None and not self.migration:
            return CRASH_SIDE[self.crash_point]
        return TARGETS[self.name]

    def describe(self) -> str:
        if self.crash_point:
            how, times = f"crash point {self.crash_point}", f"pass {self.crash_hit} through it"
        else:
            how = {
                "disk": "EIO reads, then healed",
                "bridge-takeover": "SIGSTOP bridge A, bridge B takes over, SIGCONT A",
                "link": "replication link frames flipped, duplicated, replayed, delayed, dropped, "
                "then black-holed and reset",
                "leg": "SIGSTOP mirror leg B past the failfast deadline, then SIGCONT",
                "split": "partition, forced promote, both written, heal, resolve",
            }.get(self.target, "SIGKILL at random times")
            times = "planned at " + ", ".join(f"{f.at:.2f}s" for f in self.faults)
        if self.resync_interrupted:
            how += f", then the primary at resync.mid, extent {self.crash_hit}"
        bad = f"; BROKEN BUILD {self.broken}" if self.broken else ""
        return f"{self.name} ({how}; {times}{bad})"


ROTATION = [
    ("kill-secondary", None),
    ("kill-primary-promote", None),
    ("kill-client", None),
    ("kill-secondary", "secondary.after-write-before-fsync"),
    ("kill-primary-promote", "primary.after-local-write"),
    ("kill-primary-promote", "primary.after-peer-ack"),
    ("kill-bridge", None),
    ("power-loss-secondary", None),
    ("power-loss-primary-promote", None),
    ("bad-blocks-primary", None),
    ("kill-both-promote", None),
    ("resync-interrupted", None),
    ("migration", None),
    ("migration", "takeover.mid"),
    ("proxy-replication", None),
    ("mirror-leg-frozen", None),
    ("power-loss-both", None),
    ("split-brain", None),
]
