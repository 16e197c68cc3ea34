"""The frame codec: every vector whole and byte by byte, every header check on
the 24 bytes alone, crcs, malformed meta, field errors answered or fatal, the
encoder's zero-copy contract, and the administration messages' bounds."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import crc32c
import msgpack
import pytest

from dst.errors import LocalProtocolError, RemoteProtocolError
from dst.wire import (
    ALLOWED_FLAGS,
    HEADER_SIZE,
    MAGIC,
    MAX_CHECKSUMS,
    MAX_DATA_LEN,
    MAX_META_LEN,
    MAX_PAGE_RUNS,
    MAX_STATUS_DEPTH,
    MAX_STATUS_KEY_LEN,
    MIN_CHECKSUM_EXTENT,
    MSG_TYPE_OF,
    REQUEST_TYPES,
    TID_ONLY_TYPES,
    Attach,
    BadRequest,
    ChecksumRequest,
    Errno,
    FlushRequest,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    Message,
    MsgType,
    Ping,
    PromoteRequest,
    ReadRequest,
    Reply,
    StatusReply,
    StatusRequest,
    StatusValue,
    SyncRequest,
    TrimRequest,
    Welcome,
    WriteRequest,
    WriteZeroesRequest,
    check_data,
    checksum_count,
    checksum_data_len,
    data_crc,
    encode_frame,
    pack_checksums,
    parse_meta,
    parse_prefix,
    unpack_checksums,
)
from tests.unit.test_vectors import INDEX, vector_bytes

VALID = [e for e in INDEX if e["outcome"] != "fatal"]
U64 = 2**64 - 1
READ_META: dict[str, Any] = {"t": 1, "s": 2, "h": 3, "o": 0, "l": 1024, "p": [[512, 0, 2]]}
SUM_META: dict[str, Any] = {"t": 1, "s": 2, "h": 3, "o": 0, "l": 8192, "ext": 4096}
ATTACH_META: dict[str, Any] = {"t": 1, "vol": "v", "e": 0, "c": "share"}
PROMOTE_META: dict[str, Any] = {"t": 1, "vol": "vol0", "f": False}
HELLO_META: dict[str, Any] = {
    "v": [1, 1],
    "id": "c",
    "role": "client",
    "ps": 4096,
    "lim": {},
    "feat": [],
    "mif": 8,
}


def raw_frame(msg_type: int, meta: Any, data: bytes = b"", flags: int = 0, **patch: int) -> bytes:
    """A frame with any meta (an object to msgpack, or raw bytes) and sound crcs,
    unless ``patch`` overrides header fields after the crcs are computed."""
    meta_bytes = meta if isinstance(meta, bytes) else msgpack.packb(meta, use_bin_type=True)
    f = {"magic": MAGIC, "version": 1, "meta_len": len(meta_bytes), "data_len": len(data)}
    f["data_crc"] = crc32c.crc32c(data)
    f.update({k: v for k, v in patch.items() if k != "header_crc"})
    head = struct.pack(
        ">IBBHIII", f["magic"], f["version"], msg_type, flags, f["meta_len"], f["data_len"],
        f["data_crc"],
    )  # fmt: skip
    header_crc = patch.get("header_crc", crc32c.crc32c(meta_bytes, crc32c.crc32c(head)))
    return head + struct.pack(">I", header_crc) + meta_bytes + data


def decode(raw: bytes, *, eof: bool = True) -> Frame | None:
    decoder = FrameDecoder()
    decoder.receive_data(raw)
    if eof:
        decoder.receive_data(b"")
    return decoder.next_frame()


def decode_message(raw: bytes) -> Message:
    frame = decode(raw)
    assert frame is not None
    return frame.message


def whole(msg: Message, data: bytes = b"") -> bytes:
    return encode_frame(msg, [data] if data else []) + data


# -- vectors, whole, split and back to back -----------------------------------


@pytest.mark.parametrize("entry", [pytest.param(e, id=e["file"]) for e in VALID])
def test_vector_fed_one_byte_at_a_time(entry: dict[str, Any]) -> None:
    raw = vector_bytes(entry)
    decoder = FrameDecoder()
    for i in range(len(raw) - 1):
        decoder.receive_data(raw[i : i + 1])
        assert decoder.next_frame() is None
    decoder.receive_data(raw[-1:])
    frame = decoder.next_frame()
    assert frame is not None and frame == decode(raw)
    assert decoder.next_frame() is None and not decoder.eof


@pytest.mark.parametrize("chunk", [1, 5, 24, 100, 4096, 1 << 20])
def test_all_vectors_back_to_back(chunk: int) -> None:
    stream = b"".join(vector_bytes(e) for e in VALID)
    decoder, frames = FrameDecoder(), []
    for i in range(0, len(stream), chunk):
        decoder.receive_data(stream[i : i + chunk])
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    decoder.receive_data(b"")
    assert decoder.next_frame() is None and decoder.eof
    assert frames == [decode(vector_bytes(e)) for e in VALID]


@pytest.mark.parametrize("entry", [pytest.param(e, id=e["file"]) for e in VALID])
def test_truncated_frame_waits_then_fails_at_eof(entry: dict[str, Any]) -> None:
    raw = vector_bytes(entry)
    for cut in sorted({*range(1, min(len(raw), 80)), *range(80, len(raw), 97)}):
        assert decode(raw[:cut], eof=False) is None
        with pytest.raises(RemoteProtocolError, match="EOF inside"):
            decode(raw[:cut])


def test_empty_stream_is_a_clean_eof() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    assert decoder.next_frame() is None and decoder.eof
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


# -- the 24-byte prefix --------------------------------------------------------

FLUSH_META = {"t": 1, "s": 0, "h": 2}


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        ({"magic": 0x46545344}, "magic"),
        ({"magic": 0}, "magic"),
        ({"version": 0}, "version"),
        ({"version": 2}, "version"),
        ({"meta_len": 0}, "meta_len"),
        ({"meta_len": MAX_META_LEN + 1}, "meta_len"),
        ({"meta_len": 2**32 - 1}, "meta_len"),
        ({"data_len": MAX_DATA_LEN + 1}, "data_len"),
        ({"data_len": 2**32 - 1}, "data_len"),
    ],
)
def test_prefix_refused_on_24_bytes_alone(patch: dict[str, int], why: str) -> None:
    head = raw_frame(MsgType.FLUSH, FLUSH_META, b"", **patch)[:HEADER_SIZE]
    with pytest.raises(RemoteProtocolError, match=why):
        parse_prefix(head)
    decoder = FrameDecoder()
    decoder.receive_data(head)  # nothing more: the check must not wait for more bytes
    with pytest.raises(RemoteProtocolError, match=why):
        decoder.next_frame()


def test_prefix_at_the_caps_is_accepted() -> None:
    head = raw_frame(MsgType.WRITE, FLUSH_META, meta_len=MAX_META_LEN, data_len=MAX_DATA_LEN)
    prefix = parse_prefix(head[:HEADER_SIZE])
    assert (prefix.meta_len, prefix.data_len) == (MAX_META_LEN, MAX_DATA_LEN)


@pytest.mark.parametrize("size", [0, 23, 25])
def test_parse_prefix_takes_exactly_24_bytes(size: int) -> None:
    with pytest.raises(RemoteProtocolError, match="24"):
        parse_prefix(bytes(size))


def test_parse_meta_checks_meta_length() -> None:
    raw = whole(Ping(1))
    prefix = parse_prefix(raw[:HEADER_SIZE])
    with pytest.raises(RemoteProtocolError, match="meta is"):
        parse_meta(prefix, raw[HEADER_SIZE:-1])
    assert parse_meta(prefix, memoryview(raw)[HEADER_SIZE:]) == Ping(1)


# -- crcs ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [pytest.param(e, id=e["file"]) for e in VALID])
def test_every_single_bit_flip_is_refused(entry: dict[str, Any]) -> None:
    raw = bytearray(vector_bytes(entry))
    meta_end = HEADER_SIZE + int.from_bytes(raw[8:12], "big")
    bits = [*range(meta_end * 8), *range(meta_end * 8, len(raw) * 8, 13)]  # data: sampled
    for bit in bits:
        raw[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(RemoteProtocolError):
            decode(bytes(raw))
        raw[bit // 8] ^= 1 << (bit % 8)


def test_header_crc_is_checked_before_msgpack() -> None:
    garbage = b"\xc1\xc1\xc1"  # never valid msgpack
    with pytest.raises(RemoteProtocolError, match="header crc"):
        decode(raw_frame(MsgType.FLUSH, garbage, header_crc=0))
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        decode(raw_frame(MsgType.FLUSH, garbage))


def test_data_crc_mismatch_is_fatal() -> None:
    write = WriteRequest(1, 0, 2, 0, 8, 1, ((8, 0, 1),))
    raw = bytearray(whole(write, b"abcdefgh"))
    raw[-1] ^= 0x01
    with pytest.raises(RemoteProtocolError, match="data crc"):
        decode(bytes(raw))


def test_data_crc_known_values() -> None:
    assert data_crc([b"123456789"]) == 0xE3069283
    assert data_crc([b"1234", memoryview(b"5678"), bytearray(b"9")]) == 0xE3069283
    assert data_crc([]) == data_crc([b""]) == 0


def test_check_data_wants_exactly_data_len_bytes() -> None:
    prefix = parse_prefix(whole(WriteRequest(1, 0, 2, 0, 4, 1, ((4, 0, 1),)), b"abcd")[:24])
    check_data(prefix, [b"ab", b"cd"])
    with pytest.raises(RemoteProtocolError, match="data is 3 bytes"):
        check_data(prefix, [b"abc"])
    with pytest.raises(RemoteProtocolError, match="data crc"):
        check_data(prefix, [b"abce"])


# -- malformed meta: fatal -------------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [
        msgpack.packb([1, 2, 3]),
        msgpack.packb(7),
        msgpack.packb("t"),
        msgpack.packb(None),
        msgpack.packb(b"\x81\xa1t\x01", use_bin_type=True),
    ],
    ids=["array", "int", "str", "nil", "bin"],
)
def test_meta_that_is_not_a_map_is_fatal(meta: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not a map"):
        decode(raw_frame(MsgType.FLUSH, meta))


@pytest.mark.parametrize(
    "meta",
    [
        b"\x81\x01\x02",  # {1: 2}: a non-string key
        b"\x81\xc4\x01t\x01",  # {b"t": 1}: a bin key
        b"\x81\xa1t\x81\xc4\x01x\x01",  # a bin key in a nested map
        b"\x82\xa1t\x01\xa1t\x02",  # "t" twice
        msgpack.packb(FLUSH_META) + b"\x00",  # trailing byte
        msgpack.packb(FLUSH_META)[:-1],  # truncated
        b"\x81\xa1t\xa2\xff\xfe",  # invalid UTF-8
        b"\x81\xa1t" + b"\x91" * 5000 + b"\x00",  # nested beyond any stack
        b"\xdf\xff\xff\xff\xff",  # a map claiming 2**32-1 entries
        b"\x82\xa1t\x01\xa1z\x82\xa1a\x01\xa1a\x02",  # "a" twice, under an unknown key
    ],
    ids=[
        "int-key",
        "bin-key",
        "nested-bin-key",
        "repeated-key",
        "trailing",
        "truncated",
        "utf8",
        "deep",
        "huge-map",
        "nested-repeated-key",
    ],
)
# FLUSH, READ and REPLY take the codec's fast path (msgpack without the per-map hook); it
# must refuse exactly what the general path refuses.
@pytest.mark.parametrize("msg_type", [MsgType.FLUSH, MsgType.READ, MsgType.REPLY])
def test_undecodable_meta_is_fatal(meta: bytes, msg_type: MsgType) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(raw_frame(msg_type, meta))


# -- field errors: answered for requests, fatal otherwise -----------------------


@pytest.mark.parametrize("key", ["h", "o", "l", "p"])
@pytest.mark.parametrize("bad", ["x", 1.5, None, True, [1], {"a": 1}, -1])
def test_wrong_typed_request_field_is_answered_naming_it(key: str, bad: Any) -> None:
    msg = decode_message(raw_frame(MsgType.READ, READ_META | {key: bad}))
    assert isinstance(msg, BadRequest)
    assert (msg.tid, msg.sub, msg.msg_type, msg.errno) == (1, 2, MsgType.READ, Errno.EINVAL)
    name = {"h": "handle", "o": "offset", "l": "length", "p": "pages"}[key]
    assert f"'{name}" in msg.message


def test_missing_request_field_is_answered() -> None:
    meta = {k: v for k, v in READ_META.items() if k != "o"}
    msg = decode_message(raw_frame(MsgType.READ, meta))
    assert isinstance(msg, BadRequest) and "'offset'" in msg.message and "missing" in msg.message


@pytest.mark.parametrize(
    ("meta", "why"),
    [
        (READ_META | {"t": -1}, "tid"),
        (READ_META | {"t": "1"}, "tid"),
        (READ_META | {"s": 2**16}, "sub"),
        ({k: v for k, v in READ_META.items() if k != "s"}, "sub"),
    ],
)
def test_request_without_usable_tid_or_sub_is_fatal(meta: dict[str, Any], why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        decode(raw_frame(MsgType.READ, meta))


@pytest.mark.parametrize(
    ("key", "bad", "field"),
    [("ps", "4096", "page_size"), ("ps", 3000, "page_size"), ("role", "root", "role"),
     ("v", [2, 1], "versions"), ("lim", {"max_bytes": -1}, "limits"), ("feat", [1], "features"),
     ("id", "", "node_id"), ("id", "x" * 129, "node_id"), ("mif", 70000, "max_inflight")],
)  # fmt: skip
def test_bad_hello_field_is_fatal_naming_it(key: str, bad: Any, field: str) -> None:
    with pytest.raises(RemoteProtocolError, match=field):
        decode(raw_frame(MsgType.HELLO, HELLO_META | {key: bad}))


def test_unknown_keys_are_ignored() -> None:
    meta = FLUSH_META | {"zz": [1, 2], "future": {"a": None}}
    assert decode_message(raw_frame(MsgType.FLUSH, meta)) == FlushRequest(1, 0, 2)
    hello = decode_message(raw_frame(MsgType.HELLO, HELLO_META | {"lim": {"max_bytes": 9, "x": 1}}))
    assert isinstance(hello, Hello) and dict(hello.limits) == {"max_bytes": 9}


@pytest.mark.parametrize("msg_type", [0x00, 0x05, 0x15, 0x22, 0x32, 0x4F, 0x55, 0xFF])
def test_unknown_type_is_answered_if_it_has_a_tid(msg_type: int) -> None:
    msg = decode_message(raw_frame(msg_type, {"t": 5, "s": 6, "new": 1}))
    assert msg == BadRequest(
        5, 6, msg_type, Errno.EOPNOTSUPP, f"unknown message type {msg_type:#04x}"
    )
    assert decode_message(raw_frame(msg_type, {"t": 5})) == BadRequest(
        5, 0, msg_type, Errno.EOPNOTSUPP, f"unknown message type {msg_type:#04x}"
    )
    with pytest.raises(RemoteProtocolError, match="tid"):
        decode(raw_frame(msg_type, {"s": 6}))


REQUESTS: list[Message] = [
    ReadRequest(1, 0, 2, 0, 512, ((512, 0, 1),)),
    WriteRequest(1, 0, 2, 0, 4, 1, ((4, 0, 1),)),
    FlushRequest(1, 0, 2),
    TrimRequest(1, 0, 2, 0, 512, 1),
    WriteZeroesRequest(1, 0, 2, 0, 512, 1),
    ChecksumRequest(1, 0, 2, 0, 4096, 4096),
]


@pytest.mark.parametrize("request_msg", REQUESTS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("bit", range(16))
def test_flags_table(request_msg: Message, bit: int) -> None:
    data = b"abcd" if isinstance(request_msg, WriteRequest) else b""
    good = whole(request_msg, data)
    raw = bytearray(good)
    raw[6:8] = (1 << bit).to_bytes(2, "big")
    raw[20:24] = crc32c.crc32c(raw[24 : len(good) - len(data)], crc32c.crc32c(raw[:20])).to_bytes(
        4, "big"
    )
    msg = decode_message(bytes(raw))
    if ALLOWED_FLAGS[type(request_msg)] & (1 << bit):
        assert type(msg) is type(request_msg)
        assert isinstance(msg, REQUEST_TYPES) and msg.flags == 1 << bit
    else:
        assert isinstance(msg, BadRequest) and msg.errno == Errno.EINVAL and "flags" in msg.message


@pytest.mark.parametrize(
    "msg",
    [Ping(1), Reply(1, 0, 0), Goodbye(0), Attach(1, "v"), StatusRequest(1),
     PromoteRequest(1, "v", True), StatusReply(1, {}), SyncRequest(1, "v", "query", {})],
    ids=lambda m: type(m).__name__,
)  # fmt: skip
def test_flags_on_a_non_request(msg: Message) -> None:
    raw = whole(msg)
    meta = raw[HEADER_SIZE:]
    frame = raw_frame(MSG_TYPE_OF[type(msg)], meta, flags=1)
    if isinstance(msg, TID_ONLY_TYPES):  # answerable: it has a tid
        got = decode_message(frame)
        assert isinstance(got, BadRequest) and "flags" in got.message
    else:
        with pytest.raises(RemoteProtocolError, match="flags"):
            decode(frame)


@pytest.mark.parametrize(
    ("meta", "msg_type", "data", "errno", "field"),
    [
        (READ_META, MsgType.READ, b"x", Errno.EINVAL, "data_len"),
        (READ_META | {"l": 0, "p": []}, MsgType.READ, b"", Errno.EINVAL, "length"),
        (READ_META | {"l": MAX_DATA_LEN + 512}, MsgType.READ, b"", Errno.E2BIG, "length"),
        (READ_META | {"o": U64, "l": 1024}, MsgType.READ, b"", Errno.EOVERFLOW, "length"),
        (READ_META | {"h": 2**32}, MsgType.READ, b"", Errno.EINVAL, "handle"),
        (READ_META | {"p": [[512, 0, 1]]}, MsgType.READ, b"", Errno.EINVAL, "pages"),
        (READ_META | {"p": [[512, 2**20 - 256, 2]]}, MsgType.READ, b"", Errno.EINVAL, "pages[0]"),
        (READ_META | {"p": [[1024, 0, 1], [0, 0, 1]]}, MsgType.READ, b"", Errno.EINVAL, "pages[1]"),
        (READ_META | {"p": [[1024, 0, 1, 0]]}, MsgType.READ, b"", Errno.EINVAL, "pages"),
        (READ_META | {"p": [[1, 0, 1]] * 1024 + [[0, 0, 0]] * (MAX_PAGE_RUNS)}, MsgType.READ, b"",
         Errno.EINVAL, "pages"),
        (FLUSH_META | {"o": 1, "l": 0, "e": 1}, MsgType.TRIM, b"", Errno.EINVAL, "length"),
        (FLUSH_META | {"o": 2**63, "l": 2**63 + 1, "e": 1}, MsgType.TRIM, b"", Errno.EOVERFLOW,
         "length"),
        (ATTACH_META | {"vol": ""}, MsgType.ATTACH, b"", Errno.EINVAL, "volume"),
        (ATTACH_META | {"vol": "a/\n"}, MsgType.ATTACH, b"", Errno.EINVAL, "volume"),
        (ATTACH_META | {"vol": "v" * 256}, MsgType.ATTACH, b"", Errno.EINVAL, "volume"),
        ({"t": 1, "vol": "v", "e": 0, "c": "steal"}, MsgType.ATTACH, b"", Errno.EINVAL, "claim"),
        ({"t": 1, "vol": "v", "e": 0}, MsgType.ATTACH, b"", Errno.EINVAL, "claim"),
        (SUM_META | {"l": 0}, MsgType.CHECKSUM, b"", Errno.EINVAL, "length"),
        (SUM_META | {"l": 8191}, MsgType.CHECKSUM, b"", Errno.EINVAL, "length"),
        (SUM_META | {"l": 4096 * MAX_CHECKSUMS + 512}, MsgType.CHECKSUM, b"", Errno.E2BIG,
         "length"),
        (SUM_META | {"o": U64 - 511, "l": 1024}, MsgType.CHECKSUM, b"", Errno.EOVERFLOW, "length"),
        (SUM_META | {"h": 2**32}, MsgType.CHECKSUM, b"", Errno.EINVAL, "handle"),
        (SUM_META | {"ext": 2048}, MsgType.CHECKSUM, b"", Errno.EINVAL, "extent"),
        (SUM_META | {"ext": 6144}, MsgType.CHECKSUM, b"", Errno.EINVAL, "extent"),
        (SUM_META | {"ext": 2**64 - 1}, MsgType.CHECKSUM, b"", Errno.EINVAL, "extent"),
        (SUM_META | {"ext": 4096.0}, MsgType.CHECKSUM, b"", Errno.EINVAL, "extent"),
        ({k: v for k, v in SUM_META.items() if k != "ext"}, MsgType.CHECKSUM, b"", Errno.EINVAL,
         "extent"),
        (SUM_META, MsgType.CHECKSUM, b"x", Errno.EINVAL, "data_len"),
        (PROMOTE_META | {"f": 1}, MsgType.PROMOTE, b"", Errno.EINVAL, "force"),
        (PROMOTE_META | {"f": None}, MsgType.PROMOTE, b"", Errno.EINVAL, "force"),
        ({"t": 1, "vol": "vol0"}, MsgType.PROMOTE, b"", Errno.EINVAL, "force"),
        (PROMOTE_META | {"vol": ""}, MsgType.PROMOTE, b"", Errno.EINVAL, "volume"),
        (PROMOTE_META | {"vol": "a\tb"}, MsgType.PROMOTE, b"", Errno.EINVAL, "volume"),
        (PROMOTE_META, MsgType.PROMOTE, b"x", Errno.EINVAL, "data_len"),
        ({"t": 1}, MsgType.STATUS, b"x", Errno.EINVAL, "data_len"),
    ],
)  # fmt: skip
def test_request_rules_are_answered(
    meta: dict[str, Any], msg_type: int, data: bytes, errno: int, field: str
) -> None:
    msg = decode_message(raw_frame(msg_type, meta, data))
    assert isinstance(msg, BadRequest), msg
    assert (msg.errno, msg.msg_type) == (errno, msg_type) and f"'{field}" in msg.message
    assert len(msg.message.encode()) <= 1024


def test_write_data_len_must_equal_length() -> None:
    meta = READ_META | {"e": 1}
    for data in (b"", b"x" * 1023, b"x" * 1025):
        msg = decode_message(raw_frame(MsgType.WRITE, meta, data))
        assert isinstance(msg, BadRequest) and "data_len" in msg.message
    assert isinstance(decode_message(raw_frame(MsgType.WRITE, meta, b"x" * 1024)), WriteRequest)


def test_data_on_a_non_request_is_fatal_except_an_ok_reply() -> None:
    with pytest.raises(RemoteProtocolError, match="data_len"):
        decode(raw_frame(MsgType.HELLO, HELLO_META, b"x"))
    with pytest.raises(RemoteProtocolError, match="data_len"):
        decode(raw_frame(MsgType.REPLY, {"t": 1, "s": 0, "err": 5, "msg": "no"}, b"x"))
    assert decode(raw_frame(MsgType.REPLY, {"t": 1, "s": 0, "err": 0, "msg": ""}, b"x"))


def test_reply_success_must_have_an_empty_message() -> None:
    with pytest.raises(RemoteProtocolError, match="message"):
        decode(raw_frame(MsgType.REPLY, {"t": 1, "s": 0, "err": 0, "msg": "fine"}))


# -- the encoder ---------------------------------------------------------------


def test_encode_frame_never_includes_the_data() -> None:
    views: list[bytes | bytearray | memoryview] = [
        memoryview(bytearray(b"\xaa" * 4096)),
        bytearray(b"\xbb" * 4096),
        b"\xcc" * 8192,
    ]
    write = WriteRequest(9, 1, 2, 4096, 16384, 3, ((4096, 0, 4),), 1)
    head = encode_frame(write, views)
    prefix = parse_prefix(head[:HEADER_SIZE])
    assert len(head) == HEADER_SIZE + prefix.meta_len < 100
    assert prefix.data_len == 16384 and prefix.data_crc == data_crc(views)
    assert parse_meta(prefix, head[HEADER_SIZE:]) == write
    check_data(prefix, views)


def test_encode_frame_forwards_a_given_data_crc() -> None:
    write = WriteRequest(9, 1, 2, 0, 4, 3, ((4, 0, 1),))
    head = encode_frame(write, [b"abcd"], data_crc=0x12345678)
    prefix = parse_prefix(head[:HEADER_SIZE])
    assert prefix.data_crc == 0x12345678  # taken as given, not recomputed
    with pytest.raises(RemoteProtocolError, match="data crc"):
        check_data(prefix, [b"abcd"])  # ... so the receiver catches a wrong one
    good = encode_frame(write, [b"abcd"], data_crc=data_crc([b"abcd"]))
    assert good == encode_frame(write, [b"abcd"])


def test_int_enums_encode_as_plain_ints() -> None:
    msg = decode_message(whole(Reply(1, 2, Errno.ESTALE, "old epoch")))
    assert msg == Reply(1, 2, 116, "old epoch")
    assert isinstance(msg, Reply) and type(msg.errno) is int


WRITE4 = WriteRequest(1, 0, 2, 0, 4, 1, ((4, 0, 1),))


@pytest.mark.parametrize(
    ("msg", "data", "kwargs", "match"),
    [
        (BadRequest(1, 0, 0x10, 22, "x"), [], {}, "not sent"),
        (WRITE4, [b"abc"], {}, "data_len"),
        (WRITE4, [b"abcd"], {"data_crc": 2**32}, "data_crc"),
        (FlushRequest(1, 0, 2), [], {"data_crc": 5}, "data_crc"),
        (FlushRequest(1, 0, 2), [b"x"], {}, "data_len"),
        (FlushRequest(1, 0, 2, flags=1), [], {}, "flags"),
        (FlushRequest(-1, 0, 2), [], {}, "tid"),
        (ReadRequest(1, 0, 2, 0, 512, ((256, 0, 1),)), [], {}, "pages"),
        (ReadRequest(1, 0, 2, 0, 512, [(512, 0, 1)]), [], {}, "pages"),  # type: ignore[arg-type]
        (Reply(1, 0, 5, "bad"), [b"x"], {}, "data_len"),
        (Reply(1, 0, 0, "fine"), [], {}, "message"),
        (Reply(1, 0, 5000), [], {}, "errno"),
        (Reply(1, 0, 5, "x" * 1025), [], {}, "message"),
        (Reply(1, 0, 5, "\udc80"), [], {}, "message"),
        (Hello((1, 1), "n", "client", 4096, {"speed": 1}, (), 1), [], {}, "limits"),
        (Hello((1, 1), "n", "client", 4096, {}, ("a", "a"), 1), [], {}, "features"),
        (Hello((1, 1), "n", "server", 4096, {}, (), 1), [], {}, "role"),
        (Hello((1,), "n", "client", 4096, {}, (), 1), [], {}, "versions"),  # type: ignore[arg-type]
        (Welcome(1, "n", "replica", 4096, {}, (), 0), [], {}, "max_inflight"),
        (Ping(True), [], {}, "token"),
    ],
)  # fmt: skip
def test_encode_refuses_what_a_receiver_would(
    msg: Message, data: list[bytes], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_frame(msg, data, **kwargs)


def test_the_largest_page_list_fits_the_meta_cap() -> None:
    size = MAX_DATA_LEN // MAX_PAGE_RUNS
    runs = tuple((size, 2**20 - size - i % 7, 1) for i in range(MAX_PAGE_RUNS))
    write = WriteRequest(U64, 2**16 - 1, 2**32 - 1, 2**40, MAX_DATA_LEN, U64, runs, 7)
    head = encode_frame(write, [memoryview(bytearray(MAX_DATA_LEN))])
    assert len(head) - HEADER_SIZE <= MAX_META_LEN // 2
    too_many = ((1, 0, 1),) * (MAX_PAGE_RUNS + 1)
    with pytest.raises(LocalProtocolError, match="pages"):
        encode_frame(ReadRequest(1, 0, 2, 0, MAX_PAGE_RUNS + 1, too_many))


def test_decoder_errors_are_sticky() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"XXXX" + bytes(20) + whole(Ping(1)))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="magic"):
            decoder.next_frame()


def test_every_request_type_round_trips() -> None:
    for msg in REQUESTS:
        data = b"abcd" if isinstance(msg, WriteRequest) else b""
        frame = decode(whole(msg, data))
        assert frame is not None and frame.message == msg and frame.data == data
    assert set(map(type, REQUESTS)) == set(REQUEST_TYPES)


# -- administration: status, promote, checksums --------------------------------


@pytest.mark.parametrize(
    ("msg_type", "meta"), [(MsgType.STATUS, {"s": 9}), (MsgType.PROMOTE, PROMOTE_META)]
)
def test_status_and_promote_answer_under_sub_0(msg_type: int, meta: dict[str, Any]) -> None:
    """Like Attach they have no sub: an `s` is an unknown key, ignored."""
    msg = decode_message(raw_frame(msg_type, meta | {"t": 4, "s": 9}, b"x"))
    assert isinstance(msg, BadRequest) and (msg.tid, msg.sub, msg.msg_type) == (4, 0, msg_type)
    with pytest.raises(RemoteProtocolError, match="tid"):
        decode(raw_frame(msg_type, {k: v for k, v in meta.items() if k != "t"}))


@pytest.mark.parametrize(
    ("length", "extent", "count"),
    [(512, 4096, 1), (4096, 4096, 1), (8704, 4096, 3), (2**20, 2**16, 16),
     (4096 * MAX_CHECKSUMS, 4096, MAX_CHECKSUMS), (2**63, 2**63, 1), (2**64 - 512, 2**63, 2),
     (2**20 * MAX_CHECKSUMS - 512, 2**20, MAX_CHECKSUMS)],
)  # fmt: skip
def test_checksum_at_the_bounds(length: int, extent: int, count: int) -> None:
    msg = ChecksumRequest(2**64 - 1, 2**16 - 1, 2**32 - 1, 2**64 - length, length, extent, 4)
    assert decode_message(whole(msg)) == msg
    assert checksum_count(msg) == count and checksum_data_len(msg) == 4 * count
    assert MIN_CHECKSUM_EXTENT == 4096 and 4 * MAX_CHECKSUMS <= 64 * 1024


def test_checksum_data_packs_big_endian_crcs() -> None:
    crcs = (0, 1, 0xE3069283, 2**32 - 1)
    data = pack_checksums(crcs)
    assert data == bytes.fromhex("0000000000000001e3069283ffffffff")
    assert unpack_checksums(data) == unpack_checksums(memoryview(bytearray(data))) == crcs
    assert pack_checksums([]) == b"" and unpack_checksums(b"") == ()
    with pytest.raises(RemoteProtocolError, match="multiple of 4"):
        unpack_checksums(data[:-1])
    with pytest.raises(LocalProtocolError):
        pack_checksums([2**32])
    with pytest.raises(LocalProtocolError):
        pack_checksums([-1])


def nested(depth: int, leaf: StatusValue = 1) -> dict[str, StatusValue]:
    """A status map whose containers nest exactly ``depth`` deep (the map is 1)."""
    value: StatusValue = leaf
    for i in range(depth - 1):
        value = [value] if i % 2 else {"k": value}
    return {"top": value}


STATUS: dict[str, StatusValue] = {
    "role": "primary",
    "connected": True,
    "resync": None,
    "out_of_sync": 0,
    "signed": -(2**63),
    "huge": 2**64 - 1,
    "peers": [{"id": "s2", "lag": [1, 2, 3]}, {}],
    "k" * MAX_STATUS_KEY_LEN: "a key at the cap",
    "é" * (MAX_STATUS_KEY_LEN // 2): "two bytes each",
    "": "",
}


@pytest.mark.parametrize(
    "status", [STATUS, {}, nested(MAX_STATUS_DEPTH), nested(MAX_STATUS_DEPTH - 1, [])],
    ids=["mixed", "empty", "deepest", "deepest-empty"],
)  # fmt: skip
def test_status_reply_round_trips(status: dict[str, StatusValue]) -> None:
    msg = StatusReply(2**64 - 1, status)
    frame = decode(whole(msg))
    assert frame is not None and frame.message == msg
    assert whole(frame.message) == whole(msg)  # canonical


def test_status_is_frozen_and_canonical() -> None:
    a = StatusReply(1, {"b": [1, {"y": 2, "x": [3]}], "a": True})
    b = StatusReply(1, {"a": True, "b": (1, {"x": (3,), "y": 2})})
    assert a == b and whole(a) == whole(b)  # lists kept as tuples, maps sorted on the wire
    assert whole(a)[HEADER_SIZE:] == msgpack.packb(
        {"t": 1, "st": {"a": True, "b": [1, {"x": [3], "y": 2}]}}
    )
    with pytest.raises(TypeError):
        a.status["c"] = 1  # type: ignore[index]
    inner = a.status["b"]
    assert isinstance(inner, tuple) and isinstance(inner[1], Mapping)
    with pytest.raises(TypeError):
        inner[1]["z"] = 1  # type: ignore[index]


def test_status_meta_is_capped_by_the_encoder() -> None:
    # {"t": 1, "st": {"a": <str16>}}: 13 bytes around the string
    fits = StatusReply(1, {"a": "x" * (MAX_META_LEN - 13)})
    assert len(whole(fits)) == HEADER_SIZE + MAX_META_LEN
    assert decode_message(whole(fits)) == fits
    with pytest.raises(LocalProtocolError, match="MAX_META_LEN"):
        encode_frame(StatusReply(1, {"a": "x" * (MAX_META_LEN - 12)}))


def cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("status", "match"),
    [
        ({"rate": 1.5}, "'status.rate' = 1.5"),
        ({"a": b"bin"}, "status"),
        ({"a": {1, 2}}, "status"),
        ({"a": -(2**63) - 1}, "status"),
        ({"a": 2**64}, "status"),
        ({"a": "\udc80"}, "Unicode"),
        ({"k" * (MAX_STATUS_KEY_LEN + 1): 1}, "128 bytes"),
        ({"é" * (MAX_STATUS_KEY_LEN // 2 + 1): 1}, "128 bytes"),
        ({1: 1}, "string"),
        (nested(MAX_STATUS_DEPTH + 1), "deeper than 8"),
        (nested(MAX_STATUS_DEPTH, []), "deeper than 8"),
        ({"a": cyclic()}, "deeper than 8"),
        ([("a", 1)], "must be a map"),
        (None, "must be a map"),
    ],
)
def test_encode_refuses_a_bad_status_tree(status: Any, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_frame(StatusReply(1, status))


@pytest.mark.parametrize(
    "st",
    [
        [["a", 1]],
        7,
        None,
        {"a": 1.5},
        {"a": b"bin"},
        {"a": msgpack.ExtType(1, b"x")},
        {"k" * (MAX_STATUS_KEY_LEN + 1): 1},
        nested(MAX_STATUS_DEPTH + 1),
        nested(MAX_STATUS_DEPTH, {}),
    ],
    ids=["array", "int", "nil", "float", "bin", "ext", "long-key", "too-deep", "too-deep-map"],
)
def test_malformed_status_reply_is_fatal(st: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="bad STATUS_REPLY: field 'status"):
        decode(raw_frame(MsgType.STATUS_REPLY, {"t": 1, "st": st}))


@pytest.mark.parametrize(
    "meta",
    [
        {"st": {}},
        {"t": -1, "st": {}},
        {"t": 1},
        b"\x82\xa1t\x01\xa2st\x81\xa1a\x81\x01\x02",  # {"t": 1, "st": {"a": {1: 2}}}
        b"\x82\xa1t\x01\xa2st\x81\xa1a\x91" + b"\x91" * 3000 + b"\xc0",  # beyond any stack
    ],
    ids=["no-tid", "negative-tid", "no-status", "int-key", "deep"],
)
def test_status_reply_without_usable_fields_is_fatal(meta: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(raw_frame(MsgType.STATUS_REPLY, meta))


def test_data_on_a_status_reply_is_fatal() -> None:
    with pytest.raises(RemoteProtocolError, match="data_len"):
        decode(raw_frame(MsgType.STATUS_REPLY, {"t": 1, "st": {}}, b"x"))


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (ChecksumRequest(1, 0, 2, 0, 4096, 4096, flags=1), "flags"),
        (ChecksumRequest(1, 0, 2, 0, 4000, 4096), "length"),
        (ChecksumRequest(1, 0, 2, 0, 4096, 4095), "extent"),
        (ChecksumRequest(1, 0, 2, 0, 4096, 2**64), "extent"),
        (ChecksumRequest(1, 0, 2, 0, 2**13 * MAX_CHECKSUMS, 4096), "checksums"),
        (PromoteRequest(1, "vol0", 0), "force"),  # type: ignore[arg-type]
        (PromoteRequest(1, "", False), "volume"),
        (PromoteRequest(2**64, "vol0", False), "tid"),
        (StatusRequest(-1), "tid"),
        (StatusReply(True, {}), "tid"),
        (SyncRequest(1, "vol0", "merge", {}), "action"),
        (SyncRequest(1, "vol0", "query", ()), "state"),  # type: ignore[arg-type]
        (SyncRequest(1, "vol0", "adopt", {"g": 2**64}), "state.g"),
        (SyncRequest(1, "", "query", {}), "volume"),
    ],
)  # fmt: skip
def test_encode_refuses_bad_administration(msg: Message, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_frame(msg)


def test_every_administration_message_round_trips() -> None:
    sync = SyncRequest(6, "vol0", "target", {"generations": {"current": "0x1", "h": (1, 2)}})
    for msg in (StatusRequest(0), StatusReply(3, STATUS), PromoteRequest(5, "vol0", True), sync):
        frame = decode(whole(msg))
        assert frame is not None and frame.message == msg and frame.data == b""
    assert set(TID_ONLY_TYPES) == {Attach, StatusRequest, PromoteRequest, SyncRequest}
    assert MSG_TYPE_OF[SyncRequest] == 0x54
    assert {MSG_TYPE_OF[t] for t in (StatusRequest, StatusReply, PromoteRequest)} == {
        0x50,
        0x51,
        0x52,
    }
    assert MSG_TYPE_OF[ChecksumRequest] == 0x53 and ChecksumRequest in REQUEST_TYPES
