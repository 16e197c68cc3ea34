"""Generation identifiers at work: the connection handshake between the two servers of a pair.

``generations.py`` decides (pure logic); this module keeps a volume's identifiers on disk and
runs the exchange.  Every time the primary's replication link connects, before the link takes
a single write, the primary asks the secondary for its state (``SyncRequest("query")``):

```
 primary                                             secondary
   query(own generations) ───────────────────────▶   answers: generations, dirty extents
   compare(own, peer)
     in sync, new volume    ── adopt(new gen) ────▶  persists the shared generation
     we are the source      ── target(own) ───────▶  persists "inconsistent, of our lineage"
       (union of both bitmaps resynced, then)
       finish_resync_as_source, persist
                            ── adopt(own) ────────▶  persists our tuple, clears its bitmap
     split brain, peer newer ✗ refuse the link (retried every second; `dst status` says why)
```

Split brain is never resolved silently: ``dst resolve --server SURVIVOR`` marks the primary the
survivor, and its next handshake makes it the source — the loser's writes since the split are
overwritten by the resync.  The union of both dirty bitmaps is copied (DRBD §17.4), or the
whole volume when the identifiers cannot bound the difference.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from dst.errors import BlockError, ConfigError
from dst.replication.bitmap import DirtyBitmap
from dst.replication.generations import (
    JUST_CREATED,
    Comparison,
    Decision,
    Generations,
    compare,
    new_uuid,
)

log = logging.getLogger("dst.replication")

#: Dirty runs a secondary lists in its answer; past this it says "all" and the primary
#: resyncs everything (keeps the answer far below the meta cap).
MAX_DIRTY_RUNS = 1024


class ReplicaState:
    """A replicated volume's generation identifiers (persisted by ``persist``) and what the
    last handshake decided, shared by the volume's server-side objects."""

    def __init__(
        self,
        generations: Generations,
        persist: Callable[[Generations], None],
        bitmap: DirtyBitmap,
    ) -> None:
        self.generations = generations
        self._persist = persist
        self.bitmap = bitmap
        #: The operator named this node the survivor of a split brain (``dst resolve``).
        self.survivor = False
        #: The peer was made a resync target and waits for our tuple.
        self.peer_needs_adopt = False
        #: What the last handshake found, for ``dst status`` and logs.
        self.verdict = "not connected yet"
        self.split_brain = False
        self._lock = trio.Lock()
        self._finishing = False
        self.current_epoch: Callable[[], int] = lambda: 0
        self._advance_epoch: Callable[[int], Awaitable[int]] | None = None

    def epoch_hooks(
        self, current: Callable[[], int], advance: Callable[[int], Awaitable[int]]
    ) -> None:
        """The volume's fence: both servers of a pair keep the highest epoch either saw."""
        self.current_epoch, self._advance_epoch = current, advance

    async def learn_epoch(self, given: Mapping[str, Any]) -> None:
        epoch = given.get("epoch")
        if isinstance(epoch, int) and epoch > self.current_epoch() and self._advance_epoch:
            await self._advance_epoch(epoch)

    async def update(self, new: Generations) -> None:
        """Persist ``new`` (atomically, fsync'ed) and then make it current."""
        if new != self.generations:
            await trio.to_thread.run_sync(self._persist, new)
            self.generations = new

    async def before_degraded_ack(self) -> None:
        """Before acknowledging a write the peer lacks: a new data generation, on disk."""
        if self.generations.tracking and not self._finishing:
            return
        async with self._lock:
            if not self.generations.tracking:
                await self.update(self.generations.degraded_write(new_uuid()))

    async def finish_as_source(self) -> bool:
        """Every out-of-sync block reached the peer: rotate the bitmap uuid into history.
        False if a write degraded meanwhile (the bitmap is dirty again)."""
        async with self._lock:
            if self.bitmap.dirty_bytes:
                return False
            self._finishing = True  # a degrading write now waits for the lock, then rotates
            try:
                await self.update(self.generations.finish_resync_as_source())
            finally:
                self._finishing = False
        return True

    @property
    def needs_finish(self) -> bool:
        g = self.generations
        return g.tracking or g.crashed_primary or self.peer_needs_adopt

    def describe_all(self) -> dict[str, Any]:
        return {"generations": self.generations.to_json(), "dirty": (), "dirty_all": True}

    def describe(self) -> dict[str, Any]:
        """This node's side of the exchange (a SyncRequest's answer, and ``dst status``)."""
        runs: list[tuple[int, int]] = []
        for offset, length in self.bitmap.dirty_extents():
            if len(runs) == MAX_DIRTY_RUNS:
                return {**self.describe_all(), "epoch": self.current_epoch()}
            runs.append((offset, length))
        return {
            "generations": self.generations.to_json(),
            "dirty": tuple(runs),
            "dirty_all": False,
            "epoch": self.current_epoch(),
        }


