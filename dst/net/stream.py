"""ByteStream: a Trio stream read and written for a data path, shared by every protocol.

Small reads (a dst frame head, an NBD request header) come out of one buffer as memoryviews;
payloads are not buffered: ``read_into`` copies what already arrived and ``readv``s the rest
straight into the caller's buffers, IOV_MAX at a time.

Writes are coalesced: a message's parts join the stream's outgoing queue, and one sender at a
time (the *flusher*) hands everything queued so far to the kernel as one ``writev`` — the
replies of a burst of requests (32 fio requests in flight, 64 frames to a server) cost one
syscall and one wakeup of the peer, not one each.  The flusher sends what is queued at once;
when the stream's owner has other requests in flight (:attr:`ByteStream.in_flight`) it then
yields one pass, so the replies woken by the same burst queue behind it, and sends those in one
more ``writev`` before handing over (a waiter whose message is still queued takes over).
Messages never interleave (a message's parts are queued together), and a sender returns only
once its message is in the kernel (by itself or by the flusher ahead of it): a peer that stops
reading holds its senders, and their buffers, as TCP backpressure.

The data path is where a request's cost is counted in scheduler passes, so on a plain socket
the syscalls go straight to the descriptor (non-blocking, as Trio made it) and wait with
``trio.lowlevel.wait_readable``/``wait_writable`` only when the kernel says EAGAIN: a read that
finds data, or a send that fits, does not yield to the scheduler (Trio's socket methods
checkpoint on every call; measured, that was a third of the passes of a 4 KiB request).  Loops
over this stream still yield whenever the socket is drained or full, and the protocols bound
how much one peer can make us do in between (in-flight slots).  Over TLS
(``trio.SSLStream``) there is no ``readv``/``writev``: the same interface falls back to
``receive_some``/``send_all``, one copy each way (TLS copies anyway).

A reader that finds many messages buffered ends its pass after :data:`PASS_MESSAGES` of
them (:meth:`ByteStream.pass_done`): it hands on what it started and lets its process's other
tasks run before reading on.  Otherwise a queue depth of 32 crosses every hop as one convoy —
each process works through all 32 while the next one idles, one core busy of two — where
passes of 8 keep the hops working at once, as a pipeline (measured: ``dst`` 4 KiB random
writes at depth 32, 9,792 -> 14,264 IOPS, for 10-20 % more CPU per request: more passes).

A payload that is still arriving (a 256 KiB WRITE comes in several segments) is waited for with
the socket's receive low-water mark (``SO_RCVLOWAT``) raised to what is missing, so epoll wakes
the reader once the rest is there instead of once per segment — a wakeup costs a scheduler pass,
the most expensive thing a request does here.  The mark goes back to one byte after the wait;
an EOF or an error wakes the reader whatever the mark.  After a large payload the receive for
the next head takes little more than the head (:data:`BULK_HEAD_SLACK`), so the next large
payload is received straight into its own buffer instead of into this stream's and copied
out; after small ones a receive takes all it can, many heads and payloads at once.

Transport errors are translated once, here: a peer that hangs up or resets becomes
``trio.BrokenResourceError``; a stream that ends in the middle of a message raises
``RemoteProtocolError`` naming what was cut.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence

import trio

from dst.errors import RemoteProtocolError

Buffer = bytes | bytearray | memoryview

#: The buffer holds the largest head any protocol reads whole (a dst frame: 24 bytes + 64 KiB
#: of meta) plus room for the start of the data that often arrives with it.
READ_BUFFER_SIZE = 24 + 64 * 1024 + 192 * 1024
#: Linux refuses writev/readv (and sendmsg/recvmsg) with more than IOV_MAX buffers.
IOV_MAX = 1024
#: The most :meth:`ByteStream.send_nowait` takes: what the socket does not take at once is
#: copied, and the copy of a large tail (and the fresh memory glibc faults in for it) costs
#: more than the wakeup the call saves.  A 1 MiB read reply copied ~600 KiB per request and
#: cut dst's seqread-1m-qd8 from ~1,040 to 778 MiB/s, with ~110 page faults per MiB.  Under
#: glibc's 128 KiB mmap threshold, a copy comes from the heap, not from fresh pages.
NOWAIT_MAX_BYTES = 64 * 1024
#: A payload missing at least this much is waited for with SO_RCVLOWAT (module docstring);
#: less arrives in one segment anyway.
LOWAT_MIN = 64 * 1024
#: Messages a reader handles in one pass while more are buffered (module docstring): Linux's
#: blk_plug flushes at 32 requests; 8 measured best here (4: more passes than it saves, 16:
#: convoys again).
PASS_MESSAGES = 8
#: After a payload of LOWAT_MIN or more, the receive for the next head takes at most this much
#: beyond it, so the next large payload lands in its own buffer rather than being received
#: into this stream's and copied out (module docstring).
BULK_HEAD_SLACK = 4096
#: Bytes discarded per read when skipping a refused payload.
SKIP_CHUNK = 256 * 1024


def _nothing_in_flight() -> int:
    return 0


class ByteStream:
    """Buffered reads of small heads, zero-copy payloads, coalesced ``writev`` writes."""

    #: Seconds a send may wait for the peer to take bytes before it fails with
    #: ``trio.TooSlowError`` (None: as long as it takes).  Plain sockets only.
    send_stall_s: float | None = None

    def __init__(self, stream: trio.abc.Stream, *, initial: bytes = b"") -> None:
        self.stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._view = memoryview(bytearray(max(READ_BUFFER_SIZE, len(initial))))
        self._view[: len(initial)] = initial
        self._start, self._end = 0, len(initial)
        self._send_lock = trio.Lock()  # TLS only: SSLStream.send_all takes one at a time
        self._out: list[Buffer] = []  # parts queued for the next writev
        self._queued = self._sent = 0  # messages queued and handed to the kernel, ever
        self._flushing = False  # a sender is handing the queue to the kernel
        self._flushed = trio.Event()  # set (and replaced) each time a flusher finishes
        self._send_failed: str = ""  # set once a send failed or was interrupted
        self.bytes_received = 0
        self.bytes_sent = 0
        self._pass = 0  # messages read in the current pass (pass_done)
        self._bulk = False  # the last payload read was large: receive heads short (_read)
        #: Set by the owner: how many requests it has in flight, the message being sent
        #: included.  Above one, a flusher gathers the others' messages for one more pass.
        self.in_flight: Callable[[], int] = _nothing_in_flight

    async def _recv_into(self, views: Sequence[memoryview], want: int = 0) -> int:
        """Receive into ``views``; ``want``: how many bytes the caller waits for in all (a
        payload's rest), for the low-water mark of a wait."""
        try:
            if self._sock is not None:
                n = await self._readv(views[:IOV_MAX], want)
            else:
                self._pass = 1  # receive_some always yields: a new pass
                chunk = await self.stream.receive_some(len(views[0]))
                n = len(chunk)
                views[0][:n] = chunk
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        self.bytes_received += n
        return n

    async def _readv(self, views: Sequence[memoryview], want: int = 0) -> int:
        assert self._sock is not None
        while True:
            fd = self._sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the stream was closed")
            try:
                return os.readv(fd, views)
            except BlockingIOError:
                self._pass = 1  # the reader waits: the message it reads opens a new pass
                if want < LOWAT_MIN:
                    await trio.lowlevel.wait_readable(self._sock)
                    continue
                sock = self._sock
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                try:
                    await trio.lowlevel.wait_readable(sock)
                finally:
                    if sock.fileno() >= 0:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    async def _writev(self, bufs: Sequence[Buffer]) -> int:
        assert self._sock is not None
        while True:
            fd = self._sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the stream was closed")
            try:
                return os.writev(fd, bufs)
            except BlockingIOError:
                if self.send_stall_s is None:
                    await trio.lowlevel.wait_writable(self._sock)
                else:  # only a send that must wait pays for a deadline
                    with trio.fail_after(self.send_stall_s):
                        await trio.lowlevel.wait_writable(self._sock)
            except OSError as exc:  # EPIPE rather than SIGPIPE: Python ignores the signal
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the stream was closed") from exc
                raise

    def pass_done(self) -> bool:
        """Call before each message is read: True once :data:`PASS_MESSAGES` were read since
        the reader last waited for a receive, and the next has begun to arrive — the reader
        should hand on what it started and checkpoint."""
        if self._pass < PASS_MESSAGES or self._end == self._start:
            self._pass += 1
            return False
        self._pass = 1  # the one about to be read opens the next pass
        return True

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet: reads of up to this many take no receive."""
        return self._end - self._start

    async def read_first(self, n: int, what: str) -> memoryview | None:
        """The first ``n`` bytes of a message, like ``read_exact``, or None if the stream
        ends cleanly before any of them (the peer closed between messages)."""
        return await self._read(n, what, eof_ok=True)

    async def read_exact(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes as a view into the buffer, valid until the next read."""
        view = await self._read(n, what, eof_ok=False)
        assert view is not None
        return view

    async def _read(self, n: int, what: str, *, eof_ok: bool) -> memoryview | None:
        while self._end - self._start < n:
            if self._start and len(self._view) - self._start < n:
                have = self._end - self._start  # compact: move the partial head to the front
                self._view[:have] = self._view[self._start : self._end]
                self._start, self._end = 0, have
            room = self._view[self._end :]
            if self._bulk:  # the payload behind this head is likely large: leave it be
                room = room[: self._start + n - self._end + BULK_HEAD_SLACK]
            got = await self._recv_into([room])
            if got == 0:
                if self._end == self._start and eof_ok:
                    return None
                raise RemoteProtocolError(
                    f"connection closed in the middle of a {what} "
                    f"({self._end - self._start} of {n} bytes)"
                )
            self._end += got
        view = self._view[self._start : self._start + n]
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return view

    async def read_into(self, views: Sequence[memoryview], what: str) -> None:
        """Fill ``views`` in order with the next bytes: what arrived already is copied, the
        rest lands with one ``readv`` per IOV_MAX buffers, not one syscall per page."""
        pending: list[memoryview] = []
        copied = 0
        for view in views:
            got = min(len(view), self._end - self._start)
            if got:
                view[:got] = self._view[self._start : self._start + got]
                self._start += got
                copied += got
                if self._start == self._end:
                    self._start = self._end = 0
            if got < len(view):
                pending.append(view[got:] if got else view)
        i, want = 0, sum(len(v) for v in pending)
        self._bulk = copied + want >= LOWAT_MIN
        while i < len(pending):
            n = await self._recv_into(pending[i:], want)
            if n == 0:
                raise RemoteProtocolError(
                    f"connection closed in the middle of {what} ({want} bytes missing)"
                )
            want -= n
            while n:
                size = len(pending[i])
                if n >= size:
                    n -= size
                    i += 1
                else:
                    pending[i] = pending[i][n:]
                    n = 0

    async def skip(self, length: int, what: str) -> None:
        """Discard ``length`` bytes (a refused request's payload)."""
        scratch = memoryview(bytearray(min(length, SKIP_CHUNK)))
        while length:
            part = scratch[: min(length, len(scratch))]
            await self.read_into([part], what)
            length -= len(part)

    async def send_parts(self, parts: Sequence[Buffer]) -> None:
        """Send ``parts`` back to back as one message (coalesced with the messages of other
        tasks queued meanwhile; see the module docstring).  Each part is bytes, a bytearray
        or a memoryview of format ``'B'`` (its ``len`` is its size in bytes)."""
        if self._sock is None:
            async with self._send_lock:
                try:
                    await self.stream.send_all(b"".join(parts) if len(parts) > 1 else parts[0])
                except OSError as exc:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc
                self.bytes_sent += sum(len(p) for p in parts)
            return
        if self._send_failed:
            raise trio.BrokenResourceError(self._send_failed)
        self._out.extend(parts)  # as given: a view is made only of one sent in part
        self._queued += 1
        mine = self._queued
        while self._flushing:  # the flusher may send ours; it wakes us when it is done
            await self._flushed.wait()
            if self._sent >= mine:
                return
        if self._send_failed:  # the send that carried ours failed
            raise trio.BrokenResourceError(self._send_failed)
        self._flushing = True
        try:
            gathered = False
            while self._sent < self._queued:
                bufs, upto = self._out, self._queued
                self._out = []
                await self._send_all(bufs)
                self._sent = upto
                if gathered or self.in_flight() <= 1:
                    break
                # Tasks about to send (replies woken by the same burst, which trio runs in
                # this same pass) queue behind us while we yield, and go out together next;
                # once, so that a steady stream does not hold this sender (and its request).
                gathered = True
                await trio.lowlevel.cancel_shielded_checkpoint()
        except BaseException as exc:
            # Part of a message may have gone: the stream's framing is lost for good.
            self._send_failed = f"send failed: {describe(exc)}"
            if isinstance(exc, OSError):
                raise trio.BrokenResourceError(self._send_failed) from exc
            raise
        finally:
            self._flushing = False
            self._flushed.set()  # waiters whose message is still queued: one takes over
            self._flushed = trio.Event()

    def send_nowait(self, parts: Sequence[Buffer]) -> bool:
        """Hand one message to the kernel now, without waiting or yielding — True once it is
        the stream's; False, having done nothing, if it cannot be (another message is queued
        or being sent, TLS, a failed stream).  For an owner with nothing else to send: one
        ``writev`` in the task that has the message, where waking a task to send it costs a
        scheduler pass.  What did not fit is copied (the caller may reuse its buffers at
        once) and waits for :meth:`flush`, which the owner must then arrange
        (:attr:`unsent`); so a message over :data:`NOWAIT_MAX_BYTES` is declined."""
        sock = self._sock
        if sock is None or self._flushing or self._out or self._send_failed:
            return False
        if sum(map(len, parts)) > NOWAIT_MAX_BYTES:
            return False
        fd = sock.fileno()
        if fd < 0:
            return False
        bufs = parts[:IOV_MAX]
        try:
            sent = os.writev(fd, bufs)
        except OSError:
            return False  # EAGAIN, or an error the next send_parts reports
        self.bytes_sent += sent
        rest: list[Buffer] = []
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            tail = memoryview(part)[sent:] if sent else part
            rest.append(tail if type(tail) is bytes else bytes(tail))  # the caller's again
            sent = 0
        if rest:
            self._out = rest
            self._queued += 1
        return True

    @property
    def unsent(self) -> bool:
        """Bytes :meth:`send_nowait` queued are waiting for :meth:`flush`."""
        return bool(self._out) and not self._flushing and not self._send_failed

    async def flush(self) -> None:
        """Send what is queued (the rest of a :meth:`send_nowait`) unless a sender is at it."""
        if self._out and not self._flushing:
            await self.send_parts(())

    async def _send_all(self, bufs: list[Buffer]) -> None:
        i = 0
        while i < len(bufs):
            sent = await self._writev(bufs[i : i + IOV_MAX])
            self.bytes_sent += sent
            while i < len(bufs) and sent >= len(bufs[i]):
                sent -= len(bufs[i])
                i += 1
            if sent:
                bufs[i] = memoryview(bufs[i])[sent:]

    async def aclose(self) -> None:
        await self.stream.aclose()


def describe(exc: BaseException) -> str:
    """A transport error's reason for a log line: trio's Broken/Closed errors are often empty
    and wrap the real one (an SSLError, a reset)."""
    cause = exc.__cause__ or exc.__context__
    return str(exc) or (repr(cause) if cause else type(exc).__name__)
