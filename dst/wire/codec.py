"""The dst frame codec: messages to bytes and back, sans-IO.

A frame is a 24-byte big-endian header (magic, version, type, flags,
meta_len, data_len, data_crc, header_crc), ``meta_len`` bytes of msgpack map,
then ``data_len`` raw data bytes; ``proto/PROTOCOL.md`` is the reference.

A receiver reads in three steps, each bounded before it allocates anything:
:func:`parse_prefix` checks magic, version and caps on the 24 bytes alone (a
``data_len`` of 2**32-1 fails before one data byte is read);
:func:`parse_meta` checks the header crc before msgpack sees a byte, then
decodes and validates the message; :func:`check_data` checks the data crc.
Data never passes through msgpack and the encoder never copies it:
:func:`encode_frame` returns header + meta, and the caller sends its data
buffers after them (``sendmsg``); a receiver reads data straight into its
own buffers and hands them to :func:`check_data`.  A forwarder passes the ``data_crc`` it
received, so a replica checks the client's crc end to end.  The data of a
ChecksumRequest's reply is the crc32c list :func:`pack_checksums` makes and
:func:`unpack_checksums` reads.

Every malformed input raises :class:`~dst.errors.RemoteProtocolError` and
nothing else; a sound frame holding a request that cannot be accepted
decodes to a :class:`~dst.wire.messages.BadRequest` to be answered.
:class:`FrameDecoder` strings the steps together over a byte buffer, for
tests, fuzzing and simple byte streams (it copies; the data path does not
use it).  This is the only module that
imports msgpack, and the only one that touches its untyped values.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import crc32c
import msgpack

from dst.errors import LocalProtocolError, RemoteProtocolError
from dst.wire import hot
from dst.wire import messages as m
from dst.wire.messages import (
    REQUEST_TYPES,
    TID_ONLY_TYPES,
    BadRequest,
    Errno,
    Message,
    MsgType,
    Reply,
    WriteRequest,
)
from dst.wire.messages import FrameFlags as FrameFlags  # re-exported: part of the codec API
from dst.wire.rules import (
    CHECKSUM_SIZE,
    LIMIT_KEYS,
    MAX_PAGE_RUNS,
    U16_MAX,
    U32_MAX,
    U64_MAX,
    FieldError,
    validate,
)
from dst.wire.rules import MAX_DATA_LEN as MAX_DATA_LEN  # re-exported: the hard data cap

HEADER_SIZE = 24
MAGIC = 0x44535446  # "DSTF"
FRAME_VERSION = 1  # the layout of the 24 header bytes; see PROTOCOL_VERSION for messages
PROTOCOL_VERSION = 1  # the message set; negotiated by Hello/Welcome
# The meta map holds a few ids and, for reads and writes, the page runs; the
# largest request (MAX_PAGE_RUNS runs of at most 16 bytes, plus < 200 bytes of
# ids) stays below 33 KiB, and a StatusReply's tree may use the rest.  The cap
# bounds what a peer can make us buffer before the header crc is checked; the
# encoder refuses a frame whose meta would pass it.
MAX_META_LEN = 64 * 1024
# The smallest msgpack map (0x80, empty) is one byte: a frame needs a map.
MIN_META_LEN = 1

_HEADER = struct.Struct(">IBBHIIII")
_HEAD20 = struct.Struct(">IBBHIII")  # the bytes the header crc covers, before the meta
_CHECKSUM = struct.Struct(">I")  # one crc32c in a ChecksumRequest's reply data


class FramePrefix(NamedTuple):
    """The 24 header bytes, parsed (magic and version already checked).  A named tuple, not
    a frozen dataclass: every frame makes one, and a tuple is built in a third of the time."""

    msg_type: int
    flags: int
    meta_len: int
    data_len: int
    data_crc: int
    header_crc: int


@dataclass(frozen=True, slots=True)
class Frame:
    prefix: FramePrefix
    message: Message
    data: bytes


# -- field kinds: the shape each msgpack value must have -----------------------

INT, STR, PAIR, STRS, LIMITS, PAGES = "int", "str", "pair", "strs", "limits", "pages"
BOOL, STATUS = "bool", "status"  # STATUS: a map here; rules.validate checks the tree

_ID = (("tid", "t", INT), ("sub", "s", INT), ("handle", "h", INT))
_RANGE = (("offset", "o", INT), ("length", "l", INT))
_HS = (
    ("node_id", "id", STR),
    ("role", "role", STR),
    ("page_size", "ps", INT),
    ("limits", "lim", LIMITS),
    ("features", "feat", STRS),
    ("max_inflight", "mif", INT),
)
_EPOCH = ("epoch", "e", INT)
_TID = ("tid", "t", INT)
_VOLUME = ("volume", "vol", STR)
_ERR = (("errno", "err", INT), ("message", "msg", STR))
Fields = tuple[tuple[str, str, str], ...]
# For each message type: its class and its fields as (attribute, map key,
# kind), in the order the encoder writes them.  PROTOCOL.md lists the same.
WIRE_KEYS: dict[MsgType, tuple[Callable[..., Message], Fields]] = {
    MsgType.HELLO: (m.Hello, (("versions", "v", PAIR), *_HS)),
    MsgType.WELCOME: (m.Welcome, (("version", "v", INT), *_HS)),
    MsgType.ATTACH: (m.Attach, (_TID, _VOLUME, _EPOCH, ("claim", "c", STR))),
    MsgType.ATTACHED: (
        m.Attached,
        (_TID, ("handle", "h", INT), ("size", "sz", INT), _EPOCH, _HS[3]),
    ),
    MsgType.READ: (m.ReadRequest, (*_ID, *_RANGE, ("pages", "p", PAGES))),
    MsgType.WRITE: (m.WriteRequest, (*_ID, *_RANGE, _EPOCH, ("pages", "p", PAGES))),
    MsgType.FLUSH: (m.FlushRequest, _ID),
    MsgType.TRIM: (m.TrimRequest, (*_ID, *_RANGE, _EPOCH)),
    MsgType.WRITE_ZEROES: (m.WriteZeroesRequest, (*_ID, *_RANGE, _EPOCH)),
    MsgType.PING: (m.Ping, (("token", "tok", INT),)),
    MsgType.PONG: (m.Pong, (("token", "tok", INT),)),
    MsgType.REPLY: (m.Reply, (*_ID[:2], *_ERR)),
    MsgType.RECEIVED: (m.Received, _ID[:2]),
    MsgType.GOODBYE: (m.Goodbye, _ERR),
    MsgType.STATUS: (m.StatusRequest, (_TID,)),
    MsgType.STATUS_REPLY: (m.StatusReply, (_TID, ("status", "st", STATUS))),
    MsgType.PROMOTE: (m.PromoteRequest, (_TID, _VOLUME, ("force", "f", BOOL))),
    MsgType.CHECKSUM: (m.ChecksumRequest, (*_ID, *_RANGE, ("extent", "ext", INT))),
    MsgType.SYNC: (
        m.SyncRequest,
        (_TID, _VOLUME, ("action", "a", STR), ("state", "st", STATUS)),
    ),
}
_BY_TYPE = {int(t): spec for t, spec in WIRE_KEYS.items()}
_BY_CLASS = {cls: (int(t), fields) for t, (cls, fields) in WIRE_KEYS.items()}
# Messages with a tid that a server answers with a Reply when they are bad.
_ANSWERABLE = frozenset({*REQUEST_TYPES, *TID_ONLY_TYPES})


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _shape(attr: str, kind: str, value: Any) -> Any:
    """Check a decoded msgpack value has the shape of ``kind``."""
    if kind == INT:
        ok = type(value) is int
    elif kind == STR:
        ok = type(value) is str
    elif kind == BOOL:
        ok = type(value) is bool
    elif kind == STATUS:
        ok = type(value) is dict
    elif kind == PAIR:
        ok = type(value) is tuple and len(value) == 2
        ok = ok and all(type(v) is int for v in value)
    elif kind == STRS:
        ok = type(value) is tuple and all(type(v) is str for v in value)
    elif kind == LIMITS:
        ok = type(value) is dict and all(type(v) is int for v in value.values())
        # Unknown keys are a newer peer's business: ignore them (PROTOCOL.md).
        value = {k: v for k, v in value.items() if k in LIMIT_KEYS} if ok else value
    else:
        ok = type(value) is tuple and len(value) <= MAX_PAGE_RUNS
        ok = ok and all(type(r) is tuple and len(r) == 3 for r in value)
        ok = ok and all(type(v) is int for r in value for v in r)
    if not ok:
        raise FieldError(attr, value, f"must be {kind}" if value is not _MISSING else "missing")
    return value


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Every msgpack map: string keys (msgpack would also pass bin), no repeats
    (which value counts would be up to the implementation: refuse both)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("repeated map key")
    if not all(type(key) is str for key in result):
        raise ValueError("map key that is not a string")
    return result


#: Message types decoded on the fast path of :func:`_unpack_flat`: their fields are ints, page
#: runs and a message string, so a top-level map with only known keys holds no inner map that
#: could repeat a key (a value of another shape fails _shape as it always did).
_FLAT_KEYS = {
    int(t): frozenset(key for _, key, _ in WIRE_KEYS[t][1])
    for t in (MsgType.READ, MsgType.WRITE, MsgType.REPLY, MsgType.FLUSH, MsgType.PING)
}
_FIXMAP, _FIXMAP_MASK = 0x80, 0xF0


def _unpack_flat(msg_type: int, meta: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """The hot messages' meta without a Python callback per map: msgpack's C decoder alone,
    then the same two rules :func:`_pairs` enforces, checked on the result — no repeated key
    (the fixmap header's count against the dict's size) and only string keys (every key one
    this type knows).  None sends anything unusual down the general path, which gives the
    proper error."""
    keys = _FLAT_KEYS.get(msg_type)
    if keys is None or not meta or meta[0] & _FIXMAP_MASK != _FIXMAP:
        return None
    try:
        obj = msgpack.unpackb(meta, raw=False, use_list=False, strict_map_key=True)
    except Exception:
        return None
    if type(obj) is not dict or len(obj) != meta[0] & 0x0F or not keys.issuperset(obj):
        return None
    return obj


def _unpack(meta: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            meta, raw=False, use_list=False, strict_map_key=True, object_pairs_hook=_pairs
        )
    # msgpack's exceptions differ between its C and Python builds (ValueError,
    # FormatError, StackError, UnicodeDecodeError, TypeError...): any of them
    # means undecodable meta, which is fatal.
    except Exception as exc:
        raise RemoteProtocolError(f"undecodable meta: {exc!r}") from None
    if type(obj) is not dict:
        raise RemoteProtocolError(f"meta is not a map but {type(obj).__name__}")
    return obj


def _ids(obj: dict[str, Any], cls: object) -> tuple[int, int]:
    """tid and sub of a request; sub is 0 for Attach and the other TID_ONLY_TYPES,
    optional for unknown types (None)."""
    tid = obj.get("t")
    sub = 0 if cls in TID_ONLY_TYPES else obj.get("s", 0 if cls is None else None)
    if type(tid) is not int or not 0 <= tid <= U64_MAX:
        raise RemoteProtocolError(f"request without a usable tid: {tid!r}")
    if type(sub) is not int or not 0 <= sub <= U16_MAX:
        raise RemoteProtocolError(f"request without a usable sub: {sub!r}")
    return tid, sub


def _frame_rules(msg: Message, flags: int, data_len: int) -> None:
    """What the header must say for this message: flags and data length."""
    if not isinstance(msg, REQUEST_TYPES) and flags:
        raise FieldError("flags", flags, "must be 0 on this message")
    if isinstance(msg, WriteRequest):
        if data_len != msg.length:
            raise FieldError("data_len", data_len, f"must equal length {msg.length}")
    elif isinstance(msg, Reply):
        if data_len and msg.errno:
            raise FieldError("data_len", data_len, "must be 0 on an error reply")
    elif data_len:
        raise FieldError("data_len", data_len, "must be 0 on this message")


def parse_prefix(buf: bytes | bytearray | memoryview) -> FramePrefix:
    """Parse exactly HEADER_SIZE bytes; raise RemoteProtocolError if they
    cannot start a frame.  Type and flags are checked later, with the meta."""
    if len(buf) != HEADER_SIZE:
        raise RemoteProtocolError(f"frame header is {len(buf)} bytes, not {HEADER_SIZE}")
    magic, version, msg_type, flags, meta_len, data_len, dcrc, hcrc = _HEADER.unpack(buf)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad magic {magic:#010x}, expected {MAGIC:#010x}")
    if version != FRAME_VERSION:
        raise RemoteProtocolError(f"frame version {version}, expected {FRAME_VERSION}")
    if not MIN_META_LEN <= meta_len <= MAX_META_LEN:
        raise RemoteProtocolError(f"meta_len {meta_len} outside [{MIN_META_LEN}, {MAX_META_LEN}]")
    if data_len > MAX_DATA_LEN:
        raise RemoteProtocolError(f"data_len {data_len} over MAX_DATA_LEN {MAX_DATA_LEN}")
    return FramePrefix(msg_type, flags, meta_len, data_len, dcrc, hcrc)


def parse_meta(prefix: FramePrefix, meta: bytes | bytearray | memoryview) -> Message:
    """Check the header crc, decode the meta map and validate the message.

    Returns the message, or a BadRequest for a request (or Attach) that has a
    usable tid but breaks a rule; raises RemoteProtocolError for the rest."""
    if len(meta) != prefix.meta_len:
        raise RemoteProtocolError(f"meta is {len(meta)} bytes, header says {prefix.meta_len}")
    head = _HEAD20.pack(
        MAGIC, FRAME_VERSION, prefix.msg_type, prefix.flags, prefix.meta_len,
        prefix.data_len, prefix.data_crc,
    )  # fmt: skip
    crc = crc32c.crc32c(meta, crc32c.crc32c(head))
    if crc != prefix.header_crc:
        raise RemoteProtocolError(f"header crc {prefix.header_crc:#010x}, computed {crc:#010x}")
    obj = _unpack_flat(prefix.msg_type, meta)
    if obj is None:
        obj = _unpack(meta)
    else:
        fast = hot.decode.get(prefix.msg_type)
        hot_msg = fast(obj, prefix.flags, prefix.data_len) if fast is not None else None
        if hot_msg is not None:
            return hot_msg
    spec = _BY_TYPE.get(prefix.msg_type)
    if spec is None:
        tid, sub = _ids(obj, None)
        why = f"unknown message type {prefix.msg_type:#04x}"
        return BadRequest(tid, sub, prefix.msg_type, Errno.EOPNOTSUPP, why)
    cls, fields = spec
    answerable = cls in _ANSWERABLE
    if answerable:
        tid, sub = _ids(obj, cls)
    try:
        kwargs = {attr: _shape(attr, kind, obj.get(key, _MISSING)) for attr, key, kind in fields}
        if cls in REQUEST_TYPES:
            kwargs["flags"] = prefix.flags
        msg = cls(**kwargs)
        validate(msg)
        _frame_rules(msg, prefix.flags, prefix.data_len)
    except FieldError as exc:
        if answerable:
            return BadRequest(tid, sub, prefix.msg_type, exc.errno, str(exc))
        name = MsgType(prefix.msg_type).name
        raise RemoteProtocolError(f"bad {name}: {exc}", exc.errno) from None
    return msg


def data_crc(views: Iterable[bytes | bytearray | memoryview]) -> int:
    """crc32c (Castagnoli) over the concatenation of ``views``; 0 for none."""
    crc = 0
    for view in views:
        crc = crc32c.crc32c(view, crc)
    return int(crc)


_data_crc = data_crc  # encode_frame's keyword argument hides the name


def check_data(prefix: FramePrefix, views: Iterable[bytes | bytearray | memoryview]) -> None:
    """Raise RemoteProtocolError unless ``views`` are the frame's data."""
    views = list(views)
    size = sum(memoryview(v).nbytes for v in views)
    if size != prefix.data_len:
        raise RemoteProtocolError(f"data is {size} bytes, header says {prefix.data_len}")
    crc = data_crc(views)
    if crc != prefix.data_crc:
        raise RemoteProtocolError(f"data crc {prefix.data_crc:#010x}, computed {crc:#010x}")


