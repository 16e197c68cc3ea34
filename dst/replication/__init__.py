"""dst.replication: the pieces of DRBD-like replication that keep two replicas honest.

- :mod:`dst.replication.bitmap` — :class:`DirtyBitmap`, the persistent out-of-sync bitmap
  (``NAME.bitmap``): which extents the peer lacks, so a returning peer gets only those;
- :mod:`dst.replication.activity_log` — :class:`ActivityLog` (``NAME.al``): the bounded set of
  extents a primary may be writing, so a primary crash costs a resync of those alone;
- :mod:`dst.replication.generations` — :class:`Generations` and :func:`compare`, DRBD's
  generation identifiers: who is ahead, whether a bitmap suffices, and split brain.

The replicated block layer that drives them is built on top; the ordering rules it must keep
(flush the bitmap before acknowledging a write only the local disk has, commit the activity
log before issuing a write, persist a generation change before acknowledging the write that
caused it) are stated in each module.
"""

from __future__ import annotations

from dst.replication.activity_log import (
    ActivityLog,
    ActivityLogFullError,
    ActivityLogStatistics,
)
from dst.replication.bitmap import BitmapStatistics, DirtyBitmap
from dst.replication.generations import (
    EMPTY,
    JUST_CREATED,
    Comparison,
    Decision,
    Generations,
    compare,
    new_uuid,
)

__all__ = [
    "EMPTY",
    "JUST_CREATED",
    "ActivityLog",
    "ActivityLogFullError",
    "ActivityLogStatistics",
    "BitmapStatistics",
    "Comparison",
    "Decision",
    "DirtyBitmap",
    "Generations",
    "compare",
    "new_uuid",
]
