"""dst — a distributed network block store on Trio.

See ``../shared/DESIGN.md`` (the architecture) and ``proto/PROTOCOL.md`` (the
wire protocol).  Packages: ``dst.wire`` (sans-IO codec), ``dst.block`` (bios,
limits, the splitter, stores), ``dst.server`` and ``dst.client`` (the Trio
peers), ``dst.security`` (certificates and TLS).
"""

from __future__ import annotations

__version__ = "0.1.0"