def _wire_value(kind: str, value: Any) -> Any:
    """Limits, and every map in a status tree, sorted by key: canonical encoding."""
    if kind == LIMITS:
        return {k: value[k] for k in sorted(value)}
    if kind == STATUS:
        return _wire_status(value)
    return value


def _wire_status(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _wire_status(value[k]) for k in sorted(value)}
    if isinstance(value, tuple):
        return [_wire_status(v) for v in value]
    return value


def encode_frame(
    msg: Message,
    data: Sequence[bytes | bytearray | memoryview] = (),
    *,
    data_crc: int | None = None,
) -> bytes:
    """Return the header and meta of the frame carrying ``msg`` and ``data``.

    The data itself is not included (send it after these bytes).  Pass
    ``data_crc`` when forwarding data whose crc is known.  Raises
    LocalProtocolError if ``msg`` or the data break a rule."""
    spec = _BY_CLASS.get(type(msg))
    if spec is None:
        raise LocalProtocolError(f"{type(msg).__name__} is not sent on the wire")
    msg_type, fields = spec
    flags = msg.flags if isinstance(msg, REQUEST_TYPES) else 0
    data_len = sum(memoryview(v).nbytes for v in data)
    try:
        if data_len > MAX_DATA_LEN:
            raise FieldError("data_len", data_len, f"over MAX_DATA_LEN {MAX_DATA_LEN}")
        if not hot.valid(msg, data_len):  # the hot messages, checked in one pass
            validate(msg)
            _frame_rules(msg, flags, data_len)
    except FieldError as exc:
        raise LocalProtocolError(str(exc), exc.errno) from None
    if data_crc is None:
        data_crc = _data_crc(data)
    elif not (type(data_crc) is int and 0 <= data_crc <= U32_MAX) or (data_crc and not data_len):
        raise LocalProtocolError(f"data_crc {data_crc!r} for {data_len} data bytes")
    if msg_type in _FLAT_KEYS:  # no limits or status maps: nothing to canonicalise
        values = {key: getattr(msg, attr) for attr, key, _ in fields}
    else:
        values = {key: _wire_value(kind, getattr(msg, attr)) for attr, key, kind in fields}
    meta = msgpack.packb(values, use_bin_type=True)
    if len(meta) > MAX_META_LEN:
        raise LocalProtocolError(f"meta is {len(meta)} bytes, over MAX_META_LEN {MAX_META_LEN}")
    head = _HEAD20.pack(MAGIC, FRAME_VERSION, msg_type, flags, len(meta), data_len, data_crc)
    header_crc = crc32c.crc32c(meta, crc32c.crc32c(head))
    return b"".join((head, header_crc.to_bytes(4, "big"), meta))


