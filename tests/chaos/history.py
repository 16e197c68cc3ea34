"""Per-process JSONL history of a chaos workload: invoke and complete records.

An invoke record is written (one ``os.write`` on an O_APPEND descriptor, so it is in the
kernel before the request leaves — a SIGKILL of the workload cannot lose it) BEFORE the
request is sent; the complete record after the answer.  An invoke with no complete record is
an operation whose outcome is unknown: the process died, or the run ended, before the reply.

Times are ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process of the machine,
so records of different workload processes order against each other.

Records::

  {"t": "invoke", "id": 7, "op": "write", "writer": 1, "seq": 7, "offset": 4096,
   "nsectors": 8, "epoch": 1, "at": 12.5}
  {"t": "invoke", "id": 8, "op": "read", "writer": 1, "offset": 0, "nsectors": 4, "at": ...}
  {"t": "complete", "id": 8, "ok": true, "at": ..., "sectors": [[1, 7], 0, "corrupt", ...]}
  {"t": "complete", "id": 9, "ok": false, "errno": 5, "at": ...}

A read's ``sectors`` say what each sector held: ``[writer, seq]``, 0 for never written,
``"corrupt"`` or ``["misdirected", writer, seq]``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SectorSeen = Any  # [writer, seq] | 0 | "corrupt" | ["misdirected", writer, seq]


class HistoryWriter:
    """Appends records to one process's history file."""

    def __init__(self, path: Path, writer: int) -> None:
        self.writer = writer
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._next = 0

    def _put(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def invoke(self, op: str, offset: int = 0, nsectors: int = 0, **extra: Any) -> int:
        """Log an invocation and return its id (for writes, also the write's seq)."""
        self._next += 1
        rid = self._next
        rec = {"t": "invoke", "id": rid, "op": op, "writer": self.writer}
        rec |= {"offset": offset, "nsectors": nsectors, "at": time.monotonic(), **extra}
        self._put(rec)
        return rid

    def complete(self, rid: int, errno: int | None = None, **extra: Any) -> None:
        rec: dict[str, Any] = {"t": "complete", "id": rid, "ok": errno is None}
        if errno is not None:
            rec["errno"] = errno
        rec |= {"at": time.monotonic(), **extra}
        self._put(rec)

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class Op:
    """One operation with its outcome: ``ok`` True/False, or None if it never completed."""

    writer: int
    id: int
    op: str
    offset: int
    nsectors: int
    invoked: float
    epoch: int = 0
    ok: bool | None = None
    errno: int | None = None
    completed: float | None = None
    sectors: list[SectorSeen] = field(default_factory=list)

    @property
    def first(self) -> int:
        return self.offset // 512

    @property
    def seq(self) -> int:
        return self.id

    def covers(self, sector: int) -> bool:
        return self.first <= sector < self.first + self.nsectors


def parse(lines: Iterable[str], default_writer: int = 0) -> Iterator[Op]:
    """Operations of one history, in invoke order.  A torn last line (killed mid-write) is
    skipped: its invoke never went out, since the request is sent only after it."""
    ops: dict[int, Op] = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec["t"] == "invoke":
            ops[rec["id"]] = Op(
                rec.get("writer", default_writer),
                rec["id"],
                rec["op"],
                rec.get("offset", 0),
                rec.get("nsectors", 0),
                rec["at"],
                rec.get("epoch", 0),
            )
        else:
            op = ops[rec["id"]]
            op.ok = rec["ok"]
            op.errno = rec.get("errno")
            op.completed = rec["at"]
            op.sectors = rec.get("sectors", [])
    yield from ops.values()


def load(paths: Iterable[Path]) -> list[Op]:
    out: list[Op] = []
    for p in paths:
        out.extend(parse(p.read_text().splitlines()))
    return out
