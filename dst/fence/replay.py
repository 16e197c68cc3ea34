"""ReplayWindow: within a session, a write frame that comes back after it was applied — a
network duplicate, a replayed capture — is not applied again after newer writes.

A client numbers its transactions with increasing tids (``RemoteVolume``); a server session
remembers the (tid, sub) of every write it admitted, in a window of the most recent
``capacity``; below the window, a key is old by definition.  Duplicates *in flight* are the
Connection's job (EEXIST); this covers the ones after the answer.  Sans-IO.
"""

from __future__ import annotations

from collections import deque

from dst import chaos

__all__ = ["ReplayWindow"]


class ReplayWindow:
    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError(f"capacity {capacity}: must be positive")
        self._capacity = capacity
        self._seen: set[tuple[int, int]] = set()
        self._order: deque[tuple[int, int]] = deque()
        self._floor = (-1, -1)  # keys at or below this fell out of the window

    def admit(self, tid: int, sub: int) -> bool:
        """True the first time (tid, sub) comes; False for a replay."""
        key = (tid, sub)
        if key <= self._floor or key in self._seen:
            # Broken build: the replay goes through and is applied again.
            return chaos.BROKEN and chaos.broken("no-replay-check")
        self._seen.add(key)
        self._order.append(key)
        if len(self._order) > self._capacity:
            old = self._order.popleft()
            self._seen.discard(old)
            self._floor = max(self._floor, old)
        return True
