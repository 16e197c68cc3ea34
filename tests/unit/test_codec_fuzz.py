"""Fuzzing the decoder (TESTING.md, "Bad input"): every input either decodes
or raises RemoteProtocolError -- never another exception -- and every valid
message round-trips.

Random bytes die at the magic, so most inputs here are built to get past the
early checks: sound headers around random msgpack, and golden vectors
mutated (bit flips, truncation, splicing) with their crcs optionally
recomputed so that the mutation reaches msgpack and the field rules.
"""

from __future__ import annotations

import struct
from typing import Any
from unittest.mock import patch

import crc32c
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dst.errors import RemoteProtocolError
from dst.wire import (
    ALLOWED_FLAGS,
    HEADER_SIZE,
    LIMIT_KEYS,
    MAX_CHECKSUMS,
    MAX_PAGE_SIZE,
    MAX_STATUS_DEPTH,
    MIN_CHECKSUM_EXTENT,
    Attach,
    Attached,
    BadRequest,
    ChecksumRequest,
    FlushRequest,
    FrameDecoder,
    Goodbye,
    Hello,
    Message,
    MsgType,
    Ping,
    Pong,
    PromoteRequest,
    ReadRequest,
    Reply,
    StatusReply,
    StatusRequest,
    StatusValue,
    TrimRequest,
    Welcome,
    WriteRequest,
    WriteZeroesRequest,
    codec,
    encode_frame,
    hot,
)
from dst.wire.rules import FieldError, validate
from tests.unit.test_codec import raw_frame
from tests.unit.test_vectors import INDEX, vector_bytes

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1
VECTORS = [vector_bytes(e) for e in INDEX]


def decode_everything(raw: bytes, chunk: int = 0) -> int:
    """Feed ``raw`` then EOF; return the number of frames.  Only
    RemoteProtocolError may escape (the test fails on anything else)."""
    decoder, count = FrameDecoder(), 0
    try:
        for i in range(0, len(raw), chunk or max(len(raw), 1)):
            decoder.receive_data(raw[i : i + (chunk or len(raw))])
            while decoder.next_frame() is not None:
                count += 1
        decoder.receive_data(b"")
        while decoder.next_frame() is not None:
            count += 1
    except RemoteProtocolError:
        pass
    return count


# -- arbitrary and structured garbage ------------------------------------------


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 7))
def test_random_bytes(raw: bytes, chunk: int) -> None:
    decode_everything(raw, chunk)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=20,
)
KEYS = ["t", "s", "h", "o", "l", "e", "p", "v", "id", "role", "ps", "lim", "feat", "mif"]
KEYS += ["vol", "sz", "tok", "err", "msg", "st", "f", "ext", "x"]
field_values = (
    st.integers(0, 3)
    | st.integers(0, U64)
    | st.sampled_from(["client", "replica", "vol", ""])
    | st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 3)), max_size=3)
    | st.dictionaries(st.sampled_from([*LIMIT_KEYS, "x"]), st.integers(0, U64), max_size=3)
    | msgpack_values
)


@FUZZ
@given(
    msg_type=st.sampled_from([*map(int, MsgType), 0x00, 0x15, 0xFF]),
    flags=st.sampled_from([0, 1, 2, 4, 8, 0x10, 0xFFFF]),
    meta=st.builds(
        dict.__or__,  # mostly with a usable tid and sub, so the field rules get exercised
        st.fixed_dictionaries({"t": st.integers(0, U64), "s": st.integers(0, U16)}),
        st.dictionaries(st.sampled_from(KEYS), field_values, max_size=9),
    )
    | st.dictionaries(st.sampled_from(KEYS), field_values, max_size=9)
    | msgpack_values,
    data=st.binary(max_size=64),
)
def test_sound_frames_around_random_meta(msg_type: int, flags: int, meta: Any, data: bytes) -> None:
    decode_everything(raw_frame(msg_type, msgpack.packb(meta), data, flags))


# -- mutated golden vectors ---------------------------------------------------------


def fix_crcs(raw: bytearray) -> None:
    """Make the crcs of the first frame in ``raw`` right again, if it is long
    enough, so that a mutation is judged by the later checks."""
    if len(raw) < HEADER_SIZE:
        return
    meta_len, data_len = struct.unpack(">II", raw[8:16])
    meta_end = HEADER_SIZE + meta_len
    if meta_end > len(raw):
        return
    data = raw[meta_end : meta_end + data_len]
    raw[16:20] = struct.pack(">I", crc32c.crc32c(bytes(data)))
    header_crc = crc32c.crc32c(bytes(raw[HEADER_SIZE:meta_end]), crc32c.crc32c(bytes(raw[:20])))
    raw[20:24] = struct.pack(">I", header_crc)


