"""dst.mirror: the client-side failfast mirror (seed 004) — one copy of a volume per server.

- :mod:`dst.mirror.legs` — leg states and the rules (FAILFAST, drop, LAST_ERRED);
- :mod:`dst.mirror.layer` — :class:`Mirror`, the block layer;
- :mod:`dst.mirror.returning` — the watcher that brings an ERRED leg back through a resync;
- :mod:`dst.mirror.started` — READs and WRITEs started on the legs without a task (the bridge's
  started path);
- :mod:`dst.mirror.service` — :func:`open_mirror` over RemoteVolumes, bitmaps and status file.
"""

from __future__ import annotations

from dst.mirror.layer import Leg, Mirror
from dst.mirror.legs import LegState, LegTable, Verdict
from dst.mirror.service import open_mirror, status_document

__all__ = ["Leg", "LegState", "LegTable", "Mirror", "Verdict", "open_mirror", "status_document"]
