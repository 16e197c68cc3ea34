"""Spare request buffers, reused instead of allocated for every request.

A fresh ``bytearray(n)`` is zero-filled, and above malloc's mmap threshold its pages fault in
one by one on first touch: for a 1 MiB READ that was a fifth of the NBD bridge's Python time
(py-spy, seqread 1 MiB at depth 8).  Requests come in few sizes (4 KiB, 256 KiB, 1 MiB...), so
a buffer handed back after its request completed serves the next one of the same length.

Only a buffer whose request is over may come back: one the layers below might still fill (a
READ cancelled while its reply is on the way) is dropped, never reused.  A reused buffer is
not zeroed: a READ sends its buffer only after the read filled every byte, and a WRITE only
submits after its payload filled it.
"""

from __future__ import annotations

from collections import defaultdict

__all__ = ["SpareBuffers"]


class SpareBuffers:
    """Free lists of bytearrays by exact length, holding at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._free: defaultdict[int, list[bytearray]] = defaultdict(list)

    def take(self, length: int) -> bytearray:
        spare = self._free.get(length)
        if spare:
            self.held -= length
            return spare.pop()
        return bytearray(length)

    def give_back(self, buf: bytearray) -> None:
        """``buf``'s request is over: nothing will read or write it any more."""
        if self.held + len(buf) <= self.max_bytes:
            self.held += len(buf)
            self._free[len(buf)].append(buf)
