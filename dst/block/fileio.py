"""Positional vectored I/O on one descriptor, whole: the syscalls under FileStore.

``preadv``/``pwritev`` may move fewer bytes than asked and take at most :data:`IOV_MAX`
buffers; the helpers here loop until the whole iovec list is done.  :func:`preadv_cached`
reads only what the page cache holds (``RWF_NOWAIT``), for the event loop;
:func:`zero_range` makes a range read as zeros with the cheapest ``fallocate`` mode the
filesystem takes, or by writing zeros.  All raise OSError; none of them know about bios.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

__all__ = ["IOV_MAX", "RWF_NOWAIT", "preadv_all", "preadv_cached", "pwritev_all", "zero_range"]

#: Linux's UIO_MAXIOV: preadv/pwritev fail with EINVAL beyond this many buffers, so longer
#: segment lists go down in groups of this size.
IOV_MAX = 1024

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
#: fallocate errnos meaning "this filesystem cannot do that mode": fall back to writing zeros.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS})
_ZERO_CHUNK = memoryview(bytes(1 << 20))
_fallocate_fn: Callable[[int, int, int, int], int] | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc ``fallocate(2)`` with a mode (``os.posix_fallocate`` has none); raises OSError."""
    global _fallocate_fn
    if _fallocate_fn is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
        except (OSError, AttributeError):
            raise OSError(errno.ENOSYS, "fallocate is not available") from None
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate_fn = fn
    if _fallocate_fn(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _advance(views: list[memoryview], index: int, done: int) -> int:
    """Consume ``done`` bytes of ``views`` from ``index``; return the new index (the partly
    consumed view, if any, is replaced by its remainder)."""
    while done and done >= len(views[index]):
        done -= len(views[index])
        index += 1
    if done:
        views[index] = views[index][done:]
    return index


def _whole(
    call: Callable[[int, list[memoryview], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
    none_moved: str,
) -> None:
    """``call`` (os.preadv or os.pwritev) until all of ``views`` is done."""
    index = 0
    while index < len(views):
        count = call(fd, views[index : index + IOV_MAX], offset)
        if count == 0:
            raise OSError(errno.EIO, none_moved)
        offset += count
        index = _advance(views, index, count)


def preadv_all(fd: int, views: list[memoryview], offset: int) -> None:
    # The file is exactly the volume's size: nothing read means someone truncated it.
    _whole(os.preadv, fd, views, offset, "unexpected end of file")


#: preadv2 flag: fail with EAGAIN instead of waiting for the disk (0 where the OS lacks it).
RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


def preadv_cached(fd: int, views: list[memoryview], offset: int) -> tuple[int, int]:
    """Read what the page cache holds, on the event loop, never waiting for the disk
    (``RWF_NOWAIT``); returns how far it got as (index into views, offset).  A handoff to a
    worker thread costs far more than a cached 4 KiB read, so reads try this first."""
    index = 0
    while RWF_NOWAIT and index < len(views):
        try:
            count = os.preadv(fd, views[index : index + IOV_MAX], offset, RWF_NOWAIT)
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            break
        if count == 0:
            break
        offset += count
        index = _advance(views, index, count)
    return index, offset


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    _whole(os.pwritev, fd, views, offset, "pwritev wrote nothing")


def _pwrite_zeros(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        count = os.pwrite(fd, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), end - offset)], offset)
        if count == 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        offset += count


def zero_range(fd: int, offset: int, length: int, *, keep_allocated: bool) -> None:
    """Make the range read as zeros: punch a hole (unless ``keep_allocated``), else zero it
    in place, else write zeros — each step only if the filesystem refused the one before."""
    modes = [_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE]
    if not keep_allocated:
        modes.insert(0, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
    for mode in modes:
        try:
            _fallocate(fd, mode, offset, length)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
    _pwrite_zeros(fd, offset, length)