def mutate(draw: st.DrawFn, raw: bytearray, low: int = 0) -> None:
    """Apply 1-4 random edits to ``raw``, at or after ``low`` where possible."""
    ops = ["flip", "flip", "set", "set", "insert", "delete", "truncate", "splice"]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(ops))
        top = max(len(raw) - 1, 0)
        at = draw(st.integers(min(low, top), top))
        if op == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[at:]
        elif op == "splice":
            other = draw(st.sampled_from(VECTORS))
            raw[at:] = other[draw(st.integers(0, len(other))) :]
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif raw:  # set a byte to an interesting value
            raw[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xFF]))


@st.composite
def mutated_vectors(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(VECTORS)))
    meta_len, data_len = struct.unpack(">II", raw[8:16])
    if draw(st.integers(0, 2)) and HEADER_SIZE + meta_len + data_len == len(raw):
        # Edit the meta (or the flags) of a sound frame and rebuild it around the
        # result with lengths and crcs right: the edit reaches msgpack and the rules.
        meta = bytearray(raw[HEADER_SIZE : HEADER_SIZE + meta_len])
        mutate(draw, meta)
        flags = draw(st.sampled_from([int.from_bytes(raw[6:8], "big"), 1, 2, 4, 8, 16, 0xFFFF]))
        return raw_frame(raw[5], bytes(meta), bytes(raw[HEADER_SIZE + meta_len :]), flags)
    mutate(draw, raw, low=draw(st.sampled_from([0, HEADER_SIZE])))
    if draw(st.booleans()):
        fix_crcs(raw)
    return bytes(raw)


@FUZZ
@given(mutated_vectors(), st.integers(0, 5))
def test_mutated_vectors(raw: bytes, chunk: int) -> None:
    decode_everything(raw, chunk)


# -- round trip of random valid messages -------------------------------------------

name_like = st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=20)
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
limits = st.dictionaries(st.sampled_from(LIMIT_KEYS), st.integers(0, U64))
features = st.lists(name_like, unique=True, max_size=5).map(tuple)
page_sizes = st.sampled_from([512 << i for i in range(12)])
# Status trees, every depth up to MAX_STATUS_DEPTH: level k's values are leaves
# or containers (lists are kept as tuples) of level k + 1's; the status map
# itself is level 1.  Wide near the top, one item deeper down, so that the
# largest tree (36 leaves of < 300 bytes) stays far below MAX_META_LEN.
status_keys = st.text(st.characters(exclude_categories=["Cs"]), max_size=32)  # <= 128 bytes
status_leaves = st.none() | st.booleans() | st.integers(-(2**63), U64) | text
status_level: st.SearchStrategy[StatusValue] = status_leaves
for level in range(MAX_STATUS_DEPTH, 1, -1):
    width = 3 if level <= 3 else 1
    status_level = (
        status_leaves
        | st.lists(status_level, max_size=width).map(tuple)
        | st.lists(status_level, max_size=width)
        | st.dictionaries(status_keys, status_level, max_size=width)
    )
status_trees = st.dictionaries(status_keys, status_level, max_size=4)


@st.composite
def pages_and_length(draw: st.DrawFn, max_run_bytes: int) -> tuple[Any, int]:
    runs = []
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(1, max_run_bytes))
        offset = draw(st.integers(0, MAX_PAGE_SIZE - size))
        runs.append((size, offset, draw(st.integers(1, 4))))
    return tuple(runs), sum(size * count for size, _, count in runs)


