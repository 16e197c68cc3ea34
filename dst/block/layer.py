"""The block layer protocol: the interface of every box in a dst stack.

A block layer is what an nbdkit filter is over ``next`` or a device-mapper target over its
table: it has ``limits`` and a ``size``, completes bios with ``submit`` and releases what it
holds with ``aclose``.  A layer sees only the layer below it, through this same protocol, so
layers compose in any order: ``Fence → Replicated → FileStore`` on a server,
``Mirror → Remote`` on a client (``DESIGN.md``).

The contract, which ``tests/conformance/check.py`` checks for every layer:

- ``limits`` is what the layer can take in one bio *including everything below it*: a layer
  over ``below`` advertises ``own.stack(below.limits)``.  Callers split to it (with
  :func:`submit_split`) before submitting; a layer that has its own limit and is handed a bio
  that does not fit splits it too, and never rejects a valid bio because of its shape.
- ``submit(bio)`` returns when the bio is complete — a READ's segments are filled, a WRITE is
  done (and on stable storage if it carried FUA) — or raises :class:`~dst.errors.BlockError`
  with the errno that goes on the wire.  Bios may be submitted concurrently; bios whose ranges
  overlap have no defined order unless the caller orders them.
- Validation (:func:`~dst.block.bio.validate_bio`) happens once, at the edge where a request
  enters the stack.  Middle layers rely on it.  The stores at the bottom (MemoryStore,
  FileStore) validate again in ``submit``, because nothing guarantees an edge sits above them.
- ``aclose()`` is idempotent; a ``submit`` after it raises BlockError(ESHUTDOWN).

A layer may also offer ``start(bio)`` (:class:`StartingLayer`): it sends the bio on its way and
returns a :class:`Pending` whose callbacks run when the bio completes — the kernel's
``bi_end_io`` rather than a task that waits.  An edge with many bios in flight (the NBD
bridge) then needs no task per bio; ``submit`` stays the contract every layer keeps.  Bios
started under a :class:`Plug` may wait in their layer until the plug is flushed, so that a
burst started in one pass leaves in one send — the kernel's ``blk_plug``.

A layer may also offer ``submit_nowait(bio) -> bool`` (Linux's ``REQ_NOWAIT``, io_uring's
inline attempt): complete the bio at once, without waiting for anything, and return True — or
return False having changed nothing, and the caller submits it.  FileStore completes cached
reads and small writes so; the Fence passes to it.  A server session completes such requests
in its reader, with no task per request.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import trio

from dst.block.bio import Bio, Op
from dst.block.limits import Limits
from dst.block.split import split
from dst.errors import BlockError

__all__ = [
    "BlockLayer",
    "Completion",
    "Pending",
    "Plug",
    "StartingLayer",
    "StoreCounters",
    "StoreStatistics",
    "closed_error",
    "submit_in_task",
    "submit_split",
]


@runtime_checkable
class BlockLayer(Protocol):
    """Every box in the stack: an nbdkit filter over ``next``, a dm target over its table."""

    @property
    def limits(self) -> Limits:
        """What one bio submitted here may look like, for this layer and all below it."""
        ...

    @property
    def size(self) -> int:
        """The device size in bytes, a multiple of ``limits.logical_block_size``."""
        ...

    async def submit(self, bio: Bio) -> None:
        """Complete ``bio`` (fill a READ's segments) or raise BlockError."""
        ...

    async def aclose(self) -> None:
        """Release what the layer holds; idempotent."""
        ...


class Pending(Protocol):
    """A started bio: ``error`` is its outcome once ``then``'s callbacks run."""

    error: BlockError | None

    def then(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (which must not raise or wait) when the bio has completed; at
        once if it already has."""
        ...


class Completion:
    """A Pending that its layer finishes: :meth:`finish` sets the outcome and runs the
    callbacks once."""

    __slots__ = ("_callbacks", "done", "error")

    def __init__(self) -> None:
        self.error: BlockError | None = None
        self.done = False
        self._callbacks: list[Callable[[], None]] = []

    def then(self, callback: Callable[[], None]) -> None:
        if self.done:
            callback()
        else:
            self._callbacks.append(callback)

    def finish(self, error: BlockError | None = None) -> None:
        self.error, self.done = error, True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


@runtime_checkable
class StartingLayer(BlockLayer, Protocol):
    """A layer that can also start a bio and call back on its completion."""

    @property
    def can_start(self) -> bool:
        """False where a layer passes bios to one that cannot start them."""
        ...

    async def start(self, bio: Bio, plug: Plug | None = None) -> Pending:
        """Send ``bio`` (valid) on its way or raise BlockError; the bio's buffers belong to
        the layer until the Pending's callbacks run.  With ``plug``, the layer may hold the
        bio back until ``plug.flush()``."""
        ...


class Plug:
    """What bios started under it left held back in their layers, until :meth:`flush` —
    Linux's ``blk_plug``.  One caller owns a plug (the NBD bridge's reader, per connection):
    it starts a burst of bios, each layer holding what it would send, and flushes before it
    waits for anything — the socket, a slot, a started bio's completion — so that the burst
    leaves in one gathered write instead of a send per bio."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        #: Per sender (a layer's bound method), what it holds, in the order started.
        self._held: dict[Callable[[list[Any]], Awaitable[None]], list[Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, send: Callable[[list[Any]], Awaitable[None]], items: list[Any]) -> None:
        """Keep ``items`` until the flush, which hands them to ``send`` with those held
        before for the same sender."""
        held = self._held.get(send)
        if held is None:
            self._held[send] = items
        else:
            held.extend(items)

    async def flush(self) -> None:
        """Send everything held, each sender's items in one call."""
        while self._held:
            send = next(iter(self._held))
            await send(self._held.pop(send))


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Counts since a store was opened (``FileStore.statistics()``, ``MemoryStore``'s too).

    ``flushes`` counts FLUSH bios; ``syncs`` counts the fdatasync calls actually made, for
    FLUSH, FUA and PREFLUSH together — with group commit it is usually far smaller.
    """

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    trims: int = 0
    write_zeroes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    syncs: int = 0
    errors: int = 0


def closed_error(what: str) -> BlockError:
    """The error a layer raises for a bio submitted after ``aclose``.

    ESHUTDOWN is what NBD servers answer while shutting down, and it maps onto the wire
    unchanged; trio's ClosedResourceError would escape the BlockError contract.
    """
    return BlockError(errno.ESHUTDOWN, f"{what} is closed")


async def submit_in_task(
    layer: BlockLayer, bio: Bio, tasks: trio.Nursery | None, plug: Plug | None, what: str
) -> Completion:
    """Start ``bio`` the slow way: ``layer.submit(bio)`` in a task of ``tasks``, which
    finishes the Completion returned — a StartingLayer's path for what it cannot start
    itself.  What ``plug`` holds leaves first (it was started before ``bio``).  Without a
    nursery (``what``, the layer, is not running) the bio is refused with ESHUTDOWN."""
    if plug:
        await plug.flush()
    if tasks is None:
        raise BlockError(errno.ESHUTDOWN, f"{what} is not running")
    done = Completion()
    tasks.start_soon(_submit_then_finish, layer, bio, done, what)
    return done


async def _submit_then_finish(layer: BlockLayer, bio: Bio, done: Completion, what: str) -> None:
    error: BlockError | None = BlockError(errno.ESHUTDOWN, f"{what} stopped")
    try:
        await layer.submit(bio)
        error = None
    except BlockError as exc:
        error = exc
    finally:
        done.finish(error)


async def submit_split(below: BlockLayer, bio: Bio) -> None:
    """Split ``bio`` to ``below.limits`` and submit the pieces to ``below`` concurrently.

    This is what an edge does after :func:`~dst.block.bio.validate_bio`, and what a layer does
    when it must split for its own limits.  The bio completes when every piece has completed
    (the transaction refcount of DESIGN.md); if pieces fail, the first failure to arrive is
    raised, after the other pieces have finished — so when this returns or raises, nothing of
    the bio is still in flight below.
    """
    pieces = split(bio, below.limits)
    if len(pieces) == 1:
        await below.submit(pieces[0])
        return
    first_error: list[BlockError] = []

    async def run(piece: Bio) -> None:
        try:
            await below.submit(piece)
        except BlockError as exc:
            if not first_error:
                first_error.append(exc)

    async with trio.open_nursery() as nursery:
        for piece in pieces:
            nursery.start_soon(run, piece)
    if first_error:
        raise first_error[0]


class StoreCounters:
    """The mutable counters behind :class:`StoreStatistics`, kept by a store."""

    __slots__ = (
        "bytes_read",
        "bytes_written",
        "errors",
        "flushes",
        "reads",
        "syncs",
        "trims",
        "write_zeroes",
        "writes",
    )

    def __init__(self) -> None:
        self.reads = self.writes = self.flushes = self.trims = self.write_zeroes = 0
        self.bytes_read = self.bytes_written = self.syncs = self.errors = 0

    def count(self, bio: Bio) -> None:
        """Count one completed bio."""
        if bio.op is Op.READ:
            self.reads += 1
            self.bytes_read += bio.length
        elif bio.op is Op.WRITE:
            self.writes += 1
            self.bytes_written += bio.length
        elif bio.op is Op.FLUSH:
            self.flushes += 1
        elif bio.op is Op.TRIM:
            self.trims += 1
        else:
            self.write_zeroes += 1

    def snapshot(self) -> StoreStatistics:
        return StoreStatistics(
            reads=self.reads,
            writes=self.writes,
            flushes=self.flushes,
            trims=self.trims,
            write_zeroes=self.write_zeroes,
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
            syncs=self.syncs,
            errors=self.errors,
        )
