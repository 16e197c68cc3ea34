"""The rules of the hot messages — READ, WRITE and their Reply — in one pass each.

Every 4 KiB request crosses two hops, so each of these messages is decoded and encoded once
per hop: their checks, done field by field through the general machinery (``codec._shape``
per field, then :func:`~dst.wire.rules.validate` and the frame rules), cost more than msgpack
itself.  The functions here accept exactly the messages that are *valid*, checking every rule
the general path checks for the type in straight-line code, and answer None for anything
else — which then goes down the general path, the one that names the field and the value
in its error.  So they can only make acceptance faster, never change what is accepted; the
codec tests hold both paths to the same verdicts (``tests/unit/test_codec_fuzz.py``).
"""

from __future__ import annotations

from typing import Any

from dst.wire.messages import MsgType, ReadRequest, Reply, WriteRequest
from dst.wire.rules import (
    ALLOWED_FLAGS,
    MAX_DATA_LEN,
    MAX_ERRNO,
    MAX_MESSAGE_LEN,
    MAX_PAGE_RUNS,
    MAX_PAGE_SIZE,
    U16_MAX,
    U32_MAX,
    U64_MAX,
)

__all__ = ["decode", "valid"]

_NOT_READ_FLAGS = ~ALLOWED_FLAGS[ReadRequest]
_NOT_WRITE_FLAGS = ~ALLOWED_FLAGS[WriteRequest]


def _runs(pages: Any, length: int) -> bool:
    """``pages`` is a tuple of 1..MAX_PAGE_RUNS (size, offset, count) runs of int inside a
    page, covering exactly ``length`` bytes."""
    if type(pages) is not tuple or not 1 <= len(pages) <= MAX_PAGE_RUNS:
        return False
    total = 0
    for run in pages:
        if type(run) is not tuple or len(run) != 3:
            return False
        size, offset, count = run
        if not (type(size) is int and type(offset) is int and type(count) is int):
            return False
        if not (1 <= size and 0 <= offset and offset + size <= MAX_PAGE_SIZE):
            return False
        if not 1 <= count <= U32_MAX:
            return False
        total += size * count
    return total == length


def _request(tid: Any, sub: Any, handle: Any, offset: Any, length: Any) -> bool:
    """The ids and range of a READ or WRITE: ints in their ranges, 0 < length <= the data
    cap, and offset + length inside the u64 space."""
    return (
        type(tid) is int
        and type(sub) is int
        and type(handle) is int
        and type(offset) is int
        and type(length) is int
        and 0 <= tid <= U64_MAX
        and 0 <= sub <= U16_MAX
        and 0 <= handle <= U32_MAX
        and 0 <= offset
        and 0 < length <= MAX_DATA_LEN
        and offset + length <= U64_MAX + 1
    )


def _reply(tid: Any, sub: Any, code: Any, message: Any, data_len: int) -> bool:
    if not (
        type(tid) is int
        and type(sub) is int
        and type(code) is int
        and type(message) is str
        and 0 <= tid <= U64_MAX
        and 0 <= sub <= U16_MAX
    ):
        return False
    if code == 0:
        return not message  # success: no message; any data (a READ's)
    if data_len or not 0 < code <= MAX_ERRNO or len(message) > MAX_MESSAGE_LEN:
        return False
    try:  # as the general rule: at most MAX_MESSAGE_LEN bytes of UTF-8
        return len(message.encode("utf-8")) <= MAX_MESSAGE_LEN
    except UnicodeEncodeError:
        return False


def _read(obj: dict[str, Any], flags: int, data_len: int) -> ReadRequest | None:
    if len(obj) != 6 or data_len or flags & _NOT_READ_FLAGS:
        return None
    try:
        tid, sub, handle, offset, length, pages = (
            obj["t"], obj["s"], obj["h"], obj["o"], obj["l"], obj["p"]
        )  # fmt: skip
    except KeyError:
        return None
    if not (_request(tid, sub, handle, offset, length) and _runs(pages, length)):
        return None
    return ReadRequest(tid, sub, handle, offset, length, pages, flags)


def _write(obj: dict[str, Any], flags: int, data_len: int) -> WriteRequest | None:
    if len(obj) != 7 or flags & _NOT_WRITE_FLAGS:
        return None
    try:
        tid, sub, handle, offset, length, epoch, pages = (
            obj["t"], obj["s"], obj["h"], obj["o"], obj["l"], obj["e"], obj["p"]
        )  # fmt: skip
    except KeyError:
        return None
    if not (
        _request(tid, sub, handle, offset, length)
        and data_len == length
        and type(epoch) is int
        and 0 <= epoch <= U64_MAX
        and _runs(pages, length)
    ):
        return None
    return WriteRequest(tid, sub, handle, offset, length, epoch, pages, flags)


def _reply_of(obj: dict[str, Any], flags: int, data_len: int) -> Reply | None:
    if len(obj) != 4 or flags:
        return None
    try:
        tid, sub, code, message = obj["t"], obj["s"], obj["err"], obj["msg"]
    except KeyError:
        return None
    if not _reply(tid, sub, code, message, data_len):
        return None
    return Reply(tid, sub, code, message)


#: By message type: the message a decoded meta map holds, if it is a valid one, else None.
decode = {int(MsgType.READ): _read, int(MsgType.WRITE): _write, int(MsgType.REPLY): _reply_of}


def valid(msg: object, data_len: int) -> bool:
    """True if ``msg`` (about to be sent with ``data_len`` data bytes) is a hot message that
    obeys every rule; False for anything else, which the general checks then judge."""
    cls = type(msg)
    if cls is Reply:
        assert isinstance(msg, Reply)
        return _reply(msg.tid, msg.sub, msg.errno, msg.message, data_len)
    if cls is ReadRequest:
        assert isinstance(msg, ReadRequest)
        flags, pages = msg.flags, msg.pages
        ok = not data_len and not flags & _NOT_READ_FLAGS
    elif cls is WriteRequest:
        assert isinstance(msg, WriteRequest)
        flags, pages, epoch = msg.flags, msg.pages, msg.epoch
        ok = data_len == msg.length and not flags & _NOT_WRITE_FLAGS
        ok = ok and type(epoch) is int and 0 <= epoch <= U64_MAX
    else:
        return False
    return (
        ok
        and type(flags) is int
        and _request(msg.tid, msg.sub, msg.handle, msg.offset, msg.length)
        and _runs(pages, msg.length)
    )