@st.composite
def messages(draw: st.DrawFn) -> tuple[Message, bytes]:
    tid, sub, handle = (
        draw(st.integers(0, U64)),
        draw(st.integers(0, U16)),
        draw(st.integers(0, U32)),
    )
    epoch, kind = draw(st.integers(0, U64)), draw(st.sampled_from(sorted(MsgType)))
    extent = 1 << draw(st.integers(MIN_CHECKSUM_EXTENT.bit_length() - 1, 63))
    if kind in (MsgType.READ, MsgType.WRITE):
        pages, length = draw(pages_and_length(4096 if kind == MsgType.WRITE else 1 << 20))
    elif kind == MsgType.CHECKSUM:  # whole sectors, at most MAX_CHECKSUMS extents
        pages, length = (), 512 * draw(st.integers(1, min(U64, extent * MAX_CHECKSUMS) // 512))
    else:
        pages, length = (), draw(st.integers(1, U64))
    offset = draw(st.integers(0, U64 - length + 1))
    requests: dict[int, type] = {MsgType.READ: ReadRequest, MsgType.WRITE: WriteRequest}
    requests |= {MsgType.FLUSH: FlushRequest, MsgType.TRIM: TrimRequest}
    requests |= {MsgType.WRITE_ZEROES: WriteZeroesRequest, MsgType.CHECKSUM: ChecksumRequest}
    flags = draw(st.integers(0, 15)) & ALLOWED_FLAGS.get(requests.get(kind, object), 0)
    if kind == MsgType.HELLO:
        lo = draw(st.integers(1, U16))
        roles = st.sampled_from(["client", "bridge", "replica"])
        versions = st.just((lo, draw(st.integers(lo, U16))))
        mif = st.integers(0, 65536)
        hello = st.builds(Hello, versions, name_like, roles, page_sizes, limits, features, mif)
        return draw(hello), b""
    if kind == MsgType.WELCOME:
        version, mif = st.integers(1, U16), st.integers(1, 65536)
        role = st.just("replica")
        welcome = st.builds(Welcome, version, name_like, role, page_sizes, limits, features, mif)
        return draw(welcome), b""
    if kind == MsgType.ATTACH:
        return Attach(tid, draw(name_like), epoch), b""
    if kind == MsgType.ATTACHED:
        return Attached(tid, handle, draw(st.integers(0, U64)), epoch, draw(limits)), b""
    if kind == MsgType.READ:
        return ReadRequest(tid, sub, handle, offset, length, pages, flags), b""
    if kind == MsgType.WRITE:
        data = bytes([draw(st.integers(0, 255))]) * length
        return WriteRequest(tid, sub, handle, offset, length, epoch, pages, flags), data
    if kind == MsgType.FLUSH:
        return FlushRequest(tid, sub, handle, flags), b""
    if kind == MsgType.TRIM:
        return TrimRequest(tid, sub, handle, offset, length, epoch, flags), b""
    if kind == MsgType.WRITE_ZEROES:
        return WriteZeroesRequest(tid, sub, handle, offset, length, epoch, flags), b""
    if kind == MsgType.CHECKSUM:
        return ChecksumRequest(tid, sub, handle, offset, length, extent, flags), b""
    if kind == MsgType.STATUS:
        return StatusRequest(tid), b""
    if kind == MsgType.STATUS_REPLY:
        return StatusReply(tid, draw(status_trees)), b""
    if kind == MsgType.PROMOTE:
        return PromoteRequest(tid, draw(name_like), draw(st.booleans())), b""
    if kind in (MsgType.PING, MsgType.PONG):
        return (Ping if kind == MsgType.PING else Pong)(draw(st.integers(0, U64))), b""
    errno = draw(st.integers(0, 4095))
    message = "" if errno == 0 and kind == MsgType.REPLY else draw(text)
    if kind == MsgType.REPLY:
        data = draw(st.binary(max_size=64)) if errno == 0 else b""
        return Reply(tid, sub, errno, message), data
    return Goodbye(errno, message), b""


@settings(max_examples=500, deadline=None)
@given(messages())
def test_valid_messages_round_trip(msg_and_data: tuple[Message, bytes]) -> None:
    msg, data = msg_and_data
    head = encode_frame(msg, [data] if data else [])
    decoder = FrameDecoder()
    decoder.receive_data(head + data)
    frame = decoder.next_frame()
    assert frame is not None and frame.message == msg and frame.data == data
    assert encode_frame(frame.message, [frame.data] if data else []) == head  # canonical


# -- the hot messages' one-pass checks (dst/wire/hot.py) agree with the general rules ----------

_EDGE_INTS = st.one_of(
    st.sampled_from([0, 1, -1, 4096, U16, U16 + 1, U32, U32 + 1, U64, U64 + 1, 1 << 24]),
    st.integers(-(2**65), 2**65),
)
_VALUES = st.one_of(_EDGE_INTS, st.booleans(), st.text(max_size=3), st.none(), st.floats())
_RUN = st.one_of(
    st.tuples(
        st.sampled_from([1, 512, 4096, MAX_PAGE_SIZE, MAX_PAGE_SIZE + 1, 0]),
        st.sampled_from([0, 1, 512, MAX_PAGE_SIZE - 1, MAX_PAGE_SIZE, -1]),
        st.sampled_from([1, 2, 0, U32, U32 + 1]),
    ),
    st.tuples(_VALUES, _VALUES),
    _VALUES,
)
_PAGES = st.one_of(st.lists(_RUN, max_size=3).map(tuple), _VALUES)
_KEYS = {
    MsgType.READ: ("t", "s", "h", "o", "l", "p"),
    MsgType.WRITE: ("t", "s", "h", "o", "l", "e", "p"),
    MsgType.REPLY: ("t", "s", "err", "msg"),
}


@st.composite
def hot_metas(draw: st.DrawFn) -> tuple[int, dict[str, Any], int, int]:
    """A READ, WRITE or Reply meta map near the edges of every rule: each field valid-looking
    or not, sometimes missing, with flags and a data length to match or not."""
    msg_type = draw(st.sampled_from(sorted(_KEYS)))
    length = draw(st.sampled_from([512, 4096, 8192, 1 << 20]))

    def field(valid: st.SearchStrategy[Any], edge: st.SearchStrategy[Any]) -> Any:
        return draw(valid if draw(st.integers(0, 9)) else edge)  # mostly valid: one bad field

    fields: dict[str, Any] = {
        "t": field(st.integers(0, U64), _EDGE_INTS),
        "s": field(st.integers(0, U16), _EDGE_INTS),
        "h": field(st.integers(0, U32), _EDGE_INTS),
        "o": field(st.integers(0, U64 - length + 1), _EDGE_INTS),
        "l": field(st.just(length), _EDGE_INTS),
        "e": field(st.integers(0, U64), _VALUES),
        "p": field(
            st.just(((4096, 0, length // 4096),) if length >= 4096 else ((512, 0, 1),)), _PAGES
        ),
        "err": field(st.sampled_from([0, 0, 5, 4095]), st.sampled_from([4096, -1, True])),
        "msg": field(st.just(""), st.one_of(st.text(max_size=4), st.just("x" * 1025), _VALUES)),
    }
    keys = [k for k in _KEYS[msg_type] if draw(st.integers(0, 30))]  # sometimes one missing
    meta = {k: fields[k] for k in keys}
    flags = draw(st.one_of(st.just(0), st.sampled_from([int(f) for f in ALLOWED_FLAGS.values()])))
    data_len = draw(
        st.sampled_from([0, length, 512])
        if msg_type == MsgType.REPLY
        else st.just(0 if msg_type == MsgType.READ else length)
        if draw(st.integers(0, 9))
        else st.sampled_from([0, 512, length])
    )
    return int(msg_type), meta, flags, data_len


@FUZZ
@given(hot_metas())
def test_hot_decode_accepts_exactly_what_the_general_rules_accept(
    case: tuple[int, dict[str, Any], int, int],
) -> None:
    check_hot(*case)


_VALID_HOT = {
    MsgType.READ: {"t": 7, "s": 1, "h": 3, "o": 8192, "l": 8192, "p": ((4096, 0, 2),)},
    MsgType.WRITE: {"t": 7, "s": 1, "h": 3, "o": 8192, "l": 8192, "e": 2, "p": ((4096, 0, 2),)},
    MsgType.REPLY: {"t": 7, "s": 1, "err": 0, "msg": ""},
}
_SWAPS: list[Any] = [
    *(0, 1, -1, 5, 4095, 4096, 8192, U16, U16 + 1, U32, U32 + 1, U64, 1 << 24, (1 << 24) + 1),
    *(U64 - 8191, U64 - 8190, True, None, "", "x", "x" * 1025, "\u00e9" * 600, 1.0, (1, 2)),
    *(((4096, 0, 1),), ((4096, 0, 2),), ((512, 0, 16),), ((4096, 1, 2),), ((0, 0, 2),)),
    *(((MAX_PAGE_SIZE, 0, 1),), ((MAX_PAGE_SIZE, 1, 1),), ((4096, -1, 2),), ((4096, 0, 0),)),
    *(((4096, 0, 1), (2048, 2048, 2)), ((4096, 0),), ((4096, 0, True),), (), [(4096, 0, 2)]),
]


_BIG = MAX_PAGE_SIZE
#: Fields that break a rule only together (a run past its page that still sums to length).
_OVERLAYS: list[dict[str, Any]] = [
    {"l": _BIG, "p": ((_BIG, 0, 1),)},
    {"l": _BIG, "p": ((_BIG, 1, 1),)},
    {"l": _BIG - 1, "p": ((_BIG - 1, 1, 1),)},
    {"l": 1 << 24, "p": ((4096, 0, 4096),)},
    {"l": (1 << 24) + 4096, "p": ((4096, 0, 4097),)},
    {"l": 0, "p": ((4096, 0, 0),)},
    {"o": U64 - 8191, "l": 8192},
    {"o": U64 - 8190, "l": 8192},
    {"err": 5, "msg": "\u00e9" * 512},
    {"err": 5, "msg": "\u00e9" * 513},
    {"err": 5, "msg": "x" * 1024},
    {"err": 4095, "msg": "\ud800"},
]


def test_hot_decode_agrees_with_the_general_rules_field_by_field() -> None:
    """Each field of a valid READ, WRITE and Reply swapped for each value of a list near
    every rule's edge (and a few fields together), under every flag and data length: the
    one-pass check accepts exactly what the general rules accept."""
    checked = accepted = 0
    for msg_type, valid in _VALID_HOT.items():
        variants = [{key: value} for key in valid for value in _SWAPS] + _OVERLAYS
        for variant in variants:
            for flags in (0, *(int(f) for f in ALLOWED_FLAGS.values())):
                for data_len in (0, 512, 8192, _BIG - 1):
                    meta = {**valid, **{k: v for k, v in variant.items() if k in valid}}
                    if check_hot(int(msg_type), meta, flags, data_len):
                        accepted += 1
                    checked += 1
    assert accepted > 100 and checked - accepted > 1000, (checked, accepted)


def test_hot_encode_check_agrees_with_the_general_rules() -> None:
    """What the encoder's one-pass check passes, the general rules pass too (values msgpack
    could not even carry included), and the usual messages do pass it."""
    names = {"t": "tid", "s": "sub", "h": "handle", "o": "offset", "l": "length", "e": "epoch"}
    names["p"] = "pages"
    for cls, msg_type in ((ReadRequest, MsgType.READ), (WriteRequest, MsgType.WRITE)):
        valid = _VALID_HOT[msg_type]
        for variant in [{k: v} for k in valid for v in [*_SWAPS, U64 + 1, -(2**70)]] + _OVERLAYS:
            fields = {names[k]: v for k, v in {**valid, **variant}.items() if k in valid}
            for flags in (0, 1, 2, 4, 8, 16, 32, 64):
                msg = cls(**fields, flags=flags)
                for data_len in (0, 8192, _BIG):
                    assert hot.valid(msg, data_len) == general_valid(msg, data_len), (msg, data_len)
    for tid, sub, code, text in [(7, 1, 0, ""), (U64 + 1, 0, 0, ""), (1, 1, 5, "é" * 513)]:
        reply = Reply(tid, sub, code, text)
        for data_len in (0, 4096):
            assert hot.valid(reply, data_len) == general_valid(reply, data_len), reply
    assert hot.valid(Reply(7, 1, 0, ""), 4096) and hot.valid(Reply(7, 1, 5, "no"), 0)


def general_valid(msg: Message, data_len: int) -> bool:
    try:
        validate(msg)
        codec._frame_rules(msg, getattr(msg, "flags", 0), data_len)
    except FieldError:
        return False
    return True


def check_hot(msg_type: int, meta: dict[str, Any], flags: int, data_len: int) -> bool:
    """Assert the verdicts agree; True if the message is valid."""
    try:
        packed = msgpack.packb(meta, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return False  # not representable in msgpack: never on the wire
    obj = msgpack.unpackb(packed, raw=False, use_list=False, strict_map_key=True)
    fast = hot.decode[msg_type](obj, flags, data_len)
    with patch.dict(hot.decode, clear=True):  # the general path alone
        frame = decode_raw(raw_frame(msg_type, packed, bytes(data_len), flags))
    general_ok = frame is not None and not isinstance(frame, BadRequest)
    assert (fast is not None) == general_ok, (meta, flags, data_len, fast, frame)
    if fast is not None:
        assert fast == frame
        assert hot.valid(fast, data_len)  # and the encoder's check agrees
    return fast is not None


def decode_raw(raw: bytes) -> Message | None:
    """The message of one frame, or None where the decoder refuses it."""
    try:
        frame = FrameDecoder()
        frame.receive_data(raw)
        frame.receive_data(b"")
        got = frame.next_frame()
    except RemoteProtocolError:
        return None
    return got.message if got is not None else None
