"""Generation identifiers: which replica is ahead, and split brain, decided from a few uuids.

This is DRBD's scheme (DRBD User's Guide 8.4, chapter 17 "DRBD Internals", §17.2 "Generation
Identifiers"; the decision order is ``drbd_uuid_compare()`` in ``drbd_receiver.c``, whose rule
numbers the :attr:`Comparison.rule` strings cite).  Pure logic: no I/O, no clock, no trio.  The
caller persists a node's :class:`Generations` in the volume's metadata and exchanges it with the
peer at every connection.

Theory of operation
-------------------

A *data generation* is a stretch of time in which every write reached both replicas.  Each has a
random 64-bit uuid.  A node keeps four of them (the "GI tuple") plus two flags, all persisted:

- ``current`` — the generation of the data on this node's disk;
- ``bitmap`` — the generation the node's dirty bitmap tracks changes *against*: non-zero only
  while the node has acknowledged writes its peer lacks (0 = "not tracking");
- ``history`` — the two generations before;
- ``crashed_primary`` — the node crashed as primary with a non-empty activity log, so writes
  that were in flight may be on one disk and not the other (DRBD's MDF_CRASHED_PRIMARY);
- ``inconsistent`` — the node is, or was interrupted while being, a resync target: its data is
  a mix and it must not be the source of anything or be promoted (DRBD's disk state).

How they change (the caller applies these pure transitions and persists the result):

1. **Degraded write** (§17.2.3.1, "start of a new data generation"): before a primary
   acknowledges the first write its peer has not confirmed, it calls :meth:`degraded_write`:
   ``bitmap = current; current = new uuid`` — unless it is already tracking (``bitmap != 0``),
   in which case the bitmap still tracks against the same base and nothing changes.  DRBD
   rotates when the primary loses its peer; dst rotates at the first write after (as bsr does),
   so a primary that sat idle while apart is not mistaken for a split-brain participant.
2. **Leaving JUST_CREATED**: a new volume starts at :data:`JUST_CREATED` (all zeros on both
   sides, so two new volumes are in sync).  No write may land under JUST_CREATED: before the
   first write while connected and in sync, the primary calls :meth:`new_generation` and the
   peer adopts the result (:meth:`adopt`); a first write while disconnected, or during a
   resync (the target adopts at the end), is a degraded write (rule 1).
3. **Resync start**: the source of a full resync first marks its whole bitmap dirty and
   flushes it, so an interruption resumes from the bitmap.  The target persists
   :meth:`start_resync_as_target` — ``inconsistent``, and the source's ``current`` as its
   own — *before* the first resync block is written into it.  Taking the source's uuid ties
   the half-copied data to the lineage it is being copied from, as DRBD 8.4's "sync uuid"
   does: otherwise a blank disk put in the source's place could pass for an ancestor of it.
4. **Resync finished** (§17.2.3.3): first the source calls :meth:`finish_resync_as_source`
   (``bitmap`` rotates into ``history``, ``crashed_primary`` clears) and persists it; then it
   sends the result and the target :meth:`adopt` s it — the whole tuple — and persists.  This
   order matters: had the target adopted first and the source crashed before clearing its
   bitmap uuid, the source would keep writing under a stale bitmap uuid without rotating, and a
   later promotion of the target could hide those writes.  A crash between the two steps leaves
   the target inconsistent; the next connection finds nothing left to copy and finishes.
5. **Split brain resolved by the operator**: :meth:`Comparison.resolved` names the survivor,
   which persists :meth:`declare_survivor`; the loser becomes the resync target (steps 3 and
   4), losing the writes only it had.

:func:`compare` then reads, at connection time, who has data the other lacks:

- equal ``current``: the same generation; only a side still tracking a bitmap (a resync source
  that has not finished) or a crashed primary (in-flight writes, covered by its activity log)
  has anything to send, and only its bitmap's worth;
- one side's ``current`` is JUST_CREATED (a new disk): a full resync from the other;
- one side's ``bitmap`` equals the other's ``current``: the first moved on from the second's
  generation and tracked every change since — a bitmap-based resync from the first;
- one side's ``current`` is in the other's ``history``: the other moved on more than a bitmap
  can describe — a full resync from the other;
- equal ``bitmap`` s, different ``current`` s: both moved on from one generation — **split
  brain**; never resynced unless the operator names the survivor, and then the union of both
  bitmaps suffices (unless the common base is JUST_CREATED, which every new disk shares: full);
  a common ancestor found only in histories means a full resync;
- nothing in common: unrelated data, never resynced.

An inconsistent side is never a source (see :func:`compare`).  A bitmap-based resync copies the
*union* of both nodes' dirty bitmaps (DRBD §17.4): the source's marks its own writes (and all
extents, for a full resync), the target's the extents of its activity log after a crash.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from dst.errors import ConfigError

__all__ = [
    "EMPTY",
    "JUST_CREATED",
    "UUID_BITS",
    "Comparison",
    "Decision",
    "Generations",
    "compare",
    "new_uuid",
]

#: "No generation": an unused bitmap or history slot.
EMPTY: Final = 0
#: The generation of a volume that was never written (a sparse file of zeros).  Any fixed value
#: other than EMPTY works; DRBD uses 4, and so does dst.
JUST_CREATED: Final = 4
#: Generation uuids are random 64-bit numbers, as DRBD's: collisions are negligible for the
#: handful of generations a volume ever has.
UUID_BITS: Final = 64
_UUID_LIMIT: Final = 1 << UUID_BITS
_RESERVED: Final = frozenset({EMPTY, JUST_CREATED})


def new_uuid(randbits: Callable[[int], int] = secrets.randbits) -> int:
    """A fresh random generation uuid, never EMPTY or JUST_CREATED.

    ``randbits`` is injectable so tests and simulations can be deterministic.
    """
    while True:
        value = randbits(UUID_BITS)
        if value not in _RESERVED:
            return value


class Decision(enum.Enum):
    """What a connection must do, from the local node's point of view."""

    IN_SYNC = "in-sync"
    LOCAL_IS_SOURCE = "local-is-source"
    PEER_IS_SOURCE = "peer-is-source"
    #: Never resynced automatically: both sides wrote while apart (or no side is trustworthy,
    #: see :func:`compare`); the operator names the survivor (:meth:`Comparison.resolved`).
    SPLIT_BRAIN = "split-brain"
    UNRELATED = "unrelated"

    def mirrored(self) -> Decision:
        """The same decision seen from the peer."""
        if self is Decision.LOCAL_IS_SOURCE:
            return Decision.PEER_IS_SOURCE
        if self is Decision.PEER_IS_SOURCE:
            return Decision.LOCAL_IS_SOURCE
        return self


