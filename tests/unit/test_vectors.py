"""The golden frames in proto/vectors/: decoded to what index.json says, and
re-encoded byte for byte.

index.json is the language-neutral statement of what each frame means, so the
expected messages are built from it, not from the generator; a last test
checks that proto/vectors/generate.py still writes exactly the committed files.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from dst.errors import RemoteProtocolError
from dst.wire import (
    HEADER_SIZE,
    MSG_TYPE_OF,
    BadRequest,
    ChecksumRequest,
    Frame,
    FrameDecoder,
    Message,
    MsgType,
    StatusReply,
    WriteRequest,
    checksum_data_len,
    data_crc,
    encode_frame,
    unpack_checksums,
)

VECTORS_DIR = Path(__file__).resolve().parents[2] / "proto" / "vectors"
INDEX: list[dict[str, Any]] = json.loads((VECTORS_DIR / "index.json").read_text())["vectors"]
CLASSES: dict[str, Any] = {cls.__name__: cls for cls in MSG_TYPE_OF} | {"BadRequest": BadRequest}


def _tuples(value: Any) -> Any:
    """JSON arrays stand for tuples (versions, features, pages and their runs,
    arrays in a status tree); JSON objects for maps (limits, status)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def expected_message(entry: dict[str, Any]) -> Message:
    fields = {k: _tuples(v) for k, v in entry["fields"].items()}
    msg: Message = CLASSES[entry["type"]](**fields)
    return msg


def vector_bytes(entry: dict[str, Any]) -> bytes:
    return (VECTORS_DIR / str(entry["file"])).read_bytes()


def entries(*outcomes: str) -> list[Any]:
    return [pytest.param(e, id=e["file"]) for e in INDEX if e["outcome"] in outcomes]


def decode_all(raw: bytes) -> Frame:
    """Decode ``raw`` as exactly one frame followed by EOF."""
    decoder = FrameDecoder()
    decoder.receive_data(raw)
    decoder.receive_data(b"")
    frame = decoder.next_frame()
    assert frame is not None
    assert decoder.next_frame() is None
    assert decoder.eof
    return frame


@pytest.mark.parametrize("entry", entries("message"))
def test_valid_vector_decodes_to_its_message(entry: dict[str, Any]) -> None:
    frame = decode_all(vector_bytes(entry))
    assert frame.message == expected_message(entry)
    assert type(frame.message).__name__ == entry["type"]
    assert frame.prefix.flags == entry["flags"]
    assert frame.data.hex() == entry["data_hex"]


@pytest.mark.parametrize("entry", entries("message"))
def test_valid_vector_reencodes_byte_for_byte(entry: dict[str, Any]) -> None:
    raw = vector_bytes(entry)
    data = bytes.fromhex(entry["data_hex"])
    head = encode_frame(expected_message(entry), [data] if data else [])
    assert head + data == raw
    meta_len = int.from_bytes(raw[8:12], "big")
    assert len(head) == HEADER_SIZE + meta_len  # the data is never part of the encoding


@pytest.mark.parametrize("entry", entries("bad_request"))
def test_bad_request_vector_is_answerable(entry: dict[str, Any]) -> None:
    msg = decode_all(vector_bytes(entry)).message
    assert isinstance(msg, BadRequest)
    want = entry["fields"]
    assert (msg.tid, msg.sub, msg.msg_type, msg.errno) == (
        want["tid"],
        want["sub"],
        want["msg_type"],
        want["errno"],
    )
    assert entry["field"] in msg.message


@pytest.mark.parametrize("entry", entries("fatal"))
def test_fatal_vector_is_refused(entry: dict[str, Any]) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(vector_bytes(entry))
    with pytest.raises(RemoteProtocolError, match=entry["why"]):
        decoder.next_frame()  # no EOF needed: each is refused on the bytes it has


def test_every_message_type_and_required_case_has_a_vector() -> None:
    valid = [expected_message(e) for e in INDEX if e["outcome"] == "message"]
    assert {type(m) for m in valid} == set(MSG_TYPE_OF)
    writes = [m for m in valid if isinstance(m, WriteRequest)]
    assert any(len(w.pages) > 1 for w in writes), "a write with a multi-run pages tuple"
    replies = [e for e in INDEX if e.get("type") == "Reply"]
    assert any(e["fields"]["errno"] and not e["data_hex"] for e in replies), "an error reply"
    assert any(not e["fields"]["errno"] and e["data_hex"] for e in replies), "a read reply"
    assert any(not e["fields"]["errno"] and not e["data_hex"] for e in replies), "a plain ok"
    bad = [e["fields"] for e in INDEX if e["outcome"] == "bad_request"]
    assert any(f["msg_type"] == MsgType.CHECKSUM and f["errno"] == 22 for f in bad), "EINVAL"
    statuses = [m for m in valid if isinstance(m, StatusReply)]
    assert any(_kinds(m.status) >= {"map", "array", "nil", "bool", "int", "str"} for m in statuses)
    files = {p.name for p in VECTORS_DIR.glob("*.bin")}
    assert files == {e["file"] for e in INDEX}, "every .bin is indexed and vice versa"


def _kinds(value: Any) -> set[str]:
    """The kinds of value in a status tree, below its top."""
    if isinstance(value, Mapping | tuple):
        items = value.values() if isinstance(value, Mapping) else value
        inner = set().union(*map(_kinds, items))
        return inner | {"map" if isinstance(value, Mapping) else "array"}
    names = {bool: "bool", int: "int", str: "str", type(None): "nil"}
    return {names[type(value)]}


def test_checksum_reply_vector_is_the_crc_of_each_extent() -> None:
    """reply_checksum.bin answers checksum.bin, whose range holds 4 KiB of the
    pattern, a 4 KiB hole (zeros) and the pattern's first 512 bytes."""
    by_file = {e["file"]: e for e in INDEX}
    request = expected_message(by_file["checksum.bin"])
    reply = by_file["reply_checksum.bin"]
    assert isinstance(request, ChecksumRequest)
    assert (request.tid, request.sub) == (reply["fields"]["tid"], reply["fields"]["sub"])
    data = bytes.fromhex(reply["data_hex"])
    assert len(data) == checksum_data_len(request) == 12
    pattern = bytes((31 * i + 7) & 0xFF for i in range(4096))
    pieces = [pattern, bytes(4096), pattern[:512]]
    assert unpack_checksums(data) == tuple(data_crc([piece]) for piece in pieces)


def test_generator_reproduces_the_committed_vectors(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", VECTORS_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted([*(e["file"] for e in INDEX), "index.json"])
    for name in made:
        assert (tmp_path / name).read_bytes() == (VECTORS_DIR / name).read_bytes(), name
