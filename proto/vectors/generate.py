"""Regenerate the golden frames in proto/vectors/ from dst's codec.

    python3 proto/vectors/generate.py [OUT_DIR]      (default: this folder)

Writes one ``<name>.bin`` per vector -- the whole frame: header, meta and data
-- and ``index.json``, which says what each file must decode to, in terms any
implementation can check (see README.md).  The committed files are the
reference: ``tests/unit/test_vectors.py`` decodes and re-encodes them byte for
byte, and checks that this script still produces exactly them.  Change a
vector only with a protocol change, and say so in PROTOCOL.md.

Valid frames come from ``encode_frame``; invalid ones are built here by hand
(raw msgpack bytes, patched headers) so they stay what they claim to be even
if the encoder changes.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import crc32c

from dst.wire import (
    Attach,
    Attached,
    ChecksumRequest,
    Errno,
    FlushRequest,
    FrameFlags,
    Goodbye,
    Hello,
    Message,
    MsgType,
    Ping,
    Pong,
    PromoteRequest,
    ReadRequest,
    Received,
    Reply,
    StatusReply,
    StatusRequest,
    StatusValue,
    SyncRequest,
    TrimRequest,
    Welcome,
    WriteRequest,
    WriteZeroesRequest,
    data_crc,
    encode_frame,
    pack_checksums,
)

HERE = Path(__file__).resolve().parent
KIB, MIB = 1024, 1024 * 1024
LIMITS = {
    "logical_block_size": 512,
    "page_size": 4096,
    "max_bytes": 1 * MIB,
    "max_segments": 256,
    "max_segment_size": 64 * KIB,
    "boundary": 32 * KIB,
}


def pattern(size: int) -> bytes:
    """The data of every vector: byte i is (31 * i + 7) mod 256."""
    return bytes((31 * i + 7) & 0xFF for i in range(size))


def checksums(data: bytes, extent: int) -> bytes:
    """A checksum reply's data: the crc32c of each ``extent`` bytes of ``data``."""
    return pack_checksums(data_crc([data[i : i + extent]]) for i in range(0, len(data), extent))


def frame(msg_type: int, flags: int, meta: bytes, data: bytes = b"", **patch: int) -> bytes:
    """A frame from raw parts, crcs computed; ``patch`` overrides header fields
    (magic, version, data_len, data_crc, header_crc) after the crcs are set."""
    f = {"magic": 0x44535446, "version": 1, "data_len": len(data), "data_crc": crc32c.crc32c(data)}
    f.update({k: v for k, v in patch.items() if k != "header_crc"})
    head = struct.pack(
        ">IBBHIII", f["magic"], f["version"], msg_type, flags, len(meta), f["data_len"],
        f["data_crc"],
    )  # fmt: skip
    header_crc = patch.get("header_crc", crc32c.crc32c(meta, crc32c.crc32c(head)))
    return head + struct.pack(">I", header_crc) + meta + data


def good(msg: Message, data: bytes = b"") -> bytes:
    return encode_frame(msg, [data] if data else []) + data


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


def expect(msg: Message) -> dict[str, Any]:
    fields = {f.name: _jsonable(getattr(msg, f.name)) for f in dataclasses.fields(msg)}
    return {"outcome": "message", "type": type(msg).__name__, "fields": fields}


def bad_request(tid: int, sub: int, msg_type: int, errno: int, field: str) -> dict[str, Any]:
    fields = {"tid": tid, "sub": sub, "msg_type": msg_type, "errno": errno}
    return {"outcome": "bad_request", "type": "BadRequest", "fields": fields, "field": field}


def fatal(why: str) -> dict[str, Any]:
    return {"outcome": "fatal", "why": why}