def pack_checksums(crcs: Iterable[int]) -> bytes:
    """The data of a successful Reply to a ChecksumRequest: each crc32c as a
    big-endian u32, in extent order."""
    try:
        return b"".join(_CHECKSUM.pack(crc) for crc in crcs)
    except struct.error:
        raise LocalProtocolError(f"a checksum outside [0, {U32_MAX}]") from None


def unpack_checksums(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """The crc32c values in a Checksum reply's data (whose length the
    Connection has checked against the request)."""
    view = memoryview(data).cast("B")
    if len(view) % CHECKSUM_SIZE:
        raise RemoteProtocolError(f"checksum data is {len(view)} bytes, not a multiple of 4")
    return tuple(crc for (crc,) in _CHECKSUM.iter_unpack(view))


class FrameDecoder:
    """Buffered decoder, h11-style: ``receive_data(bytes)`` (``b""`` for
    EOF), then ``next_frame()`` until it returns None (more data needed).

    Errors are sticky: once a frame is bad the stream position is lost, so
    every later call raises the same RemoteProtocolError."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._prefix: FramePrefix | None = None
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def eof(self) -> bool:
        """True once EOF was received and every frame before it returned."""
        return self._eof and not self._buf

    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise LocalProtocolError("receive_data after EOF")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise RemoteProtocolError(str(self._error), self._error.errno)
        try:
            return self._next_frame()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_frame(self) -> Frame | None:
        buf = self._buf
        if self._prefix is None:
            if len(buf) < HEADER_SIZE:
                if self._eof and buf:
                    raise RemoteProtocolError(f"EOF inside a frame header ({len(buf)} bytes)")
                return None
            self._prefix = parse_prefix(bytes(buf[:HEADER_SIZE]))
        prefix = self._prefix
        meta_end = HEADER_SIZE + prefix.meta_len
        end = meta_end + prefix.data_len
        if len(buf) < end:
            if self._eof:
                raise RemoteProtocolError(f"EOF inside a frame ({len(buf)} of {end} bytes)")
            return None
        message = parse_meta(prefix, bytes(buf[HEADER_SIZE:meta_end]))
        data = bytes(buf[meta_end:end])
        check_data(prefix, (data,))
        del buf[:end]
        self._prefix = None
        return Frame(prefix, message, data)
