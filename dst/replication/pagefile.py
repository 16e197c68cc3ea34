"""PageFile: the on-disk layout shared by the dirty bitmap and the activity log.

Both are small metadata files beside a volume, written in whole pages of :data:`PAGE_SIZE`
bytes — a filesystem block, so a page write never straddles two blocks and a torn write is
confined to the page being written (each user checks its pages with a crc32c of its own).

- Page 0 is a header: magic, format version, page size, the geometry the file was made for
  (named u64 fields: extent size, volume size, ...), and a crc32c.  It is written once, with
  the whole file: a temporary file made complete, fsynced, renamed into place, the directory
  fsynced — so no crash leaves half a file.  A header that differs from the one the opener
  expects is a ConfigError naming what differs: a bitmap of another volume or size would
  describe the wrong extents.
- Data page ``i`` is file page ``1 + i``.  :meth:`PageFile.write` writes whole aligned pages
  (contiguous ones in one ``pwritev``) and then ``fdatasync`` s; the file never changes size
  after creation, so ``fdatasync`` is enough.
- The file is ``flock`` ed, so two servers on one data directory fail at open instead of
  corrupting each other's metadata (as FileStore does for the data file).
- After a failed write or fdatasync every later use raises EIO: Linux may drop the dirty pages
  and report success next time (PostgreSQL's "fsyncgate"), and a later success would let the
  caller acknowledge writes on a lie.

Every call here blocks on disk I/O; callers run them in ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Final

import crc32c

from dst.block.fileio import IOV_MAX
from dst.block.layer import closed_error
from dst.errors import BlockError, ConfigError

__all__ = ["FORMAT_VERSION", "PAGE_SIZE", "PageFile"]

#: The unit of metadata I/O: one filesystem block.
PAGE_SIZE: Final = 4096
FORMAT_VERSION: Final = 1
_CRC = struct.Struct("<I")


class PageFile:
    """One open metadata file; see the module docstring."""

    def __init__(self, name: str, what: str, fd: int) -> None:
        self.name = name
        self._what = what
        self._fd = fd
        self.closed = False
        self.failed: OSError | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        what: str,
        magic: bytes,
        geometry: dict[str, int],
        initial: Callable[[], list[bytes]],
    ) -> PageFile:
        """Open (or make, with the data pages ``initial()``) the file; blocking."""
        name = os.fspath(path)
        layout = f"<8sII{len(geometry)}Q"
        fields = struct.pack(layout, magic, FORMAT_VERSION, PAGE_SIZE, *geometry.values())
        header = (fields + _CRC.pack(crc32c.crc32c(fields))).ljust(PAGE_SIZE, b"\0")
        if not os.path.exists(name):
            _create(name, what, [header, *initial()])
        try:
            fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{what} {name}: cannot open ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found = os.pread(fd, PAGE_SIZE, 0)
        except OSError as exc:
            os.close(fd)
            busy = isinstance(exc, BlockingIOError)
            reason = "in use by another process" if busy else f"unreadable ({exc.strerror})"
            raise ConfigError(f"{what} {name}: {reason}") from None
        if found != header:
            os.close(fd)
            raise ConfigError(f"{what} {name}: {_header_mismatch(found, fields, geometry)}")
        return cls(name, what, fd)

    def read(self, first: int, count: int) -> bytes:
        """Data pages ``first..first+count-1`` (shorter if the file is); blocking."""
        return os.pread(self._fd, count * PAGE_SIZE, (1 + first) * PAGE_SIZE)

    def write(self, pages: list[tuple[int, bytes]]) -> None:
        """Write whole data pages (index, image), then fdatasync; blocking.  BlockError on
        failure, and on every later call."""
        self.check()
        runs: list[tuple[int, list[bytes]]] = []  # contiguous pages: one pwritev each
        for index, image in pages:
            if runs and index == runs[-1][0] + len(runs[-1][1]) and len(runs[-1][1]) < IOV_MAX:
                runs[-1][1].append(image)
            else:
                runs.append((index, [image]))
        try:
            for first, images in runs:
                written = os.pwritev(self._fd, images, (1 + first) * PAGE_SIZE)
                if written != len(images) * PAGE_SIZE:
                    raise OSError(errno.EIO, f"short write ({written} bytes)")
            os.fdatasync(self._fd)
        except OSError as exc:
            self.failed = exc
            raise BlockError(exc.errno or errno.EIO, f"{self._what} {self.name}: {exc}") from exc

    def check(self) -> None:
        if self.closed:
            raise closed_error(f"{self._what} {self.name}")
        if self.failed is not None:
            raise BlockError(errno.EIO, f"{self._what} {self.name}: failed ({self.failed})")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)


def _header_mismatch(found: bytes, fields: bytes, geometry: dict[str, int]) -> str:
    size = len(fields)
    if len(found) < size + _CRC.size or found[:8] != fields[:8]:
        return f"not this kind of file (magic={found[:8]!r})"
    if _CRC.unpack_from(found, size)[0] != crc32c.crc32c(found[:size]):
        return "header crc32c mismatch"
    values = struct.unpack_from(f"<8sII{len(geometry)}Q", found)
    if values[1:3] != (FORMAT_VERSION, PAGE_SIZE):
        return f"format version={values[1]} page_size={values[2]} is not this dst's"
    made = " ".join(f"{k}={v}" for k, v in zip(geometry, values[3:], strict=True))
    asked = " ".join(f"{k}={v}" for k, v in geometry.items())
    return f"made for {made}, not {asked}" if made != asked else "header page damaged"


def _create(name: str, what: str, pages: list[bytes]) -> None:
    tmp = f"{name}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(b"".join(pages))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name)
        dir_fd = os.open(os.path.dirname(name) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise ConfigError(f"{what} {name}: cannot create ({exc.strerror})") from exc