def vectors() -> list[tuple[str, bytes, dict[str, Any], str]]:
    """(name, frame bytes, expected outcome, note) for every vector."""
    hello = Hello((1, 1), "client-a", "client", 4096, LIMITS, ("trim", "write_zeroes"), 64)
    welcome = Welcome(1, "server-1", "replica", 4096, LIMITS, ("trim",), 128)
    attached = Attached(1, 7, 64 * MIB, 3, LIMITS)
    read_1m = ReadRequest(2, 0, 7, 1 * MIB, 1 * MIB, ((4096, 0, 256),))
    read = ReadRequest(2, 1, 7, 3 * MIB + 512, 1536, ((1536, 2560, 1),), FrameFlags.FAILFAST)
    runs = ((512, 3584, 1), (1024, 0, 2))  # a misaligned bio: tail of one page, two halves
    write = WriteRequest(3, 1, 7, 63 * 512, 2560, 3, runs, FrameFlags.FUA | FrameFlags.FAILFAST)
    flush = FlushRequest(4, 0, 7)
    trim = TrimRequest(5, 0, 7, 2**40, 2**33, 3, FrameFlags.PREFLUSH)
    zeroes = WriteZeroesRequest(6, 2, 7, 0, 64 * KIB, 3, FrameFlags.NO_HOLE | FrameFlags.FUA)
    stale = Reply(3, 1, Errno.ESTALE, "write epoch 2 is older than volume epoch 3")
    bye = Goodbye(Errno.EPROTONOSUPPORT, "client offers protocol 2..3, server speaks 1..1")
    resync: StatusValue = {"done": 40 * MIB, "total": 64 * MIB, "rate": 20 * MIB}
    vol0: StatusValue = {"name": "vol0", "role": "primary", "disk": "up_to_date",
                         "peer_disk": "inconsistent", "connection": "sync_source",
                         "out_of_sync": 24 * MIB, "resync": resync}  # fmt: skip
    vol1: StatusValue = {"name": "vol1", "role": "primary", "disk": "up_to_date",
                         "peer_disk": None, "connection": "standalone", "out_of_sync": 0,
                         "resync": None}  # fmt: skip
    status: dict[str, StatusValue] = {"node_id": "server-1", "protocol": "C",
                                      "split_brain": False, "volumes": [vol0, vol1]}  # fmt: skip
    checksum = ChecksumRequest(22, 0, 7, 64 * KIB, 8704, 4096, FrameFlags.FAILFAST)
    gens = {"current": "0x0000000000000004", "bitmap": "0x0000000000000000"}
    sync = SyncRequest(23, "vol0", "query", {"generations": gens})
    volume = pattern(4096) + bytes(4096) + pattern(512)  # what the checksummed range holds
    out: list[tuple[str, bytes, dict[str, Any], str]] = []
    valid: list[tuple[str, Message, bytes, str]] = [
        ("hello", hello, b"", "client's first frame"),
        ("welcome", welcome, b"", "server's answer: version 1, the common feature"),
        ("attach", Attach(1, "vol0"), b"", "attach at the current epoch (0)"),
        ("attached", attached, b"", "handle 7, 64 MiB, epoch 3"),
        ("read_1m", read_1m, b"", "a contiguous 1 MiB bio on 4 KiB pages"),
        ("read", read, b"", "1536 bytes into one client page at offset 2560, FAILFAST"),
        ("write", write, pattern(2560), "multi-run pages, FUA|FAILFAST, 2560 data bytes"),
        ("flush", flush, b"", "flush, no flags"),
        ("trim", trim, b"", "8 GiB trim at 1 TiB (no data travels), PREFLUSH"),
        ("write_zeroes", zeroes, b"", "64 KiB of zeroes, NO_HOLE|FUA"),
        ("ping", Ping(0x0123456789ABCDEF), b"", "keepalive"),
        ("pong", Pong(0x0123456789ABCDEF), b"", "its answer, same token"),
        ("received", Received(3, 1), b"", "protocol B: the write's data is in (RECV_ACK)"),
        ("reply_ok", Reply(3, 1, 0), b"", "success of the write"),
        ("reply_read", Reply(2, 1, 0), pattern(1536), "success of the read, with its data"),
        ("reply_error", stale, b"", "a fenced write: ESTALE, definitely not applied"),
        ("goodbye", bye, b"", "version mismatch, sent before closing"),
        ("status", StatusRequest(20), b"", "dst status asks"),
        ("status_reply", StatusReply(20, status), b"", "a tree: maps sorted, arrays, nil, bool"),
        ("promote", PromoteRequest(21, "vol0", False), b"", "dst promote, not forced"),
        ("sync", sync, b"", "a primary asks its peer's generations at connect"),
        ("checksum", checksum, b"", "crc32c of 2 x 4 KiB and a 512-byte tail, FAILFAST"),
        ("reply_checksum", Reply(22, 0, 0), checksums(volume, 4096),
         "its answer, 3 big-endian crc32c: 4 KiB of pattern, a hole (zeros), 512 of pattern"),
    ]  # fmt: skip
    for name, msg, data, note in valid:
        out.append((name, good(msg, data), expect(msg), note))

    flush_meta = b"\x83\xa1t\x09\xa1s\x00\xa1h\x07"  # {"t": 9, "s": 0, "h": 7}
    read_frame = good(ReadRequest(10, 0, 7, 0, 512, ((512, 0, 1),)))
    read_meta = read_frame[24:]
    trim_meta = good(TrimRequest(11, 0, 7, 0, 1, 3))[24:].replace(b"\xa1l\x01", b"\xa1l\x00")
    write_meta = good(WriteRequest(12, 3, 7, 0, 8, 3, ((8, 0, 1),)), pattern(8))[24:-8]
    sum_meta = good(ChecksumRequest(13, 2, 7, 0, 8192, 4096))[24:]
    sum_meta = sum_meta.replace(b"\xa3ext\xcd\x10\x00", b"\xa3ext\xcd\x18\x00")  # 6144
    # {"t": 20, "st": {"rate": 1.5}}: a float is no status value
    float_meta = b"\x82\xa1t\x14\xa2st\x81\xa4rate\xcb" + struct.pack(">d", 1.5)
    out += [
        ("bad_unknown_type", frame(0x15, 0, flush_meta),
         bad_request(9, 0, 0x15, Errno.EOPNOTSUPP, "type"), "type 0x15 is not defined"),
        ("bad_flags", frame(MsgType.READ, FrameFlags.FUA | 0x100, read_meta),
         bad_request(10, 0, MsgType.READ, Errno.EINVAL, "flags"), "FUA and 0x100 on a read"),
        ("bad_length_zero", frame(MsgType.TRIM, 0, trim_meta),
         bad_request(11, 0, MsgType.TRIM, Errno.EINVAL, "length"), "trim of 0 bytes"),
        ("bad_write_data_len", frame(MsgType.WRITE, 0, write_meta, pattern(7)),
         bad_request(12, 3, MsgType.WRITE, Errno.EINVAL, "data_len"), "length 8, 7 data bytes"),
        ("bad_checksum_extent", frame(MsgType.CHECKSUM, 0, sum_meta),
         bad_request(13, 2, MsgType.CHECKSUM, Errno.EINVAL, "extent"),
         "extent 6144: not a power of two"),
        ("fatal_magic", frame(MsgType.FLUSH, 0, flush_meta, magic=0x44535447),
         fatal("bad magic"), "magic DSTG"),
        ("fatal_version", frame(MsgType.FLUSH, 0, flush_meta, version=2),
         fatal("frame version"), "frame version 2"),
        ("fatal_data_len_cap", frame(MsgType.WRITE, 0, write_meta, data_len=2**32 - 1)[:24],
         fatal("data_len"), "header alone: data_len 2**32-1 fails before any data"),
        ("fatal_header_crc", frame(MsgType.FLUSH, 0, flush_meta, header_crc=0xDEADBEEF),
         fatal("header crc"), "header crc wrong"),
        ("fatal_data_crc", frame(MsgType.WRITE, 0, write_meta, pattern(8), data_crc=1),
         fatal("data crc"), "data crc wrong: the data cannot be trusted"),
        ("fatal_meta_not_map", frame(MsgType.FLUSH, 0, b"\x93\x01\x02\x03"),
         fatal("not a map"), "meta is the array [1, 2, 3]"),
        ("fatal_no_tid", frame(MsgType.FLUSH, 0, b"\x82\xa1s\x00\xa1h\x07"),
         fatal("tid"), "a request without a tid cannot be answered"),
        ("fatal_status_reply", frame(MsgType.STATUS_REPLY, 0, float_meta),
         fatal("status"), "a StatusReply holding a float: a reply is never answered"),
    ]  # fmt: skip
    return out


def main(out_dir: Path = HERE) -> None:
    index = []
    for name, data, expected, note in vectors():
        (out_dir / f"{name}.bin").write_bytes(data)
        index.append({"file": f"{name}.bin", "note": note, **expected, "size": len(data)})
        if expected["outcome"] != "fatal":
            meta_len, data_len = struct.unpack(">II", data[8:16])
            index[-1]["flags"] = struct.unpack(">H", data[6:8])[0]
            index[-1]["data_hex"] = data[24 + meta_len :].hex()
            assert len(data) == 24 + meta_len + data_len
    text = json.dumps({"vectors": index}, indent=1, sort_keys=False) + "\n"
    (out_dir / "index.json").write_text(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