@dataclass(frozen=True, slots=True)
class Comparison:
    """:func:`compare`'s verdict.

    ``full`` says whether the resync must copy the whole volume; when False it copies the union
    of both nodes' dirty bitmaps.  For SPLIT_BRAIN and UNRELATED it says what the resync would
    need once the operator names a survivor.  ``rule`` says why, for logs and ``dst status``.
    """

    decision: Decision
    full: bool
    rule: str

    def mirrored(self) -> Comparison:
        return Comparison(self.decision.mirrored(), self.full, self.rule)

    def resolved(self, *, local_survives: bool) -> Comparison:
        """The operator's choice after SPLIT_BRAIN (or UNRELATED): the survivor is the source.

        The loser's own writes since the split are discarded by the resync that follows.
        """
        if self.decision not in (Decision.SPLIT_BRAIN, Decision.UNRELATED):
            raise ValueError(f"nothing to resolve: decision={self.decision.value}")
        decision = Decision.LOCAL_IS_SOURCE if local_survives else Decision.PEER_IS_SOURCE
        side = "local" if local_survives else "peer"
        return Comparison(decision, self.full, f"{self.rule}; resolved: {side} survives")


@dataclass(frozen=True, slots=True)
class Generations:
    """One node's generation identifiers and flags; immutable, persisted by the caller."""

    current: int
    bitmap: int = EMPTY
    history: tuple[int, int] = (EMPTY, EMPTY)
    crashed_primary: bool = False
    inconsistent: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.history, tuple) or len(self.history) != 2:
            raise ValueError(f"history={self.history!r}: expected a pair of uuids")
        for name, value in (
            ("current", self.current),
            ("bitmap", self.bitmap),
            ("history[0]", self.history[0]),
            ("history[1]", self.history[1]),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: expected an int")
            if not 0 <= value < _UUID_LIMIT:
                raise ValueError(f"{name}={value:#x}: not a {UUID_BITS}-bit uuid")
        if self.current == EMPTY:
            raise ValueError("current=0: a node always has a current generation")

    @classmethod
    def created(cls) -> Generations:
        """A new volume: never written, all zeros, in sync with any other new volume."""
        return cls(JUST_CREATED)

    @property
    def tracking(self) -> bool:
        """True while the dirty bitmap tracks writes the peer lacks (bitmap uuid set)."""
        return self.bitmap != EMPTY

    def degraded_write(self, new: int) -> Generations:
        """Before acknowledging the first write the peer has not confirmed (§17.2.3.1)."""
        if self.inconsistent:
            raise ValueError("an inconsistent node must not accept writes as primary")
        if self.tracking:
            return self
        _check_new(new, self)
        return replace(self, current=new, bitmap=self.current)

    def new_generation(self, new: int) -> Generations:
        """Connected and in sync: start a generation both nodes share (the peer adopts it).

        Used to leave JUST_CREATED before the first connected write.
        """
        if self.tracking or self.inconsistent:
            raise ValueError("a shared generation starts only when both nodes are in sync")
        _check_new(new, self)
        return replace(self, current=new, history=(self.current, self.history[0]))

    def mark_crashed_primary(self) -> Generations:
        """Opened after a crash as primary with a non-empty activity log (persist it first)."""
        return replace(self, crashed_primary=True)

    def start_resync_as_target(self, source: Generations) -> Generations:
        """Persist before the first resync block is written to this node.

        The target takes the source's ``current`` (DRBD 8.4's "sync uuid" plays this part):
        its data now belongs to that lineage, half copied.  Its bitmap uuid and crash flag go —
        their bits stay in its dirty bitmap, which the resync's union covers.
        """
        if source.inconsistent:
            raise ValueError("an inconsistent node is never a resync source")
        return replace(
            self, current=source.current, bitmap=EMPTY, crashed_primary=False, inconsistent=True
        )

    def declare_survivor(self) -> Generations:
        """The operator named this node's data the truth after SPLIT_BRAIN or UNRELATED (DRBD's
        ``primary --force``): it may be the source even if a resync into it was interrupted."""
        return replace(self, inconsistent=False)

    def finish_resync_as_source(self) -> Generations:
        """The source's step when every out-of-sync block reached the target (§17.2.3.3)."""
        if self.inconsistent:
            raise ValueError("an inconsistent node is never a resync source")
        history = (self.bitmap, self.history[0]) if self.tracking else self.history
        return replace(self, bitmap=EMPTY, history=history, crashed_primary=False)

    def adopt(self, source: Generations) -> Generations:
        """The target's step after the source's: take the source's whole tuple (§17.2.3.3)."""
        if source.tracking or source.inconsistent:
            raise ValueError("adopt the source's tuple after finish_resync_as_source()")
        return replace(source, crashed_primary=False, inconsistent=False)

    def to_json(self) -> dict[str, object]:
        """For the volume's metadata file: uuids as hex strings (JSON readers lose 64-bit ints)."""
        return {
            "current": f"{self.current:#018x}",
            "bitmap": f"{self.bitmap:#018x}",
            "history": [f"{h:#018x}" for h in self.history],
            "crashed_primary": self.crashed_primary,
            "inconsistent": self.inconsistent,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> Generations:
        """The inverse of :meth:`to_json`; ConfigError names what is wrong."""
        try:
            history = raw["history"]
            if not isinstance(history, list) or len(history) != 2:
                raise ValueError(f"history={history!r}: expected two uuids")
            flags = {k: raw.get(k, False) for k in ("crashed_primary", "inconsistent")}
            for key, flag in flags.items():
                if not isinstance(flag, bool):
                    raise ValueError(f"{key}={flag!r}: expected true or false")
            return cls(
                current=_parse_uuid("current", raw["current"]),
                bitmap=_parse_uuid("bitmap", raw["bitmap"]),
                history=(
                    _parse_uuid("history[0]", history[0]),
                    _parse_uuid("history[1]", history[1]),
                ),
                crashed_primary=bool(flags["crashed_primary"]),
                inconsistent=bool(flags["inconsistent"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"generation identifiers: {exc}") from exc


def _parse_uuid(name: str, value: object) -> int:
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r}: expected a hex string")
    return int(value, 16)


def _check_new(new: int, gens: Generations) -> None:
    if new in _RESERVED or not 0 < new < _UUID_LIMIT:
        raise ValueError(f"new uuid {new:#x} is reserved or out of range")
    if new in (gens.current, gens.bitmap, *gens.history):
        raise ValueError(f"new uuid {new:#x} is already one of this node's generations")


def compare(local: Generations, peer: Generations) -> Comparison:
    """Who must resync from whom, from both nodes' identifiers (``drbd_uuid_compare``).

    Symmetric: ``compare(b, a)`` is ``compare(a, b).mirrored()``.  An inconsistent node (an
    interrupted resync target) is never a source: it is resynced again from its peer when the
    uuids show that peer is its source or the source's heir, and otherwise — a blank or other
    disk in the source's place — the verdict is SPLIT_BRAIN (or UNRELATED): the operator
    decides, as after DRBD's ``drbd_sync_handshake`` finds no UpToDate side.
    """
    base = _compare_uuids(local, peer)
    if not (local.inconsistent or peer.inconsistent) or base.decision is Decision.UNRELATED:
        return base
    if local.inconsistent and peer.inconsistent:
        return Comparison(Decision.SPLIT_BRAIN, True, "both inconsistent: no side to trust")
    decision = Decision.PEER_IS_SOURCE if local.inconsistent else Decision.LOCAL_IS_SOURCE
    side = "local" if local.inconsistent else "peer"
    consistent = peer if local.inconsistent else local
    if base.decision in (decision, Decision.IN_SYNC) and consistent.current != JUST_CREATED:
        # The interrupted resync's own source, or its heir (it rotated, finished, crashed):
        # resume from the union of the bitmaps, where every block still to copy is marked.
        return Comparison(decision, base.full, f"{side} is inconsistent (was: {base.rule})")
    # The consistent side is blank, behind the half-copied one, or split from it: some other
    # disk stands where the source was, and no side holds a trustworthy copy.  (DRBD never
    # meets this: its new disks are Inconsistent; dst's new volumes are consistent zeros.)
    behind = "the peer is" if local.inconsistent else "we are"
    rule = f"{side} is inconsistent and {behind} not its source"
    return Comparison(Decision.SPLIT_BRAIN, True, rule)


def _compare_uuids(local: Generations, peer: Generations) -> Comparison:
    if local.current == peer.current:
        return _same_generation(local, peer)
    if local.current == JUST_CREATED:
        return Comparison(Decision.PEER_IS_SOURCE, True, "local never written (rule 20)")
    if peer.current == JUST_CREATED:
        return Comparison(Decision.LOCAL_IS_SOURCE, True, "peer never written (rule 30)")

    # Evidence that the peer moved on from our generation (rules 50, 60), and the mirror
    # (rules 70, 80).  Both at once is a cycle that random uuids cannot produce; refuse it.
    peer_tracks_ours = peer.tracking and local.current == peer.bitmap
    peer_had_ours = local.current in _nonempty(peer.history)
    local_tracks_peers = local.tracking and peer.current == local.bitmap
    local_had_peers = peer.current in _nonempty(local.history)
    peer_ahead = peer_tracks_ours or peer_had_ours
    local_ahead = local_tracks_peers or local_had_peers
    if peer_ahead and local_ahead:
        return Comparison(Decision.SPLIT_BRAIN, True, "each side descends from the other")
    peer_src, local_src = Decision.PEER_IS_SOURCE, Decision.LOCAL_IS_SOURCE
    if peer_tracks_ours:
        return Comparison(peer_src, False, "peer's bitmap tracks our generation (rule 50)")
    if peer_had_ours:
        return Comparison(peer_src, True, "our generation is in peer's history (rule 60)")
    if local_tracks_peers:
        return Comparison(local_src, False, "our bitmap tracks peer's generation (rule 70)")
    if local_had_peers:
        return Comparison(local_src, True, "peer's generation is in our history (rule 80)")

    if local.tracking and local.bitmap == peer.bitmap:
        # Both bitmaps track one base — unless that base is JUST_CREATED, which every new disk
        # shares: a bitmap cleared by a resync into some other disk would then miss blocks.
        full = local.bitmap == JUST_CREATED
        return Comparison(Decision.SPLIT_BRAIN, full, "both wrote since one generation (rule 90)")
    ours = _nonempty((local.bitmap, *local.history))
    theirs = _nonempty((peer.bitmap, *peer.history))
    if ours & theirs:
        return Comparison(Decision.SPLIT_BRAIN, True, "common ancestor in history only (rule 100)")
    return Comparison(Decision.UNRELATED, True, "no common generation (rule 1000)")


def _same_generation(local: Generations, peer: Generations) -> Comparison:
    # Same data generation: only a side still tracking a bitmap (a resync source that did not
    # finish, rules 34-37) or a crashed primary (rule 40) can hold blocks the other lacks.
    if local.tracking and peer.tracking:
        return Comparison(Decision.SPLIT_BRAIN, True, "both track a bitmap on one generation")
    if local.tracking:
        return Comparison(Decision.LOCAL_IS_SOURCE, False, "local still tracks (rule 34)")
    if peer.tracking:
        return Comparison(Decision.PEER_IS_SOURCE, False, "peer still tracks (rule 35)")
    if local.crashed_primary and peer.crashed_primary:
        return Comparison(Decision.SPLIT_BRAIN, False, "both crashed as primary (rule 40)")
    if local.crashed_primary:
        return Comparison(Decision.LOCAL_IS_SOURCE, False, "local crashed as primary (rule 40)")
    if peer.crashed_primary:
        return Comparison(Decision.PEER_IS_SOURCE, False, "peer crashed as primary (rule 40)")
    return Comparison(Decision.IN_SYNC, False, "same generation (rule 40)")


def _nonempty(uuids: tuple[int, ...]) -> frozenset[int]:
    return frozenset(uuids) - {EMPTY}