async def answer(state: ReplicaState, action: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The secondary's side of a SyncRequest from its primary (``query``, ``target``,
    ``adopt``, ``epoch``); BlockError(EINVAL) names a bad field."""
    await state.learn_epoch(given)
    if action in ("target", "adopt"):
        source = _generations(given)
        try:
            if action == "target":
                new = state.generations.start_resync_as_target(source)
            else:
                new = state.generations.adopt(source)
        except ValueError as exc:
            raise BlockError(errno.EINVAL, f"sync {action}: {exc}") from exc
        await state.update(new)
        if action == "adopt" and state.bitmap.dirty_bytes:
            # Its dirty extents were in the union the primary resynced: all copied now.
            state.bitmap.clear(0, state.bitmap.volume_size)
            await trio.to_thread.run_sync(state.bitmap.flush)
        log.info("event=sync_%s generations=%s", action, _short(state.generations))
    return state.describe()


def _generations(given: Mapping[str, Any]) -> Generations:
    raw = given.get("generations")
    if not isinstance(raw, Mapping):
        raise BlockError(errno.EINVAL, f"sync state: generations={raw!r}: expected a map")
    try:
        return Generations.from_json({k: list(v) if k == "history" else v for k, v in raw.items()})
    except (ConfigError, TypeError) as exc:
        raise BlockError(errno.EINVAL, f"sync state: {exc}") from exc


def _short(g: Generations) -> str:
    flags = "".join(("C" if g.crashed_primary else "", "I" if g.inconsistent else ""))
    uuids = f"{g.current:x}/{g.bitmap:x}/{g.history[0]:x}/{g.history[1]:x}"
    return f"{uuids}:{flags}" if flags else uuids


Call = Callable[[str, Mapping[str, Any]], Awaitable[Mapping[str, Any]]]


async def connect_handshake(state: ReplicaState, call: Call) -> None:
    """The primary's side, run on every new replication link before it takes writes.
    Raises BlockError to refuse the link (split brain, a newer peer)."""
    local = state.generations
    asked = {"generations": local.to_json(), "epoch": state.current_epoch()}
    peer_answer = await call("query", asked)
    await state.learn_epoch(peer_answer)  # a takeover the peer saw while we were apart
    peer = _generations(peer_answer)
    verdict = compare(local, peer)
    verdict = _resolve(state, local, peer, verdict)
    if verdict.decision not in (Decision.LOCAL_IS_SOURCE, Decision.IN_SYNC):
        _refuse(state, verdict)
    if state.survivor:
        state.survivor = False
        await state.update(state.generations.declare_survivor())
    bitmap = state.bitmap
    if verdict.full or peer_answer.get("dirty_all") is True:
        bitmap.mark_all()
    for offset, length in _runs(peer_answer.get("dirty")):
        bitmap.mark(offset, min(length, bitmap.volume_size - offset))
    await trio.to_thread.run_sync(bitmap.flush)
    resync = bitmap.dirty_bytes > 0 or verdict.decision is Decision.LOCAL_IS_SOURCE
    if state.generations.current == JUST_CREATED:
        # No write lands under JUST_CREATED (a new volume): start a generation both share.
        await state.update(state.generations.new_generation(new_uuid()))
        if not resync:
            await call("adopt", {"generations": state.generations.to_json()})
    if resync or peer.inconsistent:
        await call("target", {"generations": state.generations.to_json()})
        state.peer_needs_adopt = True
    was_split = state.split_brain
    state.split_brain = False
    state.verdict = f"{verdict.decision.value} ({verdict.rule})"
    level = logging.WARNING if was_split or resync else logging.INFO
    log.log(
        level,
        "event=peer_handshake decision=%s rule=%r full=%s out_of_sync=%d",
        verdict.decision.value,
        verdict.rule,
        verdict.full,
        bitmap.dirty_bytes,
    )


def _resolve(
    state: ReplicaState, local: Generations, peer: Generations, verdict: Comparison
) -> Comparison:
    """Turn what a primary can act on into LOCAL_IS_SOURCE: the operator's choice, and a peer
    whose only difference is having crashed as primary (its unacknowledged in-flight writes,
    which its activity log put in its bitmap: either side's bytes are fine, ours are kept)."""
    d = verdict.decision
    if d is Decision.PEER_IS_SOURCE and not verdict.full and local.current == peer.current:
        if not peer.tracking and not peer.inconsistent:
            return Comparison(Decision.LOCAL_IS_SOURCE, False, verdict.rule + "; we are primary")
    if state.survivor and d in (Decision.SPLIT_BRAIN, Decision.UNRELATED):
        return verdict.resolved(local_survives=True)
    if state.survivor and d is Decision.PEER_IS_SOURCE:
        return Comparison(Decision.LOCAL_IS_SOURCE, verdict.full, verdict.rule + "; resolved")
    return verdict


def _refuse(state: ReplicaState, verdict: Comparison) -> None:
    why = {
        Decision.SPLIT_BRAIN: "split brain: both sides wrote while apart",
        Decision.UNRELATED: "the peer's data is unrelated to ours",
        Decision.PEER_IS_SOURCE: "the peer has data we lack (it was primary after us)",
    }[verdict.decision]
    text = f"{why} ({verdict.rule}); run `dst resolve` on the survivor"
    if not state.split_brain or state.verdict != text:
        log.error("event=split_brain decision=%s rule=%r", verdict.decision.value, verdict.rule)
    state.split_brain = True
    state.verdict = text
    raise BlockError(errno.EBUSY, text)


def _runs(raw: object) -> list[tuple[int, int]]:
    if not isinstance(raw, tuple | list):
        raise BlockError(errno.EINVAL, f"sync state: dirty={raw!r}: expected a list")
    runs: list[tuple[int, int]] = []
    for item in raw:
        if (
            not isinstance(item, tuple | list)
            or len(item) != 2
            or not all(isinstance(v, int) and v >= 0 for v in item)
        ):
            text = f"sync state: dirty run {item!r}: expected [offset, length]"
            raise BlockError(errno.EINVAL, text)
        runs.append((int(item[0]), int(item[1])))
    return runs
