"""FaultyStore: a storage shim around a volume's FileStore, for chaos tests only.

A server started with ``DST_STORE_FAULTS=/path/spec.json`` in its environment wraps each
volume's FileStore in a :class:`FaultyStore` (``Volume.open``); without the variable nothing
here runs.  The shim is a block layer like the store it wraps (``dst/block/layer.py``), so
every layer above — Fence, Replicated, the session — meets the fault exactly as it would meet
a sick disk: as a :class:`~dst.errors.BlockError` carrying the errno, the same way FileStore
reports an ``OSError`` from a syscall (``FileStore._error``: the OSError's errno, EIO when
it has none).

**The spec**, JSON, every key optional (an absent or empty file means no faults)::

    {"eio_read":  [[offset, length], ...],  READs overlapping a range fail with EIO (bad blocks)
     "eio_write": [[offset, length], ...],  WRITE/TRIM/WRITE_ZEROES overlapping one: EIO
     "eio_flush": false,     FLUSH fails with EIO; a FUA write is written, then fails with EIO
                             (written, not stable); a PREFLUSH write fails before writing
     "enospc_write": false,  every WRITE and WRITE_ZEROES fails with ENOSPC
     "slow_write_s": 0.0,    sleep before each WRITE/TRIM/WRITE_ZEROES
     "slow_flush_s": 0.0,    sleep before each FLUSH and each FUA/PREFLUSH sync
     "journal": "/path/undo.journal"}       lose-unsynced-on-power-loss (below)

The file is re-read when its (mtime, inode, size) changes, checked on the I/O path at most
every :data:`SPEC_CHECK_S`, so a test can switch faults on and off while the server runs:
write it with :func:`write_spec` (write-and-rename, so the server never reads half a file; an
unreadable file is logged and the previous spec kept).  Injected faults are not sticky: an
``eio_flush`` switched off lets the next FLUSH succeed — unlike a real failed ``fdatasync``,
after which FileStore itself refuses every later write (its "fsyncgate" rule).

**Power loss.**  With ``journal`` set, before each data-changing bio reaches the file the shim
appends an *undo record* — the sequence number of the write, its offset and the bytes it is
about to overwrite — to the journal (no fsync: the simulated power loss is a SIGKILL of the
server, and the page cache survives that).  When a FLUSH, FUA or PREFLUSH completes *and the
store's sync counter moved* (``statistics().syncs`` — a real ``fdatasync`` ran; the broken
build ``skip-fsync`` does not move it), every write that had completed before that bio was
submitted (plus a FUA write itself) is stable: it is recorded as synced, and when nothing
unsynced or in flight is left the journal is truncated.  After the server is SIGKILLed,
:func:`power_loss` applies the undo records of unsynced writes newest-first to the data file,
which then holds what a power cut would have left: every synced write, no unsynced one.  With
``torn_seed``, some of those writes are rolled back only in part — a random sector-aligned
prefix of the new data survives — which is what a disk without atomic multi-sector writes
leaves.  A write still in flight at the kill is unsynced and rolled back (it may or may not
have reached the file: either is a valid power-loss outcome, and undoing is the harder one).

Only the data file (``NAME.img``) is shimmed.  The metadata files — ``NAME.meta.json``,
``NAME.bitmap``, ``NAME.al`` — are left as the killed process left them in the page cache,
i.e. as if every metadata write had reached the disk.  Their own fsync discipline is not
tested by this shim: a bitmap or activity-log update written but not yet fsynced survives
:func:`power_loss` here, where a real power cut could lose it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import trio

from dst.block.bio import Bio, BioFlags, Op
from dst.block.layer import BlockLayer, StoreStatistics
from dst.block.limits import Limits
from dst.errors import BlockError, ConfigError

__all__ = [
    "FAULTS_ENV",
    "FaultSpec",
    "FaultyStore",
    "PowerLossReport",
    "power_loss",
    "store_from_env",
    "write_spec",
]

log = logging.getLogger("dst.block")

FAULTS_ENV = "DST_STORE_FAULTS"
#: The spec file is stat()ed at most this often (seconds of trio.current_time()).
SPEC_CHECK_S = 0.05
#: Torn writes keep a prefix of whole sectors of this size.
SECTOR = 512
#: Old bytes are read and journaled in pieces of at most this size (a whole-device TRIM must
#: not need its size in memory).
JOURNAL_CHUNK = 1 << 20

_UNDO = struct.Struct("<4sQQQ")  # b"DSTU", seq, offset, length; then `length` old bytes
_SYNCED = struct.Struct("<4sQ")  # b"DSTS", count; then `count` u64 seqs now stable
_SEQ = struct.Struct("<Q")
_CHANGES = frozenset({Op.WRITE, Op.TRIM, Op.WRITE_ZEROES})


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """The parsed spec file (module docstring)."""

    eio_read: tuple[tuple[int, int], ...] = ()
    eio_write: tuple[tuple[int, int], ...] = ()
    eio_flush: bool = False
    enospc_write: bool = False
    slow_write_s: float = 0.0
    slow_flush_s: float = 0.0
    journal: str | None = None

    @classmethod
    def from_json(cls, raw: object, where: str = "spec") -> FaultSpec:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {raw!r}")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        return cls(
            eio_read=_ranges(raw.get("eio_read", ()), f"{where}: eio_read"),
            eio_write=_ranges(raw.get("eio_write", ()), f"{where}: eio_write"),
            eio_flush=_flag(raw.get("eio_flush", False), f"{where}: eio_flush"),
            enospc_write=_flag(raw.get("enospc_write", False), f"{where}: enospc_write"),
            slow_write_s=_seconds(raw.get("slow_write_s", 0.0), f"{where}: slow_write_s"),
            slow_flush_s=_seconds(raw.get("slow_flush_s", 0.0), f"{where}: slow_flush_s"),
            journal=_path(raw.get("journal"), f"{where}: journal"),
        )


def _ranges(value: object, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}={value!r}: expected a list of [offset, length]")
    out = []
    for item in value:
        ok = isinstance(item, list | tuple) and len(item) == 2
        if not ok or not all(isinstance(v, int) and v >= 0 for v in item):
            raise ConfigError(f"{where}: {item!r} is not [offset, length]")
        out.append((int(item[0]), int(item[1])))
    return tuple(out)


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}={value!r}: expected true or false")
    return value


def _seconds(value: object, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}={value!r}: expected seconds >= 0")
    return float(value)


def _path(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}={value!r}: expected a file path")
    return value


def write_spec(path: str | os.PathLike[str], **spec: Any) -> None:
    """Write a spec file atomically (temporary file, rename), checked as the server will."""
    FaultSpec.from_json(spec, os.fspath(path))
    tmp = Path(f"{os.fspath(path)}.tmp")
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, path)


def _overlaps(ranges: Sequence[tuple[int, int]], offset: int, length: int) -> bool:
    end = offset + max(length, 1)
    return any(start < end and offset < start + size for start, size in ranges)


class _UndoJournal:
    """The undo journal file of one store (module docstring); plain syscalls, no fsync."""

    def __init__(self, path: str) -> None:
        self.path = path
        # O_APPEND: records appended from worker threads and markers from the event loop
        # land whole, one after the other, whatever the interleaving.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o600)

    def record(self, seq: int, data_fd: int, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(JOURNAL_CHUNK, end - offset)
            old = os.pread(data_fd, n, offset)
            os.write(self.fd, _UNDO.pack(b"DSTU", seq, offset, len(old)) + old)
            offset += n

    def synced(self, seqs: Sequence[int]) -> None:
        os.write(self.fd, _SYNCED.pack(b"DSTS", len(seqs)) + b"".join(_SEQ.pack(s) for s in seqs))

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class FaultyStore:
    """A :class:`~dst.block.layer.BlockLayer` over a FileStore, injecting the spec's faults."""

    def __init__(self, below: BlockLayer, data_path: str, spec_path: str) -> None:
        self.below = below
        self.spec_path = spec_path
        self.spec = FaultSpec()
        self._key: tuple[int, int, int] | None = None
        self._next_check = -1.0
        self._data_fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        self._journal: _UndoJournal | None = None
        self._seq = 0
        self._inflight: set[int] = set()  # journaled writes not completed
        self._completed: set[int] = set()  # completed, not yet known stable
        self.injected: dict[str, int] = {}
        self._reload(force=True)

    def __repr__(self) -> str:
        return f"FaultyStore({self.below!r}, spec={self.spec_path!r})"

    @property
    def limits(self) -> Limits:
        return self.below.limits

    @property
    def size(self) -> int:
        return self.below.size

    def statistics(self) -> StoreStatistics:
        stats = getattr(self.below, "statistics", None)
        return stats() if callable(stats) else StoreStatistics()

    # -- the spec ---------------------------------------------------------------------------

    def _reload(self, *, force: bool = False) -> None:
        now = trio.current_time() if not force else 0.0
        if not force and now < self._next_check:
            return
        self._next_check = now + SPEC_CHECK_S
        try:
            st = os.stat(self.spec_path)
            key: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            key = None
        if key == self._key and not force:
            return
        try:
            text = Path(self.spec_path).read_text() if key is not None else ""
            spec = FaultSpec.from_json(json.loads(text) if text.strip() else {}, self.spec_path)
        except (OSError, ValueError, ConfigError) as exc:
            log.warning("event=store_faults_unreadable spec=%s reason=%r", self.spec_path, exc)
            return  # keep the previous spec; the next check tries again
        self._key = key
        if spec.journal != self.spec.journal:
            if self._journal is not None:
                self._journal.close()
            self._journal = _UndoJournal(spec.journal) if spec.journal else None
            self._inflight.clear()
            self._completed.clear()
        if spec != self.spec:
            log.warning("event=store_faults spec=%s faults=%s", self.spec_path, spec)
        self.spec = spec

    def _fail(self, bio: Bio, code: int, kind: str) -> BlockError:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return BlockError(
            code,
            f"{bio.op.name} offset={bio.offset} length={bio.length}: injected {kind} "
            f"({FAULTS_ENV}={self.spec_path})",
        )

    # -- I/O --------------------------------------------------------------------------------

    async def submit(self, bio: Bio) -> None:
        self._reload()
        spec = self.spec
        op = bio.op
        if op is Op.READ:
            if spec.eio_read and _overlaps(spec.eio_read, bio.offset, bio.length):
                raise self._fail(bio, errno.EIO, "eio_read")
            await self.below.submit(bio)
            return
        if op is Op.FLUSH:
            await self._slow_sync(bio, spec)
            await self._stable(bio, None)
            return
        if spec.enospc_write and op is not Op.TRIM:
            raise self._fail(bio, errno.ENOSPC, "enospc_write")
        if spec.eio_write and _overlaps(spec.eio_write, bio.offset, bio.length):
            raise self._fail(bio, errno.EIO, "eio_write")
        if spec.slow_write_s:
            await trio.sleep(spec.slow_write_s)
        if bio.flags & (BioFlags.FUA | BioFlags.PREFLUSH):
            await self._slow_sync(bio, spec)
        if spec.eio_flush and bio.flags & BioFlags.PREFLUSH:
            raise self._fail(bio, errno.EIO, "eio_flush")
        if spec.eio_flush and bio.flags & BioFlags.FUA:
            # The data reaches the file; the sync that would make it stable fails.
            plain = replace(bio, flags=bio.flags & ~BioFlags.FUA)
            await self._journaled(plain)
            raise self._fail(bio, errno.EIO, "eio_flush")
        await self._journaled(bio)

    async def _slow_sync(self, bio: Bio, spec: FaultSpec) -> None:
        if spec.slow_flush_s:
            await trio.sleep(spec.slow_flush_s)
        if spec.eio_flush and bio.op is Op.FLUSH:
            raise self._fail(bio, errno.EIO, "eio_flush")

    async def _journaled(self, bio: Bio) -> None:
        journal = self._journal
        if journal is None or bio.op not in _CHANGES:
            await self._stable(bio, None)
            return
        self._seq += 1
        seq = self._seq
        self._inflight.add(seq)  # before the record: a truncate must not race it
        try:
            if bio.length <= JOURNAL_CHUNK:
                journal.record(seq, self._data_fd, bio.offset, bio.length)
            else:
                await trio.to_thread.run_sync(
                    journal.record, seq, self._data_fd, bio.offset, bio.length
                )
        except OSError as exc:
            self._inflight.discard(seq)
            raise BlockError(errno.EIO, f"undo journal {journal.path}: {exc}") from exc
        await self._stable(bio, seq)

    async def _stable(self, bio: Bio, seq: int | None) -> None:
        """Submit below; if a real sync covered this bio, record what became stable."""
        syncing = bio.op is Op.FLUSH or bio.flags & (BioFlags.FUA | BioFlags.PREFLUSH)
        covered = set(self._completed) if syncing else None
        before = self.statistics().syncs if syncing else 0
        journal = self._journal
        try:
            await self.below.submit(bio)
        finally:
            if seq is not None and seq in self._inflight:
                # Failed or not, it may have reached the file: undo it unless synced.
                self._inflight.discard(seq)
                self._completed.add(seq)
        if covered is None or journal is None or journal is not self._journal:
            return
        if self.statistics().syncs == before:
            return  # no fdatasync ran (skip-fsync): nothing became stable
        if seq is not None and bio.flags & BioFlags.FUA:
            covered.add(seq)
        self._completed -= covered
        if not self._completed and not self._inflight:
            journal.truncate()
        elif covered:
            journal.synced(sorted(covered))

    async def aclose(self) -> None:
        try:
            await self.below.aclose()
        finally:
            if self._journal is not None:
                self._journal.close()
            if self._data_fd >= 0:
                fd, self._data_fd = self._data_fd, -1
                os.close(fd)


