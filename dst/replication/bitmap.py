"""DirtyBitmap: the persistent out-of-sync bitmap of one volume (DRBD's quick-sync bitmap).

One bit per extent (64 KiB by default) says "this extent may differ from the peer".  While the
peer is away the primary marks every write it acknowledges alone; when the peer returns only
the marked extents are resynced (DRBD User's Guide §17.4, "The quick-sync bitmap"), and after a
primary crash the activity log's extents are marked too (:mod:`dst.replication.activity_log`).

File ``NAME.bitmap`` beside the volume, a :class:`~dst.replication.pagefile.PageFile`::

    page 0      header: magic, format version, page size, extent size, volume size, crc32c
    page 1+i    bits for extents [i*BITS_PER_PAGE, (i+1)*BITS_PER_PAGE), LSB first,
                then the crc32c of (page index, bits) in the last 4 bytes

The header is written once, with the file, and a bitmap made for another extent or volume size
is refused with ConfigError: its bits would describe some other volume.

Theory of operation — the bitmap may over-report dirtiness, never under-report it:

- :meth:`mark` sets bits in memory; :meth:`flush` writes every changed page whole (``pwrite``
  of aligned 4 KiB pages) and ``fdatasync`` s.  **The caller flushes after marking and before
  acknowledging a write that reached only the local disk**: once acknowledged, the write is
  data the peer lacks, and if the primary then lost power with the bit only in memory, the
  restarted node would believe the extent in sync and the resync would skip it — the
  acknowledged write would silently never reach the peer.  ``mark`` returns whether a flush is
  still needed, so writes to extents already dirty on disk skip it.
- :meth:`clear` drops bits after resync in memory only; they reach the disk with the next
  flush, whenever that is.  A clear lost in a crash means one redundant resync of the extent.
  :meth:`mark_all` (flushed) starts a full resync, so an interrupted one resumes from the bits.
- A crash during a flush can tear a page (some sectors new, some old).  Every page carries a
  crc32c; a page that fails it is read back *all dirty* (and rewritten at the next flush), so a
  tear loses nothing.  Even a tear the crc missed could not lose an acknowledged write's bit:
  bits set before the flush are set in both the old and the new image, and bits the tearing
  flush was setting belong to writes not yet acknowledged, which the activity log covers.

Threads: every method is safe to call from any thread (one lock guards the bits, another
serializes flushes).  :meth:`open`, :meth:`flush` and :meth:`close` block on disk I/O and belong
in ``trio.to_thread.run_sync``; the rest are memory operations for the event loop.  A flush
covers every ``mark`` that returned before it was called.  After a failed write or fdatasync
the bitmap refuses every later flush with EIO (Linux may drop the dirty pages and report success
next time, "fsyncgate"), so the caller cannot acknowledge writes on a lie.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import crc32c

from dst.errors import BlockError, ConfigError
from dst.replication.pagefile import PAGE_SIZE, PageFile

__all__ = [
    "BITS_PER_PAGE",
    "DEFAULT_EXTENT_SIZE",
    "MAX_BITMAP_BYTES",
    "MAX_EXTENT_SIZE",
    "MIN_EXTENT_SIZE",
    "BitmapStatistics",
    "DirtyBitmap",
    "check_extent_size",
]

MAGIC: Final = b"dstbmap\x00"
_CRC_SIZE: Final = 4
_PAYLOAD: Final = PAGE_SIZE - _CRC_SIZE
BITS_PER_PAGE: Final = _PAYLOAD * 8
#: DRBD tracks 4 KiB; dst's resync moves whole extents, and 64 KiB keeps a 1 TiB volume's
#: bitmap at 2 MiB while a resync after a few scattered writes still moves little.
DEFAULT_EXTENT_SIZE: Final = 64 << 10
#: Below a page, bits describe less than any write the stack issues.
MIN_EXTENT_SIZE: Final = 4 << 10
#: Above this one bit covers so much that a single write costs a long resync.
MAX_EXTENT_SIZE: Final = 1 << 30
#: The bitmap is held in memory whole: 64 MiB covers 32 TiB at 64 KiB extents; bigger volumes
#: should choose bigger extents rather than pin more memory.
MAX_BITMAP_BYTES: Final = 64 << 20

_CRC = struct.Struct("<I")
_INDEX = struct.Struct("<Q")
#: Bytes per chunk when scanning for dirty runs: all-zero chunks are skipped at C speed.
_SCAN_CHUNK: Final = 4096
_ZERO_CHUNK: Final = bytes(_SCAN_CHUNK)


@dataclass(frozen=True, slots=True)
class BitmapStatistics:
    extent_size: int
    extents: int
    dirty_extents: int
    dirty_bytes: int
    pending_pages: int  # changed in memory, not yet flushed
    flushes: int
    pages_written: int
    torn_pages: int  # found failing their crc at open, and read back all dirty


def _page_image(index: int, payload: bytes | bytearray) -> bytes:
    crc = crc32c.crc32c(payload, crc32c.crc32c(_INDEX.pack(index)))
    return bytes(payload) + _CRC.pack(crc)


class DirtyBitmap:
    """One bit per extent of one volume, persisted in its own file; see the module docstring."""

    def __init__(self, file: PageFile, volume_size: int, extent_size: int, bits: bytearray) -> None:
        self._file = file
        self._volume_size = volume_size
        self._extent_size = extent_size
        self._extents = -(-volume_size // extent_size)
        self._bits = bits
        self._count = int.from_bytes(bits, "little").bit_count()
        self._changed: set[int] = set()  # pages changed in memory since their last write
        self._inflight: set[int] = set()  # pages the running flush is writing
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flushes = self._pages_written = self._torn_pages = 0

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        volume_size: int,
        extent_size: int = DEFAULT_EXTENT_SIZE,
        *,
        create_dirty: bool = False,
    ) -> DirtyBitmap:
        """Open the bitmap at ``path``, creating it if missing (blocking I/O).

        A new bitmap starts clean — right for a new volume, whose zeros match the peer's — or
        all dirty with ``create_dirty`` (the volume holds data the peer may lack and its bitmap
        was lost).  ConfigError if the file was made for another extent or volume size, is
        unreadable, or is open in another process.
        """
        _check_geometry(volume_size, extent_size)
        extents = -(-volume_size // extent_size)
        pages = max(1, -(-extents // BITS_PER_PAGE))

        def initial() -> list[bytes]:
            bits = bytearray(b"\xff" * (pages * _PAYLOAD) if create_dirty else pages * _PAYLOAD)
            _mask_tail(bits, extents)
            return [
                _page_image(i, bytes(bits[i * _PAYLOAD : (i + 1) * _PAYLOAD])) for i in range(pages)
            ]

        geometry = {"extent_size": extent_size, "volume_size": volume_size}
        file = PageFile.open(path, "bitmap", MAGIC, geometry, initial)
        try:
            raw = file.read(0, pages)
        except OSError as exc:
            file.close()
            raise ConfigError(f"bitmap {file.name}: unreadable ({exc.strerror})") from exc
        bits = bytearray(pages * _PAYLOAD)
        torn: list[int] = []
        for index in range(pages):
            image = raw[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
            payload = image[:_PAYLOAD] if len(image) == PAGE_SIZE else b""
            if payload and image == _page_image(index, payload):
                bits[index * _PAYLOAD : (index + 1) * _PAYLOAD] = payload
            else:  # torn (or missing): over-report, the whole page dirty
                torn.append(index)
                bits[index * _PAYLOAD : (index + 1) * _PAYLOAD] = b"\xff" * _PAYLOAD
        _mask_tail(bits, extents)
        bitmap = cls(file, volume_size, extent_size, bits)
        bitmap._torn_pages = len(torn)
        bitmap._changed.update(torn)  # rewritten whole at the first flush
        return bitmap

    @property
    def extent_size(self) -> int:
        return self._extent_size

    @property
    def volume_size(self) -> int:
        return self._volume_size

    def _extent_range(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length <= 0 or offset + length > self._volume_size:
            raise ValueError(
                f"range offset={offset} length={length} outside volume size={self._volume_size}"
            )
        return offset // self._extent_size, (offset + length - 1) // self._extent_size

    # -- bits, in memory ------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> bool:
        """Mark the extents touched by ``[offset, offset+length)`` dirty, in memory.

        Returns True if a :meth:`flush` is needed before the range is dirty on disk: a bit was
        newly set, or a page of the range is still waiting to be written or being written.
        """
        if length == 0:
            return False
        first, last = self._extent_range(offset, length)
        with self._lock:
            self._file.check()
            self._apply(first, last, True)
            pending = self._changed | self._inflight
            return any(p in pending for p in _pages(first, last))

    def clear(self, offset: int, length: int) -> int:
        """Mark in sync the extents *wholly inside* the range (after resyncing them).

        Memory only, flushed lazily.  The caller must not clear an extent that a write touched
        since the resync read it.  Returns how many extents were dirty.
        """
        if length == 0:
            return 0
        self._extent_range(offset, length)
        end = offset + length
        first = -(-offset // self._extent_size)
        # The volume's short last extent counts as whole when the range reaches the end.
        last = self._extents - 1 if end == self._volume_size else end // self._extent_size - 1
        with self._lock:
            self._file.check()
            return -self._apply(first, last, False) if first <= last else 0

    def mark_all(self) -> None:
        """Every extent dirty: the next resync copies the whole volume (memory only)."""
        with self._lock:
            self._file.check()
            self._apply(0, self._extents - 1, True)

    def is_dirty(self, offset: int, length: int) -> bool:
        """True if any extent touched by the range is dirty (in memory)."""
        if length == 0:
            return False
        first, last = self._extent_range(offset, length)
        with self._lock:
            window, _, mask = self._window(first, last)
            return bool(window & mask)

    def dirty_extents(self) -> Iterator[tuple[int, int]]:
        """Dirty extents merged into runs, as ``(offset, length)`` in bytes, in offset order;
        a snapshot taken at the call."""
        with self._lock:
            snapshot = bytes(self._bits)
        return self._runs(snapshot)

    def _runs(self, bits: bytes) -> Iterator[tuple[int, int]]:
        start = -1  # first extent of the open run, or -1
        for base in range(0, len(bits), _SCAN_CHUNK):
            chunk = bits[base : base + _SCAN_CHUNK]
            if chunk == _ZERO_CHUNK[: len(chunk)]:  # the common case, at C speed
                if start >= 0:
                    yield self._run(start, base * 8)
                    start = -1
                continue
            word, bit, width = int.from_bytes(chunk, "little"), 0, len(chunk) * 8
            while bit < width:
                rest = word >> bit
                if start < 0:
                    if not rest:
                        break
                    bit += (rest & -rest).bit_length() - 1  # skip the clear bits
                    start = base * 8 + bit
                else:
                    bit += (rest ^ (rest + 1)).bit_length() - 1  # skip the set bits
                    if bit < width:
                        yield self._run(start, base * 8 + bit)
                        start = -1
        if start >= 0:
            yield self._run(start, self._extents)

    def _run(self, first: int, end: int) -> tuple[int, int]:
        offset = first * self._extent_size
        return offset, min(end * self._extent_size, self._volume_size) - offset

    @property
    def dirty_bytes(self) -> int:
        """Bytes the next resync would copy (the short last extent counted as it is)."""
        with self._lock:
            total = self._count * self._extent_size
            last = self._extents - 1
            if (self._bits[last >> 3] >> (last & 7)) & 1:
                total -= self._extents * self._extent_size - self._volume_size
            return total

    def _window(self, first: int, last: int) -> tuple[int, int, int]:
        """The bytes holding bits first..last as an int, its first byte, and the bits' mask."""
        b0, b1 = first >> 3, last >> 3
        window = int.from_bytes(self._bits[b0 : b1 + 1], "little")
        return window, b0, ((1 << (last - first + 1)) - 1) << (first - (b0 << 3))

    def _apply(self, first: int, last: int, value: bool) -> int:
        """Set or clear bits first..last; returns the change in the count of set bits."""
        before, b0, mask = self._window(first, last)
        after = before | mask if value else before & ~mask
        if after == before:
            return 0
        self._bits[b0 : (last >> 3) + 1] = after.to_bytes((last >> 3) - b0 + 1, "little")
        delta = after.bit_count() - before.bit_count()
        self._count += delta
        self._changed.update(_pages(first, last))
        return delta

    # -- persistence, blocking ------------------------------------------------------------

    def flush(self) -> int:
        """Write every changed page whole and fdatasync (blocking: run it in a thread).

        Covers every :meth:`mark` that returned before the call.  Returns the number of pages
        written (0: nothing had changed, no I/O).  BlockError if the bitmap could not be made
        durable, now or at any earlier flush.
        """
        with self._flush_lock:
            with self._lock:
                self._file.check()
                pages = sorted(self._changed)
                self._changed.clear()
                self._inflight = set(pages)
                step = _PAYLOAD
                images = [(p, _page_image(p, self._bits[p * step : (p + 1) * step])) for p in pages]
            try:
                if images:
                    self._file.write(images)
            except BlockError:
                with self._lock:
                    self._changed.update(pages)
                raise
            finally:
                with self._lock:
                    self._inflight = set()
            with self._lock:
                self._flushes += bool(images)
                self._pages_written += len(images)
            return len(images)

    def close(self) -> None:
        """Flush what changed, then release the file (blocking; idempotent)."""
        try:
            if not self._file.closed and self._file.failed is None:
                self.flush()
        finally:
            with self._lock:
                self._file.close()

    def statistics(self) -> BitmapStatistics:
        dirty_bytes = self.dirty_bytes
        with self._lock:
            return BitmapStatistics(
                extent_size=self._extent_size,
                extents=self._extents,
                dirty_extents=self._count,
                dirty_bytes=dirty_bytes,
                pending_pages=len(self._changed | self._inflight),
                flushes=self._flushes,
                pages_written=self._pages_written,
                torn_pages=self._torn_pages,
            )

    def __repr__(self) -> str:
        return f"DirtyBitmap({self._file.name!r}, extents={self._extents}, dirty={self._count})"


