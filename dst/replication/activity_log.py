"""ActivityLog: the bounded set of "hot" extents a primary may be writing (DRBD's AL).

A primary writes each block to its local disk and to the peer at about the same time.  If it
crashes, a write may have reached one disk and not the other, and nobody knows which blocks —
so without more information the whole volume would have to be resynced.  DRBD's answer (User's
Guide §17.3, "The Activity Log"), and dst's: before writing into an extent, the primary records
the extent as *active* on stable storage.  After a crash only the active extents can differ, and
only they are resynced: a bound of ``slots * extent_size`` (1019 * 4 MiB, about 4 GiB, by
default) however large the volume.  More slots mean fewer AL commits under scattered writes and
more to resync after a crash (LINBIT's "al-extents" trade-off; ``--al-extents`` sets it).  A
commit is a page write and an fdatasync before the write it covers may go out, so a set smaller
than the working set of random writes costs a disk sync on most of them.

File ``NAME.al`` beside the volume, a :class:`~dst.replication.pagefile.PageFile`::

    page 0              header: magic, version, page size, extent size, volume size, ring
                        length, crc32c
    page 1+(seq % RING) one *record*: magic, sequence number, extent count, the active extents
                        (u32 indices), crc32c of the page in its last 4 bytes

Theory of operation
-------------------

- :meth:`ActivityLog.begin` (memory only) takes a reference on each extent of the write, making
  it active — if the set is full it evicts the least recently used extent that no write holds —
  and returns True when an extent the write needs is not yet in the durable record.  Then the
  caller must :meth:`commit` (blocking) *before issuing the write*.
- :meth:`commit` writes the whole active set as one record page into the next ring slot and
  fdatasyncs.  It never overwrites the newest record, so a crash that tears the page it is
  writing leaves the previous record intact; :meth:`open` takes the valid record with the
  highest sequence number.
- :meth:`end` drops the references once the write is complete on both replicas (or, with the
  peer gone, marked and flushed in the dirty bitmap, which covers it from then on).

Why the fallback record is always enough: a write is issued only after a commit containing its
extent completed; while it is in flight its extent holds a reference, so it cannot be evicted
and is in every later snapshot.  A commit that tears therefore falls back to a record that was
complete and contains every extent with a write in flight.  An extent evicted from memory stays
in the durable record until the next commit drops it — over-reporting only.  ``begin`` also
checks the snapshot of a commit being written, so an extent re-activated while a commit without
it is in flight waits for the next commit rather than trusting the older record.

After a crash: ``active_extents()`` right after :meth:`open` is the recovered set.  The caller
marks those ranges in the dirty bitmap, flushes the bitmap and persists
``Generations.mark_crashed_primary()`` *before* the first :meth:`commit`, which may drop them.
:meth:`clear` (no write in flight) commits an empty set, for a clean shutdown or demotion.

Threads: ``begin``, ``begin_nowait``, ``end``, ``active_extents`` and ``statistics`` are memory
operations for the event loop; ``open``, ``commit``, ``clear`` and ``close`` block on disk I/O
and belong in ``trio.to_thread.run_sync``.  A failed write or fdatasync poisons the log: from
then on ``begin`` and ``commit`` raise BlockError(EIO), since what reached the disk is unknown.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import crc32c

from dst.errors import BlockError, ConfigError, DstError
from dst.replication.bitmap import check_extent_size
from dst.replication.pagefile import PAGE_SIZE, PageFile

__all__ = [
    "DEFAULT_EXTENT_SIZE",
    "DEFAULT_SLOTS",
    "MAX_SLOTS",
    "RING_RECORDS",
    "ActivityLog",
    "ActivityLogFullError",
    "ActivityLogStatistics",
]

MAGIC: Final = b"dstalog\x00"
#: One record is one page: the unit a torn write can destroy, the previous record being in
#: another page of the ring.
RECORD_MAGIC: Final = b"dALR"
#: Records in the ring.  Correctness needs two (never overwrite the newest); a few more keep a
#: short history of commits for debugging at no cost.
RING_RECORDS: Final = 8
#: DRBD's extent size: big enough that sequential writes seldom need a commit.
DEFAULT_EXTENT_SIZE: Final = 4 << 20
_RECORD = struct.Struct("<4sQI")  # magic, sequence number, extent count
_CRC = struct.Struct("<I")
_INDEX = struct.Struct("<I")
#: The whole active set fits in one record page, so a commit is one page write.
MAX_SLOTS: Final = (PAGE_SIZE - _RECORD.size - _CRC.size) // _INDEX.size
#: As many as one record holds: 1019 * 4 MiB, about 4 GiB to resync at most after a crash
#: (DRBD's default al-extents, 1237, is 4.8 GiB).
DEFAULT_SLOTS: Final = MAX_SLOTS
#: Extent indices are u32 on disk.
MAX_EXTENTS: Final = 1 << 32


class ActivityLogFullError(DstError):
    """Every slot holds an extent with a write in flight: wait for an ``end`` and retry."""


@dataclass(frozen=True, slots=True)
class ActivityLogStatistics:
    extent_size: int
    slots: int
    active: int  # extents in the active set (memory)
    in_use: int  # of which some write holds a reference
    sequence: int  # of the newest durable record
    commits: int
    evictions: int
    recovered: int  # extents found active at open (non-zero: the last run crashed)


def _record_image(seq: int, extents: list[int]) -> bytes:
    body = _RECORD.pack(RECORD_MAGIC, seq, len(extents))
    body += b"".join(_INDEX.pack(e) for e in extents)
    body = body.ljust(PAGE_SIZE - _CRC.size, b"\0")
    return body + _CRC.pack(crc32c.crc32c(body))


def _parse_record(image: bytes, slot: int, extents: int) -> tuple[int, frozenset[int]] | None:
    """(sequence, active extents) of a valid record in ring ``slot``, or None."""
    if len(image) != PAGE_SIZE:
        return None
    body = image[: PAGE_SIZE - _CRC.size]
    if _CRC.unpack_from(image, len(body))[0] != crc32c.crc32c(body):
        return None
    magic, seq, count = _RECORD.unpack_from(body)
    if magic != RECORD_MAGIC or seq % RING_RECORDS != slot or count > MAX_SLOTS:
        return None
    active = frozenset(_INDEX.unpack_from(body, _RECORD.size + 4 * i)[0] for i in range(count))
    if any(e >= extents for e in active):
        return None
    return seq, active


class ActivityLog:
    """DRBD's activity log for one volume; see the module docstring."""

    def __init__(
        self,
        file: PageFile,
        volume_size: int,
        extent_size: int,
        slots: int,
        record: tuple[int, frozenset[int]] | None,
    ) -> None:
        self._file = file
        self._volume_size = volume_size
        self._extent_size = extent_size
        self._slots = slots
        # No valid record at all (a file this module made always has one): the whole volume
        # counts as active until the first commit.
        self._lost = record is None
        self._seq, recovered = record or (RING_RECORDS, frozenset())
        self._recovered = recovered
        # extent -> references held by writes in flight; order = least recently used first.
        self._active: OrderedDict[int, int] = OrderedDict((e, 0) for e in sorted(recovered))
        self._durable = recovered  # the newest record on disk
        self._writing: frozenset[int] | None = None  # the record a commit is writing
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._commits = self._evictions = 0

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        volume_size: int,
        extent_size: int = DEFAULT_EXTENT_SIZE,
        slots: int = DEFAULT_SLOTS,
    ) -> ActivityLog:
        """Open the log at ``path`` (made empty if missing) and recover its newest valid
        record; blocking.  ConfigError on another geometry, or if in use elsewhere.

        ``slots`` may change between runs: a recovered set larger than ``slots`` is held until
        its extents are evicted.
        """
        _check_geometry(volume_size, extent_size, slots)
        geometry = {"extent_size": extent_size, "volume_size": volume_size, "ring": RING_RECORDS}

        def initial() -> list[bytes]:  # one valid empty record, in slot 0
            return [_record_image(RING_RECORDS, []), *[bytes(PAGE_SIZE)] * (RING_RECORDS - 1)]

        file = PageFile.open(path, "activity log", MAGIC, geometry, initial)
        try:
            ring = file.read(0, RING_RECORDS)
        except OSError as exc:
            file.close()
            raise ConfigError(f"activity log {file.name}: unreadable ({exc.strerror})") from exc
        extents = -(-volume_size // extent_size)
        best: tuple[int, frozenset[int]] | None = None
        for slot in range(RING_RECORDS):
            record = _parse_record(ring[slot * PAGE_SIZE : (slot + 1) * PAGE_SIZE], slot, extents)
            if record is not None and (best is None or record[0] > best[0]):
                best = record
        return cls(file, volume_size, extent_size, slots, best)

    # -- the write path (memory only) -----------------------------------------------------

    def _extent_range(self, offset: int, length: int) -> range:
        if offset < 0 or length < 0 or offset + length > self._volume_size:
            raise ValueError(
                f"range offset={offset} length={length} outside volume size={self._volume_size}"
            )
        if length == 0:
            return range(0)
        return range(offset // self._extent_size, (offset + length - 1) // self._extent_size + 1)

    def begin(self, offset: int, length: int) -> bool:
        """Take references on the write's extents; True if :meth:`commit` must precede it.

        All or nothing: ActivityLogFullError (nothing changed) if the write needs more slots
        than writes in flight leave free.
        """
        extents = self._extent_range(offset, length)
        with self._lock:
            self._file.check()
            new = [e for e in extents if e not in self._active]
            excess = len(self._active) + len(new) - self._slots
            if excess > 0:
                idle = [e for e, refs in self._active.items() if refs == 0 and e not in extents]
                victims = idle[:excess]
                if len(victims) < excess:
                    raise ActivityLogFullError(
                        f"activity log {self._file.name}: a write over {len(extents)} extents "
                        f"needs {excess} free of slots={self._slots}, but writes hold the rest"
                    )
                for victim in victims:
                    del self._active[victim]
                self._evictions += len(victims)
            for e in extents:
                self._active[e] = self._active.get(e, 0) + 1
                self._active.move_to_end(e)
            writing = self._writing
            return any(
                e not in self._durable or (writing is not None and e not in writing)
                for e in extents
            )

    def begin_nowait(self, offset: int, length: int) -> bool:
        """:meth:`begin` for a write that must not wait: the references are taken only if
        every extent is active and in the durable record already (no eviction, no commit);
        otherwise False, and nothing changed."""
        extents = self._extent_range(offset, length)
        with self._lock:
            if self._file.failed is not None or self._file.closed:
                return False  # begin raises the error
            active, durable, writing = self._active, self._durable, self._writing
            for e in extents:
                if e not in active or e not in durable:
                    return False
                if writing is not None and e not in writing:
                    return False
            for e in extents:
                active[e] += 1
                active.move_to_end(e)
            return True

    def end(self, offset: int, length: int) -> None:
        """Drop the references :meth:`begin` took, once the write is safe on both sides."""
        extents = self._extent_range(offset, length)
        with self._lock:
            if any(self._active.get(e, 0) <= 0 for e in extents):
                raise ValueError(f"end({offset}, {length}) without a matching begin")
            for e in extents:
                self._active[e] -= 1

    def active_extents(self) -> list[tuple[int, int]]:
        """The active set as merged ``(offset, length)`` byte ranges; right after :meth:`open`,
        what the last run may have left out of sync (the whole volume if no record survived).
        """
        with self._lock:
            if self._lost:
                return [(0, self._volume_size)]
            return self._ranges(sorted(self._active))

    @property
    def recovered_extents(self) -> list[tuple[int, int]]:
        """What :meth:`open` found active, whatever happened since."""
        if self._lost:
            return [(0, self._volume_size)]
        return self._ranges(sorted(self._recovered))

    @property
    def was_clean(self) -> bool:
        """True if the last run ended with an empty active set (no resync needed)."""
        return not self._lost and not self._recovered

    def _ranges(self, extents: list[int]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        es = self._extent_size
        for e in extents:
            start, end = e * es, min((e + 1) * es, self._volume_size)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
        return out

    # -- persistence (blocking) -----------------------------------------------------------

    def commit(self) -> int:
        """Persist the active set as the next record and fdatasync (blocking).

        Covers every :meth:`begin` that returned before the call.  Returns the sequence number
        of the newest durable record; does no I/O if the set has not changed.
        """
        with self._commit_lock:
            with self._lock:
                self._file.check()
                snapshot = frozenset(self._active)
                if snapshot == self._durable and not self._lost:
                    return self._seq
                seq = self._seq + 1
                self._writing = snapshot
            try:
                self._file.write([(seq % RING_RECORDS, _record_image(seq, sorted(snapshot)))])
            except BlockError:
                with self._lock:
                    self._writing = None
                raise
            with self._lock:
                # One step: a begin must never see the old durable set without the snapshot.
                self._durable = snapshot
                self._writing = None
                self._seq = seq
                self._lost = False
                self._commits += 1
            return seq

    def clear(self) -> int:
        """Evict every extent and commit the empty set (clean shutdown or demotion; blocking).

        Raises ValueError if a write still holds an extent.
        """
        with self._lock:
            self._file.check()
            busy = [e for e, refs in self._active.items() if refs]
            if busy:
                raise ValueError(
                    f"activity log {self._file.name}: writes in flight on extents {busy}"
                )
            self._evictions += len(self._active)
            self._active.clear()
        return self.commit()

    def close(self) -> None:
        """Release the file without committing (idempotent; to the log, a crash is the same)."""
        with self._lock:
            self._file.close()

    def statistics(self) -> ActivityLogStatistics:
        with self._lock:
            return ActivityLogStatistics(
                extent_size=self._extent_size,
                slots=self._slots,
                active=len(self._active),
                in_use=sum(1 for refs in self._active.values() if refs),
                sequence=self._seq,
                commits=self._commits,
                evictions=self._evictions,
                recovered=len(self._recovered),
            )

    def __repr__(self) -> str:
        return f"ActivityLog({self._file.name!r}, active={len(self._active)}, seq={self._seq})"


def _check_geometry(volume_size: int, extent_size: int, slots: int) -> None:
    check_extent_size("activity log", extent_size)
    if not isinstance(volume_size, int) or volume_size <= 0:
        raise ConfigError(f"activity log volume_size={volume_size!r} must be a positive int")
    if -(-volume_size // extent_size) > MAX_EXTENTS:
        raise ConfigError(
            f"activity log: volume_size={volume_size} has more than MAX_EXTENTS={MAX_EXTENTS} "
            f"extents of extent_size={extent_size}"
        )
    if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        raise ConfigError(f"activity log slots={slots!r} must be between 1 and {MAX_SLOTS}")
