"""Leg states of a failfast mirror, and the rules that move them (no I/O, no clock).

Theory of operation (seed 004: Solaris Volume Manager's B_FAILFAST, as rewritten to "trust the
error"):

- Every leg is IN_SYNC (holds every acknowledged write; may serve reads), ERRED (dropped: gets
  no I/O, its dirty bitmap records what it misses) or RESYNCING (back, being brought up to date
  from an IN_SYNC leg: gets every write, no reads, is never anybody's last good copy).
- I/O to a leg carries FAILFAST whenever losing that leg would leave another IN_SYNC leg: a
  RESYNCING leg always, an IN_SYNC leg while it is not the only one.
- A FAILFAST failure drops the leg at once (:meth:`LegTable.on_error` answers DROP) —
  no second opinion, no held queues; a "spurious" error costs a resync, nothing more.
- LAST_ERRED: when the failing leg is the only IN_SYNC one left, it is never dropped by
  failfast: the answer is RESUBMIT, and the I/O goes again without the flag, with the
  transport's full retries and timeouts, as does all later I/O to it.  An error *without* the
  flag is the real thing and goes to the user (KEEP: the leg stays, it is all there is).
- When another leg finishes its resync, there are two IN_SYNC legs again and failfast returns.
- Reads go round-robin over IN_SYNC legs; a leg that fails a read is dropped like any other.

This module is the rulebook only; :mod:`dst.mirror.layer` does the I/O and the bookkeeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["LegState", "LegTable", "Verdict"]


class LegState(enum.Enum):
    IN_SYNC = "in_sync"
    ERRED = "erred"
    RESYNCING = "resyncing"


class Verdict(enum.Enum):
    """What to do with a leg whose I/O failed."""

    DROP = "drop"  # failfast: the leg is erred now; complete the I/O on the others
    RESUBMIT = "resubmit"  # LAST_ERRED: send it again without FAILFAST
    KEEP = "keep"  # a failure without FAILFAST: the error is real; the leg stays


@dataclass(slots=True)
class LegTable:
    """The state of every leg, by index."""

    states: list[LegState]
    _next_read: int = 0

    @classmethod
    def start(cls, usable: list[bool]) -> LegTable:
        """At start, a leg is IN_SYNC if it is reachable and its bitmap is clean; every other
        leg is ERRED and comes back through a resync.  With no usable leg the mirror cannot
        serve (reading a leg that misses writes would return stale data): ValueError."""
        if not any(usable):
            raise ValueError("no leg is both reachable and in sync")
        return cls([LegState.IN_SYNC if u else LegState.ERRED for u in usable])

    def in_sync(self) -> list[int]:
        return [i for i, s in enumerate(self.states) if s is LegState.IN_SYNC]

    def writable(self) -> list[int]:
        """Legs a write goes to: IN_SYNC and RESYNCING."""
        return [i for i, s in enumerate(self.states) if s is not LegState.ERRED]

    def use_failfast(self, leg: int) -> bool:
        if self.states[leg] is LegState.IN_SYNC:
            return len(self.in_sync()) > 1
        return True

    def on_error(self, leg: int, failfast: bool) -> Verdict:
        """A request to ``leg`` failed; ``failfast``: it carried the flag."""
        state = self.states[leg]
        if state is LegState.ERRED:
            return Verdict.DROP  # dropped already by an earlier failure
        if state is LegState.RESYNCING or len(self.in_sync()) > 1:
            # Trust the error: another leg holds the data (with or without the flag — a leg
            # may have come back in sync while this request was out without it).
            self.states[leg] = LegState.ERRED
            return Verdict.DROP
        return Verdict.RESUBMIT if failfast else Verdict.KEEP

    def read_leg(self) -> int:
        """The next IN_SYNC leg, round-robin (there is always one)."""
        legs = self.in_sync()
        self._next_read = (self._next_read + 1) % len(legs)
        return legs[self._next_read]

    def start_resync(self, leg: int) -> None:
        if self.states[leg] is not LegState.ERRED:
            raise ValueError(f"leg {leg} is {self.states[leg].value}, not erred")
        self.states[leg] = LegState.RESYNCING

    def finish_resync(self, leg: int) -> bool:
        """The resync of ``leg`` completed; False if the leg erred meanwhile."""
        if self.states[leg] is not LegState.RESYNCING:
            return False
        self.states[leg] = LegState.IN_SYNC
        return True
