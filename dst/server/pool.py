"""PagePool: the server's bounded memory for request data.

Every byte a server holds for a request lives in a page of this pool, in the server's own page
size (seed 003: the client's pages may be larger or smaller; the server lays the data onto its
own).  The pool is one arena allocated at start-up and never grows: when it is empty, the
connection reader that wants pages waits, stops reading its socket, and TCP pushes back on the
client.  Waiters are served first-come first-served so a large request cannot starve behind a
stream of small ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import trio

from dst.errors import ConfigError


@dataclass(eq=False, slots=True)
class Pages:
    """Pages lent for one request; ``views`` covers exactly the requested bytes."""

    pool: PagePool
    indexes: list[int]
    views: list[memoryview]
    _released: bool = field(default=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._give_back(self.indexes)


@dataclass(eq=False, slots=True)
class _Waiter:
    need: int
    event: trio.Event = field(default_factory=trio.Event)
    indexes: list[int] | None = None


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    page_size: int
    pages_total: int
    pages_free: int
    waiters: int


class PagePool:
    def __init__(self, page_size: int, total_bytes: int) -> None:
        if page_size < 512 or page_size & (page_size - 1):
            raise ConfigError(f"page size {page_size}: must be a power of two >= 512")
        count = total_bytes // page_size
        if count < 1:
            raise ConfigError(f"page pool of {total_bytes} bytes holds no {page_size}-byte page")
        self.page_size = page_size
        self.capacity_bytes = count * page_size
        self._arena = memoryview(bytearray(self.capacity_bytes))
        self._free: list[int] = list(range(count - 1, -1, -1))
        self._waiters: deque[_Waiter] = deque()

    def pages_for(self, nbytes: int) -> int:
        return -(-nbytes // self.page_size)

    def acquire_nowait(self, nbytes: int) -> Pages | None:
        """Pages covering ``nbytes`` if the pool has them now and nobody waits ahead, else
        None: the session's read loop takes pages without a trip through the scheduler."""
        need = self.pages_for(nbytes)
        if not self._waiters and need <= len(self._free):
            return self._views(self._pop(need), nbytes)
        return None

    async def acquire(self, nbytes: int) -> Pages:
        """Pages covering ``nbytes``; waits (FIFO) while the pool is short."""
        need = self.pages_for(nbytes)
        if need > self.capacity_bytes // self.page_size:
            raise ConfigError(f"request of {nbytes} bytes exceeds the page pool")
        if not self._waiters and len(self._free) >= need:
            await trio.lowlevel.checkpoint()
            return self._views(self._pop(need), nbytes)
        waiter = _Waiter(need)
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.indexes is None:
                self._waiters.remove(waiter)
            else:  # granted and cancelled in the same breath: hand the pages back
                self._give_back(waiter.indexes)
            raise
        assert waiter.indexes is not None
        return self._views(waiter.indexes, nbytes)

    def _pop(self, need: int) -> list[int]:
        return [self._free.pop() for _ in range(need)]

    def _views(self, indexes: list[int], nbytes: int) -> Pages:
        """Views over the pages, with runs of adjacent pages merged into one view: the
        request still lies on the server's own pages, but a 1 MiB write on a quiet pool is
        one iovec instead of 256."""
        views: list[memoryview] = []
        if not indexes:
            return Pages(self, indexes, views)
        size = self.page_size
        run_start = prev = indexes[0]
        for i in [*indexes[1:], -1]:
            if i == prev + 1:
                prev = i
                continue
            take = min((prev - run_start + 1) * size, nbytes)
            views.append(self._arena[run_start * size : run_start * size + take])
            nbytes -= take
            run_start = prev = i
        return Pages(self, indexes, views)

    def _give_back(self, indexes: list[int]) -> None:
        # Reversed, so the next pops hand the same ascending run out again.
        self._free.extend(reversed(indexes))
        # Grant waiters in order while the head of the queue can be satisfied; pages are
        # handed over here, so nobody arriving later can take them first.
        while self._waiters and self._waiters[0].need <= len(self._free):
            waiter = self._waiters.popleft()
            waiter.indexes = self._pop(waiter.need)
            waiter.event.set()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            self.page_size,
            self.capacity_bytes // self.page_size,
            len(self._free),
            len(self._waiters),
        )
