"""FileStore: the block layer at the bottom of every server stack — one file per volume.

A volume's data is one file of exactly the volume's size (``DESIGN.md``, "Commands"), created
sparse with ``ftruncate`` so a new 1 TiB volume costs no disk.  Bios map onto positional
syscalls on one descriptor: READ is ``preadv`` straight into the segment buffers, WRITE is
``pwritev`` straight from them — a bio's scattered segments become one iovec list, no joining
copy.  TRIM punches a hole; WRITE_ZEROES punches one too unless NO_HOLE asks for the range to
stay allocated (then ``FALLOC_FL_ZERO_RANGE``); where the filesystem cannot, zeros are written.

Durability: FLUSH is ``fdatasync``; FUA is an ``fdatasync`` after the write and PREFLUSH one
before it.  All of them go through *group commit*: a sync that starts covers every write
completed before it started, so a FLUSH that arrives while a sync is running waits for the
*next* one (the running one may have started before the writes this FLUSH must cover), and
every FLUSH arriving meanwhile shares that next sync.  Twenty concurrent flushes cost two
fdatasyncs, not twenty.  If an fdatasync ever fails, the store refuses every later write and
flush with EIO: after a failed fsync Linux may drop the dirty pages and report success next
time (PostgreSQL's "fsyncgate"), so a later success would be a lie about data already lost.

Writes up to :data:`INLINE_WRITE_BYTES` (1 MiB) go to the page cache with ``pwritev`` on the
event loop: buffered Linux has no ``RWF_NOWAIT`` for them, but a write into the page cache
costs less than a thread handoff, which takes a wakeup and two scheduler passes.  If
one ever takes longer than :data:`INLINE_WRITE_MAX_S` (writeback throttling, a slow disk), the
store sends its writes to threads for :data:`INLINE_WRITE_PAUSE_S`, so a sick disk stalls the
loop once, briefly, not continuously.  Cached reads are tried inline too (``RWF_NOWAIT``).
:meth:`FileStore.submit_nowait` offers both without a task: it completes what it can inline
and returns False for the rest (Linux's ``REQ_NOWAIT``, io_uring's inline attempt).
Every other blocking syscall runs in ``trio.to_thread.run_sync`` under one CapacityLimiter shared by
all stores in the Trio run (:data:`IO_THREADS`), so a slow disk never stalls the event loop —
and a thread, once started, is never abandoned: a cancelled submit still waits for its syscall,
and ``aclose`` waits for every submit in flight before closing the descriptor, so a late
``pwritev`` can never land on a reused descriptor number in some other file.

The store locks its file (``flock``, exclusive, non-blocking): two servers on the same data
directory fail at open with a ConfigError instead of corrupting each other.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable

import trio

from dst import chaos
from dst.block.bio import Bio, BioFlags, Op, validate_bio
from dst.block.fileio import (
    RWF_NOWAIT,
    preadv_all,
    preadv_cached,
    pwritev_all,
    zero_range,
)
from dst.block.layer import StoreCounters, StoreStatistics, closed_error
from dst.block.limits import Limits
from dst.errors import BlockError, ConfigError

__all__ = ["IO_THREADS", "FileStore"]

log = logging.getLogger("dst.block")

#: Threads doing disk syscalls at once, for all FileStores of a Trio run together: enough to
#: keep a device queue busy, few enough that a stuck disk cannot pile up unbounded threads.
IO_THREADS = 8

#: Writes up to this size go to the page cache inline (see the module docstring).  Measured
#: here: a pwritev into the page cache takes 7 us for 64 KiB, 35 us for 256 KiB (nbdcopy's
#: request) and 128 us for 1 MiB — less CPU than a thread handoff (trio's start_thread_soon,
#: the thread's name, run_sync_soon back, two wakeups), and a stall of the loop shorter than
#: one pass of a busy server.
INLINE_WRITE_BYTES = 1024 * 1024
#: An inline write slower than this means the kernel made us wait (dirty throttling pauses
#: run 10-200 ms; a busy VM's scheduling jitter of a few ms must not count)...
INLINE_WRITE_MAX_S = 0.010
#: ...so the store's writes use threads for this long before trying inline again.
INLINE_WRITE_PAUSE_S = 1.0

_PREFLUSH, _FUA = int(BioFlags.PREFLUSH), int(BioFlags.FUA)

_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("dst_file_limiter")


def _limiter() -> trio.CapacityLimiter:
    # Per Trio run (a RunVar), since trio primitives must not be shared between runs.
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(IO_THREADS)
        _LIMITER.set(limiter)
        return limiter


def _written(bio: Bio) -> None:
    if chaos.ARMED and bio.epoch == 0:
        # Epoch 0 on a WRITE reaching the store: a replication peer's write (or a resync
        # copy) on a secondary — a client's always carries its epoch.
        chaos.crash_point("secondary.after-write-before-fsync")


class _SyncRound:
    """One fdatasync that any number of flushes wait on (group commit)."""

    __slots__ = ("aborted", "done", "error", "started")

    def __init__(self) -> None:
        self.started = False
        self.aborted = False  # the leader was cancelled before the sync ran
        self.error: OSError | None = None
        self.done = trio.Event()


class FileStore:
    """A :class:`~dst.block.layer.BlockLayer` over one file of exactly ``size`` bytes."""

    def __init__(self, fd: int, path: str, size: int, limits: Limits) -> None:
        # Use FileStore.open(); this takes ownership of an open, locked, right-sized fd.
        self._fd = fd
        self._path = path
        self._size = size
        self._limits = limits
        self._counters = StoreCounters()
        self._inflight = 0
        self._closing = False
        self._idle: trio.Event | None = None
        self._running: _SyncRound | None = None
        self._next: _SyncRound | None = None
        self._sync_failure: OSError | None = None
        self._threads_until = 0.0  # trio.current_time() before which writes use threads

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        size: int,
        *,
        create: bool = True,
        limits: Limits | None = None,
    ) -> FileStore:
        """Open (or with ``create``, make sparse) the volume file; ConfigError if the file
        exists with another size, is not a regular file, or is in use by another store."""
        name = os.fspath(path)
        if limits is None:
            limits = Limits(page_size=max(mmap.PAGESIZE, 512))
        limits.validate()
        lbs = limits.logical_block_size
        if not isinstance(size, int) or size <= 0 or size % lbs:
            raise ConfigError(f"size={size!r} must be a positive multiple of {lbs}")
        flags = os.O_RDWR | os.O_CLOEXEC
        created = False
        try:
            try:
                fd = os.open(name, flags)
            except FileNotFoundError:
                if not create:
                    raise ConfigError(f"volume file {name} does not exist") from None
                fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
        except OSError as exc:
            raise ConfigError(f"cannot open volume file {name}: {exc.strerror}") from exc
        try:
            cls._prepare(fd, name, size, created)
        except BaseException as exc:
            os.close(fd)
            if created:
                os.unlink(name)
            if isinstance(exc, OSError):
                raise ConfigError(f"cannot open volume file {name}: {exc.strerror}") from exc
            raise
        return cls(fd, name, size, limits)

    @staticmethod
    def _prepare(fd: int, name: str, size: int, created: bool) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"volume file {name} is in use by another store") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"volume file {name} is not a regular file (mode={mode:o})")
        if created:
            try:
                os.ftruncate(fd, size)
                # Make the new file itself durable, or a crash could lose it together with
                # writes that were acknowledged as synced into it.
                os.fsync(fd)
                dir_fd = os.open(os.path.dirname(name) or ".", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                raise ConfigError(f"cannot size volume file {name}: {exc.strerror}") from exc
            return
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ConfigError(f"volume file {name} is {actual} bytes, not the volume size={size}")

    def __repr__(self) -> str:
        return f"FileStore(path={self._path!r}, size={self._size})"

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def size(self) -> int:
        return self._size

    @property
    def path(self) -> str:
        return self._path

    def statistics(self) -> StoreStatistics:
        return self._counters.snapshot()

    async def submit(self, bio: Bio) -> None:
        if self._closing:
            raise closed_error(repr(self))
        self._inflight += 1
        try:
            validate_bio(bio, self._limits, self._size)
            await self._dispatch(bio)
        except BlockError:
            self._counters.errors += 1
            raise
        finally:
            self._inflight -= 1
            if self._inflight == 0 and self._idle is not None:
                # Only aclose creates _idle, so this fires once, when the store drains.
                self._idle.set()
        self._counters.count(bio)

    async def _dispatch(self, bio: Bio) -> None:
        op = bio.op
        if op is Op.FLUSH:
            await self._sync(bio)
            return
        if op is not Op.READ and self._sync_failure is not None:
            raise self._error(bio, self._sync_failure, errno.EIO, "an earlier fdatasync failed")
        flags = int(bio.flags)  # int tests: IntFlag's own __and__ is slow, and this is per bio
        if flags & _PREFLUSH:
            await self._sync(bio)
        fd = self._fd
        if op is Op.READ:
            views = bio.views()
            try:
                index, offset = preadv_cached(fd, views, bio.offset)
            except OSError as exc:
                raise self._error(bio, exc) from exc
            if index < len(views):
                rest = views[index:]
                await self._run(bio, lambda: preadv_all(fd, rest, offset))
            else:
                await trio.lowlevel.checkpoint()
        elif op is Op.WRITE:
            if bio.length <= INLINE_WRITE_BYTES and trio.current_time() >= self._threads_until:
                self._write_inline(bio)
            else:
                views = bio.views()
                await self._run(bio, lambda: pwritev_all(fd, views, bio.offset))
                _written(bio)
        else:
            keep = op is Op.WRITE_ZEROES and bool(flags & BioFlags.NO_HOLE)
            await self._run(
                bio, lambda: zero_range(fd, bio.offset, bio.length, keep_allocated=keep)
            )
        if flags & _FUA and op is not Op.READ:
            await self._sync(bio)

    def submit_nowait(self, bio: Bio) -> bool:
        """Complete ``bio`` now, without waiting, and return True — a READ the page cache
        holds whole, or a WRITE small enough to go inline (no PREFLUSH or FUA, inline writes
        not paused); return False, having changed nothing, for any other bio, which goes to
        :meth:`submit`.  Linux's ``REQ_NOWAIT``: a caller with many bios in flight (a server
        session) needs no task for the bios this completes."""
        if self._closing:
            raise closed_error(repr(self))
        op = bio.op
        if int(bio.flags) & (_PREFLUSH | _FUA):
            return False
        if op is Op.READ:
            if not RWF_NOWAIT:
                return False
        elif (
            op is not Op.WRITE
            or bio.length > INLINE_WRITE_BYTES
            or self._sync_failure is not None
            or trio.current_time() < self._threads_until
        ):
            return False
        try:
            validate_bio(bio, self._limits, self._size)
            if op is Op.READ:
                views = bio.views()
                try:
                    index, _ = preadv_cached(self._fd, views, bio.offset)
                except OSError as exc:
                    raise self._error(bio, exc) from exc
                if index < len(views):
                    return False  # part of it is on disk only: submit reads it all
            else:
                self._write_inline(bio)
        except BlockError:
            self._counters.errors += 1
            raise
        self._counters.count(bio)
        return True

    def _write_inline(self, bio: Bio) -> None:
        """A small WRITE into the page cache on the event loop; a slow one (the kernel
        throttled us) sends the store's writes to threads for a while."""
        start = trio.current_time()
        try:
            pwritev_all(self._fd, bio.views(), bio.offset)
        except OSError as exc:
            raise self._error(bio, exc) from exc
        took = trio.current_time() - start
        if took > INLINE_WRITE_MAX_S:
            self._threads_until = trio.current_time() + INLINE_WRITE_PAUSE_S
            log.info(
                "path=%s event=slow_inline_write took_ms=%.1f length=%d",
                self._path,
                took * 1000,
                bio.length,
            )
        _written(bio)

    async def _run(self, bio: Bio, fn: Callable[[], None]) -> None:
        try:
            await trio.to_thread.run_sync(fn, limiter=_limiter())
        except OSError as exc:
            raise self._error(bio, exc) from exc

    def _error(
        self, bio: Bio, exc: OSError, code: int | None = None, why: str | None = None
    ) -> BlockError:
        code = code if code is not None else (exc.errno or errno.EIO)
        detail = exc.strerror or str(exc)
        reason = f"{why}: {detail}" if why else detail
        return BlockError(
            code, f"{bio.op.name} offset={bio.offset} length={bio.length} on {self._path}: {reason}"
        )

    async def _sync(self, bio: Bio) -> None:
        """fdatasync covering every write completed before this call, with group commit."""
        if chaos.BROKEN and chaos.broken("skip-fsync"):
            await trio.lowlevel.checkpoint()  # broken build: "stable" without an fdatasync
            return
        while True:
            if self._sync_failure is not None:
                raise self._error(bio, self._sync_failure, errno.EIO, "an earlier fdatasync failed")
            mine = self._next
            if mine is None:
                mine = self._next = _SyncRound()
            # A running sync may have started before our caller's writes: wait it out.
            while not mine.started and self._running is not None:
                await self._running.done.wait()
            if not mine.started:
                await self._lead(mine)
            else:
                await mine.done.wait()
            if not mine.aborted:
                break
            # The leader was cancelled before its sync ran: nobody is covered; go again.
        if mine.error is not None:
            raise self._error(bio, mine.error, why="fdatasync failed")

    async def _lead(self, mine: _SyncRound) -> None:
        self._next = None
        self._running = mine
        mine.started = True
        fd = self._fd
        try:
            await trio.to_thread.run_sync(os.fdatasync, fd, limiter=_limiter())
            self._counters.syncs += 1
        except OSError as exc:
            self._counters.syncs += 1
            mine.error = exc
            self._sync_failure = exc
        except BaseException:
            mine.aborted = True
            raise
        finally:
            self._running = None
            mine.done.set()

    async def aclose(self) -> None:
        """Wait for the bios in flight, then close the file.  Unflushed writes stay in the
        page cache (they were never promised durable); FLUSH first for a clean shutdown."""
        self._closing = True
        # Shielded: the descriptor must not close under a running syscall, even if our
        # caller is cancelled; the wait is bounded by the syscalls already started.
        with trio.CancelScope(shield=True):
            if self._inflight:
                # One event for every aclose caller; submit sets it when the last bio leaves
                # (none can enter once _closing is set).
                if self._idle is None:
                    self._idle = trio.Event()
                await self._idle.wait()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        await trio.lowlevel.checkpoint()
