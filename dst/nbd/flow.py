"""What bounds one NBD connection's transmission phase (the bridge's, :mod:`dst.nbd.bridge`):
FIFO byte budgets for what requests in flight pin, and the connection's bytes with a stall
deadline on every transfer that may wait for the client."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable

import trio

from dst.nbd import protocol as p
from dst.nbd import transmission as tx
from dst.nbd.transmission import Request
from dst.net.stream import ByteStream

__all__ = ["STALL_TIMEOUT_S", "Budget", "Wire"]

#: A client that leaves a reply unread or a WRITE payload unsent this long is dropped: it holds
#: budget that every connection shares (a slowloris on the data path).
STALL_TIMEOUT_S = 60.0


class Budget:
    """A FIFO byte budget: ``acquire(n)`` waits until ``n`` bytes are free."""

    def __init__(self, total: int) -> None:
        self._free, self._waiters = total, deque[tuple[int, trio.Event]]()

    def acquire_nowait(self, n: int) -> bool:
        """Take ``n`` bytes if they are free and nobody waits ahead; False otherwise."""
        if self._waiters or n > self._free:
            return False
        self._free -= n
        return True

    async def acquire(self, n: int) -> None:
        if not n:  # FLUSH and CACHE hold nothing: no reason to queue behind others
            return await trio.lowlevel.checkpoint()
        entry = (n, trio.Event())
        self._waiters.append(entry)
        self.release(0)  # granted at once if nobody waits ahead and n bytes are free
        try:
            await entry[1].wait()
        except BaseException:  # cancelled: give back what was granted, or leave the queue
            if not entry[1].is_set():
                self._waiters.remove(entry)
            self.release(n if entry[1].is_set() else 0)  # 0: wake whoever waited behind us
            raise

    def release(self, n: int) -> None:
        self._free += n
        while self._waiters and self._waiters[0][0] <= self._free:
            size, event = self._waiters.popleft()
            self._free -= size
            event.set()


class Wire(ByteStream):
    """One connection's transmission bytes (starting with any the client pipelined behind its
    last option): request headers from the buffer, payloads straight into the bio's buffer,
    replies as one ``writev``.  A client that stalls a payload or a reply for
    STALL_TIMEOUT_S has broken the connection.  A reply's deadline is a cancel scope around a
    send that must wait; a payload's is kept by :meth:`watch_payloads` (a cancel scope per
    payload was 14 % of the bridge's Python time under nbdcopy), and a payload already in the
    buffer has none."""

    def __init__(self, stream: trio.abc.Stream, *, initial: bytes = b"") -> None:
        super().__init__(stream, initial=initial)
        self.send_stall_s = STALL_TIMEOUT_S
        self._payload_since: float | None = None  # a payload is arriving, since then
        self._stalled = ""  # why watch_payloads closed the stream

    async def read_header(self) -> Request | None:
        """The next request, or None at a clean end of stream."""
        raw = await self.read_first(p.REQUEST.size, "request header")
        return None if raw is None else tx.parse_request(raw)

    async def read_payload(self, view: memoryview) -> None:
        if self.buffered >= len(view):
            return await self.read_into([view], "a WRITE payload")
        await self._watched(self.read_into([view], "a WRITE payload"))

    async def skip_payload(self, length: int) -> None:
        await self._watched(self.skip(length, "a WRITE payload"))

    async def _watched(self, transfer: Awaitable[None]) -> None:
        """A payload transfer that :meth:`watch_payloads` drops if it outlasts the limit."""
        self._payload_since = trio.current_time()
        try:
            await transfer
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._stalled:
                raise trio.BrokenResourceError(self._stalled) from None
            raise
        finally:
            self._payload_since = None

    async def watch_payloads(
        self, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A task of the connection, cancelled through the scope it starts with: close the
        stream when a payload has been arriving for STALL_TIMEOUT_S (checked every quarter of
        it, so it is dropped between 1 and 1.25 times the limit)."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                await trio.sleep(STALL_TIMEOUT_S / 4)
                since = self._payload_since
                if since is not None and trio.current_time() - since >= STALL_TIMEOUT_S:
                    self._stalled = f"WRITE payload not sent for {STALL_TIMEOUT_S} s"
                    await trio.aclose_forcefully(self.stream)
                    return

    async def send_reply(self, *parts: bytes | memoryview) -> None:
        message = [part for part in parts if len(part)]
        try:
            if self._sock is not None:  # each wait for the socket is bounded (send_stall_s)
                return await self.send_parts(message)
            with trio.fail_after(STALL_TIMEOUT_S):  # TLS: no writev, one deadline per reply
                await self.send_parts(message)
        except trio.TooSlowError:
            raise trio.BrokenResourceError(f"reply not read for {STALL_TIMEOUT_S} s") from None
