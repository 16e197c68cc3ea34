"""dst.block: bios, limits, the splitter, the block layer protocol and the stores.

Everything a block layer needs, re-exported from its module:

- :mod:`dst.block.bio` — :class:`Bio`, :class:`Segment`, :class:`Op`, :class:`BioFlags`,
  :data:`SECTOR_SIZE` and :func:`validate_bio`, the edge check;
- :mod:`dst.block.limits` — :class:`Limits` and how they stack;
- :mod:`dst.block.split` — :func:`split`, which cuts any valid bio to any valid limits;
- :mod:`dst.block.layer` — the :class:`BlockLayer` and :class:`StartingLayer` protocols, the
  :class:`Plug`, :class:`Completion` (a Pending) and :func:`submit_split`;
- :mod:`dst.block.memory`, :mod:`dst.block.file` — the stores at the bottom of a stack.
"""

from __future__ import annotations

from dst.block.bio import SECTOR_SIZE, Bio, BioFlags, Op, Segment, validate_bio
from dst.block.file import IO_THREADS, FileStore
from dst.block.fileio import IOV_MAX
from dst.block.layer import (
    BlockLayer,
    Completion,
    Pending,
    Plug,
    StartingLayer,
    StoreCounters,
    StoreStatistics,
    closed_error,
    submit_split,
)
from dst.block.limits import UNLIMITED, Limits
from dst.block.memory import MemoryStore
from dst.block.split import split

__all__ = [
    "IOV_MAX",
    "IO_THREADS",
    "SECTOR_SIZE",
    "UNLIMITED",
    "Bio",
    "BioFlags",
    "BlockLayer",
    "Completion",
    "FileStore",
    "Limits",
    "MemoryStore",
    "Op",
    "Pending",
    "Plug",
    "Segment",
    "StartingLayer",
    "StoreCounters",
    "StoreStatistics",
    "closed_error",
    "split",
    "submit_split",
    "validate_bio",
]
