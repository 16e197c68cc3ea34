"""dst.nbd — the NBD bridge: any NBD client (qemu, nbdcopy, nbdfuse, the kernel) on a dst volume.

The protocol core is sans-IO, like :mod:`dst.wire` (``ruff.toml`` bans trio, socket, time and
ssl from it), so every rule is tested by feeding bytes; only the adapter does I/O:

- :mod:`dst.nbd.protocol` — the NBD constants, the bridge's bounds, errno mapping;
- :mod:`dst.nbd.handshake` — the fixed-newstyle handshake, server side (theory of operation);
- :mod:`dst.nbd.transmission` — request parsing and judging, reply encoding;
- :mod:`dst.nbd.bridge` — :func:`~dst.nbd.bridge.serve_nbd` and
  :class:`~dst.nbd.bridge.NbdExport`, the Trio adapter over a dst block layer.

Importing this package does not import trio: ``from dst.nbd.bridge import serve_nbd``.
"""

from __future__ import annotations

from dst.nbd.handshake import ServerHandshake
from dst.nbd.protocol import ExportInfo
from dst.nbd.transmission import Request, Session, check_request, parse_request

__all__ = [
    "ExportInfo",
    "Request",
    "ServerHandshake",
    "Session",
    "check_request",
    "parse_request",
]
