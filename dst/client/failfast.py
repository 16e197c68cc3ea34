"""FAILFAST bookkeeping of a RemoteVolume: the tripwire, and orphans.

:class:`Tripwire` watches every FAILFAST transaction in flight on a volume, with its deadline:
:meth:`Tripwire.watch` queues it, and :meth:`Tripwire.watch_deadlines` — one task per volume —
trips the volume when the oldest one still unanswered reaches it.  (The timeout is the
volume's, so deadlines come in the order bios started: a queue, not a heap.)  A FAILFAST bio
that must wait while it is being sent — for a slot, or for the socket — does so in a cancel
scope with the same deadline (:meth:`Tripwire.arm`).  The first FAILFAST failure *trips* the
volume: every armed scope is cancelled and every watched transaction failed back at once, all
with the first one's error, and :attr:`error` stays set — new FAILFAST bios fail at once —
until the volume hears from its server again.  ``submit`` and ``start`` share this: no task
waits in a scope per bio.

When a FAILFAST bio expires or its volume trips (:mod:`dst.client.remote`), the caller hears
of the failure at once, but the commands already sent are still the server's: it may yet run
them — a frozen server that resumes runs every write in its socket buffer.  Such commands are
*orphans*.  They keep their in-flight slot until the server answers them, so the client never
has more than ``max_inflight`` requests outstanding on the wire; their answers are discarded.

A mirror must not copy an extent to a leg while a stale write of an orphan could still land
on it after the copy (the copy would be silently undone).  :meth:`Orphans.wait_settled` says
when that cannot happen: every orphan answered — the server replies after it ran a request —
and, if a link died with orphans on it (their fate unknowable), ORPHAN_SETTLE_S more.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from dst.client.commands import RemoteStatistics, Transaction
from dst.errors import BlockError

__all__ = ["ORPHAN_SETTLE_S", "Orphans", "Tripwire"]

log = logging.getLogger("dst.client")

#: After a link died with orphans on it, the server may still be finishing them (a write it
#: had read before the link broke): wait this long before calling the volume settled.
ORPHAN_SETTLE_S = 1.0


class Orphans:
    """The (tid, sub) keys of the orphans on the current link."""

    def __init__(self) -> None:
        self._keys: set[tuple[int, int]] = set()
        self._died_at = -float("inf")

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: tuple[int, int]) -> None:
        self._keys.add(key)

    def answered(self, key: tuple[int, int]) -> bool:
        """A reply arrived for ``key``; True if it was an orphan's (its slot is free now)."""
        if key in self._keys:
            self._keys.discard(key)
            return True
        return False

    def link_died(self) -> int:
        """The link died: forget its orphans; returns how many slots to give back."""
        count = len(self._keys)
        if count:
            self._keys.clear()
            self._died_at = trio.current_time()
        return count

    async def wait_settled(self) -> None:
        while self._keys:
            await trio.sleep(0.05)
        await trio.sleep_until(self._died_at + ORPHAN_SETTLE_S)


class Tripwire:
    """The FAILFAST transactions in flight on one volume and their deadlines; see the
    docstring."""

    def __init__(
        self,
        where: str,
        stats: RemoteStatistics,
        abandon: Callable[[Transaction, BlockError], None],
        expired: Callable[[], BlockError],
    ) -> None:
        self.where = where  # "volume=... server=..." for the log line
        self.stats = stats
        self.error: BlockError | None = None
        self._scopes: set[trio.CancelScope] = set()
        #: Started FAILFAST transactions and their deadlines, oldest first; ``abandon`` fails
        #: one back (its commands become orphans), ``expired`` is the error of a deadline.
        self._watched: deque[tuple[float, Transaction]] = deque()
        self._abandon, self._expired = abandon, expired
        self._watch_wake = trio.Event()

    def arm(self, deadline: float) -> trio.CancelScope:
        """A scope with the bio's deadline, cancelled by a trip; the caller enters it and
        disarms it when the bio is over."""
        scope = trio.CancelScope(deadline=deadline)
        self._scopes.add(scope)
        return scope

    def disarm(self, scope: trio.CancelScope) -> None:
        self._scopes.discard(scope)

    def watch(self, txn: Transaction, deadline: float) -> None:
        """A started FAILFAST transaction: failed back by a trip, or by one at ``deadline``
        if unanswered then; at once if the volume tripped while it was being sent."""
        if self.error is not None:
            self._abandon(txn, self.error)
            return
        watched = self._watched
        while watched and watched[0][1].done:
            watched.popleft()
        watched.append((deadline, txn))
        if len(watched) == 1:
            self._watch_wake.set()

    async def watch_deadlines(self) -> None:
        """Forever: trip when the oldest watched transaction is unanswered at its deadline."""
        while True:
            watched = self._watched
            while watched and watched[0][1].done:
                watched.popleft()
            if not watched:
                self._watch_wake = trio.Event()
                await self._watch_wake.wait()
            elif trio.current_time() < watched[0][0]:
                await trio.sleep_until(watched[0][0])
            else:
                self.trip(self._expired())

    def trip(self, error: BlockError) -> BlockError:
        """The first FAILFAST failure: fail every armed and watched bio at once.  Returns the
        error every one of them (and every later FAILFAST bio, until reset) fails with."""
        if self.error is not None:
            return self.error
        self.error = BlockError(error.errno, f"failfast: {error.args[0] if error.args else ''}")
        self.stats.failfast_trips += 1
        for scope in self._scopes:
            scope.cancel()
        watched, self._watched = self._watched, deque()
        failed_back = len(self._scopes)
        for _, txn in watched:  # their callbacks run here
            if not txn.done:
                self._abandon(txn, self.error)
                failed_back += 1
        log.warning(
            "%s event=failfast_tripped failed_back=%d reason=%r",
            self.where,
            failed_back,
            str(self.error),
        )
        return self.error
