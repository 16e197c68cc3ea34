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
    encode_frame,
)
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
