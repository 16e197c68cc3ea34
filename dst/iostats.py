"""Per-request I/O statistics: counts, bytes, errors and a latency histogram by (volume, op).

The one structure the data path writes to for observability: the server's session handler
and the NBD bridge's request task each call ``begin()`` and ``end(...)`` once per request,
nothing else.  It is plain Python (two dict lookups, a bisect and a few additions per
request); ``dst.metrics`` reads it at scrape time and turns it into Prometheus families.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

#: Upper bounds of the latency buckets, seconds: 50 µs (a cached read on loopback) to 10 s
#: (a write stuck behind a reconnect); +Inf is implied.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


@dataclass(slots=True)
class OpStats:
    """One (volume, op): requests finished, bytes moved, errors, latency histogram."""

    requests: int = 0
    bytes: int = 0
    errors: int = 0
    latency_sum_s: float = 0.0
    #: Non-cumulative counts per bucket of LATENCY_BUCKETS_S, plus a last one for +Inf.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))


class IoStats:
    """The requests a server or bridge ran, by volume and op (``"read"``, ``"write"``...)."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], OpStats] = {}
        self.inflight = 0

    def begin(self) -> float:
        """A request starts; returns its start time for ``end``."""
        self.inflight += 1
        return time.perf_counter()

    def end(self, volume: str, op: str, nbytes: int, started: float, *, ok: bool) -> None:
        """The request begun at ``started`` answered (``ok``: without an error)."""
        elapsed = time.perf_counter() - started
        self.inflight -= 1
        stats = self.ops.get((volume, op))
        if stats is None:
            stats = self.ops[volume, op] = OpStats()
        stats.requests += 1
        if ok:
            stats.bytes += nbytes
        else:
            stats.errors += 1
        stats.latency_sum_s += elapsed
        stats.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, elapsed)] += 1