def _pages(first: int, last: int) -> range:
    """The data pages holding bits first..last."""
    return range((first >> 3) // _PAYLOAD, (last >> 3) // _PAYLOAD + 1)


def _mask_tail(bits: bytearray, extents: int) -> None:
    """Zero the bits past the last extent (a torn page is read back as all ones)."""
    byte, bit = divmod(extents, 8)
    if bit:
        bits[byte] &= (1 << bit) - 1
        byte += 1
    bits[byte:] = bytes(len(bits) - byte)


def check_extent_size(what: str, extent_size: int) -> None:
    """ConfigError unless ``extent_size`` is a power of two in [MIN, MAX]_EXTENT_SIZE."""
    if (
        not isinstance(extent_size, int)
        or not MIN_EXTENT_SIZE <= extent_size <= MAX_EXTENT_SIZE
        or extent_size & (extent_size - 1)
    ):
        raise ConfigError(
            f"{what} extent_size={extent_size!r} must be a power of two between "
            f"{MIN_EXTENT_SIZE} and {MAX_EXTENT_SIZE}"
        )


def _check_geometry(volume_size: int, extent_size: int) -> None:
    check_extent_size("bitmap", extent_size)
    if not isinstance(volume_size, int) or volume_size <= 0:
        raise ConfigError(f"bitmap volume_size={volume_size!r} must be a positive int")
    needed = -(-volume_size // extent_size) // 8
    if needed > MAX_BITMAP_BYTES:
        raise ConfigError(
            f"bitmap for volume_size={volume_size} at extent_size={extent_size} needs "
            f"{needed} bytes, over MAX_BITMAP_BYTES={MAX_BITMAP_BYTES}; use larger extents"
        )