def store_from_env(store: BlockLayer, data_path: str | os.PathLike[str]) -> BlockLayer:
    """``store`` wrapped in a FaultyStore when ``DST_STORE_FAULTS`` is set, else ``store``."""
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return store
    log.warning("event=store_faults_enabled path=%s spec=%s", os.fspath(data_path), spec)
    return FaultyStore(store, os.fspath(data_path), spec)


@dataclass(frozen=True, slots=True)
class PowerLossReport:
    """What :func:`power_loss` undid: unsynced writes (by sequence number) and their bytes;
    ``torn_writes`` of them kept a prefix; ``synced_writes`` journaled writes left alone."""

    writes_rolled_back: int
    bytes_rolled_back: int
    torn_writes: int
    synced_writes: int


def power_loss(data_file: Path, journal: Path, *, torn_seed: int | None = None) -> PowerLossReport:
    """Make ``data_file`` hold what a power cut would have left (module docstring); call it
    after the server using ``journal`` was SIGKILLed.  The journal is emptied afterwards."""
    undo: list[tuple[int, int, bytes]] = []
    synced: set[int] = set()
    raw = journal.read_bytes() if journal.exists() else b""
    pos = 0
    while pos + _SYNCED.size <= len(raw):
        magic = raw[pos : pos + 4]
        if magic == b"DSTU" and pos + _UNDO.size <= len(raw):
            _, seq, offset, length = _UNDO.unpack_from(raw, pos)
            body = raw[pos + _UNDO.size : pos + _UNDO.size + length]
            if len(body) < length:
                break  # the kill cut the record short: its write never started
            undo.append((seq, offset, body))
            pos += _UNDO.size + length
        elif magic == b"DSTS":
            _, count = _SYNCED.unpack_from(raw, pos)
            start = pos + _SYNCED.size
            if start + count * _SEQ.size > len(raw):
                break
            synced.update(s for (s,) in _SEQ.iter_unpack(raw[start : start + count * _SEQ.size]))
            pos = start + count * _SEQ.size
        else:
            raise ConfigError(f"undo journal {journal}: garbage at byte {pos}")
    rng = random.Random(torn_seed) if torn_seed is not None else None
    rolled: set[int] = set()
    torn: set[int] = set()
    nbytes = 0
    with open(data_file, "r+b") as f:
        for seq, offset, old in reversed(undo):  # newest first
            if seq in synced:
                continue
            keep = 0  # bytes of the new data that survive (a torn write)
            sectors = len(old) // SECTOR
            if rng is not None and sectors > 1 and rng.random() < 0.5:
                keep = rng.randrange(1, sectors) * SECTOR
                torn.add(seq)
            f.seek(offset + keep)
            f.write(old[keep:])
            rolled.add(seq)
            nbytes += len(old) - keep
        f.flush()
        os.fsync(f.fileno())
    if journal.exists():
        os.truncate(journal, 0)
    return PowerLossReport(
        writes_rolled_back=len(rolled),
        bytes_rolled_back=nbytes,
        torn_writes=len(torn),
        synced_writes=len({seq for seq, _, _ in undo} & synced),
    )
