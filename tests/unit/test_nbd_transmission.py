"""The NBD transmission core (dst.nbd.transmission): request framing, judging, replies.

The judging table pins the errno of every bad request to what ``nbdkit memory`` answers
(found with nbdsh in non-strict mode; tests/integration/test_nbd_vs_nbdkit.py checks the real
thing), and hypothesis checks that any header either parses or raises RemoteProtocolError, and
that a request judged runnable really is in range, aligned and within the maximum.
"""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.errors import LocalProtocolError, RemoteProtocolError
from dst.nbd import protocol as p
from dst.nbd.protocol import Command, CommandFlags, ExportInfo, ReplyType, TransmissionFlags
from dst.nbd.transmission import (
    SERVED_COMMANDS,
    Request,
    Session,
    budget_bytes,
    check_request,
    error_reply,
    ok_reply,
    parse_request,
    read_reply_header,
)

MiB = 1 << 20
ALL_FLAGS = int(
    TransmissionFlags.HAS_FLAGS
    | TransmissionFlags.SEND_FLUSH
    | TransmissionFlags.SEND_FUA
    | TransmissionFlags.SEND_TRIM
    | TransmissionFlags.SEND_WRITE_ZEROES
    | TransmissionFlags.SEND_CACHE
)
EXPORT = ExportInfo("vol0", MiB, ALL_FLAGS, 512, 4096, 32 * MiB)
SESSION = Session.for_export(EXPORT, flags=ALL_FLAGS, structured_replies=False)
SR_SESSION = Session.for_export(
    EXPORT, flags=ALL_FLAGS | TransmissionFlags.SEND_DF, structured_replies=True
)
FUA, NO_HOLE, DF = int(CommandFlags.FUA), int(CommandFlags.NO_HOLE), int(CommandFlags.DF)
REQ_ONE, FAST_ZERO = int(CommandFlags.REQ_ONE), int(CommandFlags.FAST_ZERO)
R, W, TRIM, CACHE = Command.READ, Command.WRITE, Command.TRIM, Command.CACHE
WZ, FLUSH, BS = Command.WRITE_ZEROES, Command.FLUSH, Command.BLOCK_STATUS
EINVAL, ENOSPC = errno.EINVAL, errno.ENOSPC


def header(
    command: int, offset: int = 0, length: int = 512, flags: int = 0, handle: int = 7
) -> bytes:
    return p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, handle, offset, length)


# (name, command, flags, offset, length, structured replies, errno or 0) — nbdkit's answers.
TABLE = [
    ("read", R, 0, 0, 512, False, 0),
    ("read past end", R, 0, MiB, 512, False, EINVAL),
    ("read straddling end", R, 0, MiB - 512, 1024, False, EINVAL),
    ("read at 2^63", R, 0, 1 << 63, 512, False, EINVAL),
    ("read wrapping 2^64", R, 0, (1 << 64) - 512, 1024, False, EINVAL),
    ("write past end", W, 0, MiB, 512, False, ENOSPC),
    ("write straddling end", W, 0, MiB - 512, 1024, False, ENOSPC),
    ("trim past end", TRIM, 0, MiB, 512, False, EINVAL),
    ("zero past end", WZ, 0, MiB, 512, False, ENOSPC),
    ("cache past end", CACHE, 0, MiB, 512, False, EINVAL),
    ("read len 0", R, 0, 0, 0, False, EINVAL),
    ("write len 0", W, 0, 0, 0, False, ENOSPC),
    ("trim len 0", TRIM, 0, 0, 0, False, EINVAL),
    ("zero len 0", WZ, 0, 0, 0, False, ENOSPC),
    ("cache len 0", CACHE, 0, 0, 0, False, EINVAL),
    ("flush", FLUSH, 0, 0, 0, False, 0),
    ("flush with offset", FLUSH, 0, 512, 0, False, EINVAL),
    ("flush with length", FLUSH, 0, 0, 512, False, EINVAL),
    ("unknown flag", R, 0x100, 0, 512, False, EINVAL),
    ("NO_HOLE on read", R, NO_HOLE, 0, 512, False, EINVAL),
    ("NO_HOLE on write", W, NO_HOLE, 0, 512, False, EINVAL),
    ("NO_HOLE on trim", TRIM, NO_HOLE, 0, 512, False, EINVAL),
    ("NO_HOLE|FUA on zero", WZ, NO_HOLE | FUA, 0, 512, False, 0),
    ("FAST_ZERO not offered", WZ, FAST_ZERO, 0, 512, False, EINVAL),
    ("REQ_ONE on read", R, REQ_ONE, 0, 512, False, EINVAL),
    ("DF without structured replies", R, DF, 0, 512, False, EINVAL),
    ("DF with structured replies", R, DF, 0, 512, True, 0),
    ("DF on write", W, DF, 0, 512, True, EINVAL),
    ("FUA on read, flush, cache", R, FUA, 0, 512, False, 0),
    ("FUA on flush", FLUSH, FUA, 0, 0, False, 0),
    ("FUA on cache", CACHE, FUA, 0, 512, False, 0),
    ("unknown command 9", 9, 0, 0, 512, False, EINVAL),
    ("unknown command 0xffff", 0xFFFF, 0, 0, 0, False, EINVAL),
    ("block status, no context", BS, 0, 0, 512, True, EINVAL),
    ("resize", Command.RESIZE, 0, 0, 0, False, EINVAL),
    # What the bridge adds: its advertised minimum and maximum block sizes.
    ("read unaligned offset", R, 0, 3, 512, False, EINVAL),
    ("write unaligned length", W, 0, 0, 100, False, EINVAL),
    ("trim unaligned", TRIM, 0, 512, 1000, False, EINVAL),
    ("read over the maximum", R, 0, 0, 32 * MiB + 512, False, EINVAL),
]


@pytest.mark.parametrize(
    ("command", "flags", "offset", "length", "sr", "code"),
    [case[1:] for case in TABLE],
    ids=[case[0] for case in TABLE],
)
def test_judging_matches_nbdkit(
    command: int, flags: int, offset: int, length: int, sr: bool, code: int
) -> None:
    # A 1 MiB export like the nbdkit comparison; 64 MiB for the one case over the maximum.
    size = 64 * MiB if length > 32 * MiB else MiB
    session = Session(size, (SR_SESSION if sr else SESSION).flags, sr, 512, 32 * MiB)
    refused = check_request(Request(flags, command, 7, offset, length), session)
    assert (refused.errno if refused else 0) == code, refused
    if refused is not None:
        assert p.name_of(Command, command) in str(refused)  # the message names the command


def test_large_trim_and_zero_are_not_capped() -> None:
    session = Session(1 << 40, ALL_FLAGS, False, 512, 32 * MiB)
    for command in (TRIM, WZ, CACHE):
        assert check_request(Request(0, command, 1, 0, 0xFFFFFE00), session) is None


def test_parse_request_and_fatal_framing() -> None:
    assert parse_request(header(W, 4096, 1024, FUA, 99)) == Request(FUA, W, 99, 4096, 1024)
    assert parse_request(header(W, length=1024)).payload_length == 1024
    assert parse_request(header(R, length=1024)).payload_length == 0
    with pytest.raises(RemoteProtocolError, match="magic"):
        parse_request(b"\x25\x60\x95\x14" + header(R)[4:])
    with pytest.raises(RemoteProtocolError, match="too big even to skip"):
        parse_request(header(W, length=p.MAX_DISCARD_BYTES + 1))
    assert parse_request(header(W, length=p.MAX_DISCARD_BYTES)).length == p.MAX_DISCARD_BYTES
    with pytest.raises(LocalProtocolError):
        parse_request(header(R)[:27])


def test_replies() -> None:
    assert ok_reply(5) == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 5)
    assert read_reply_header(5, 4096, 512, structured=False) == ok_reply(5)
    chunk = read_reply_header(5, 4096, 512, structured=True)
    assert p.OFFSET_DATA_HEADER.unpack(chunk) == (
        p.STRUCTURED_REPLY_MAGIC,
        p.REPLY_FLAG_DONE,
        ReplyType.OFFSET_DATA,
        5,
        8 + 512,
        4096,
    )
    assert error_reply(5, errno.ENOSPC, "full", structured=False) == p.SIMPLE_REPLY.pack(
        p.SIMPLE_REPLY_MAGIC, errno.ENOSPC, 5
    )
    reply = error_reply(5, errno.ESTALE, "fenced", structured=True)
    magic, flags, kind, handle, length = p.STRUCTURED_HEADER.unpack_from(reply)
    assert (magic, flags, kind, handle) == (p.STRUCTURED_REPLY_MAGIC, 1, ReplyType.ERROR, 5)
    code, size = p.ERROR_PAYLOAD.unpack_from(reply, p.STRUCTURED_HEADER.size)
    assert (code, size, length) == (errno.EIO, 6, 12)  # ESTALE is no NBD errno: EIO
    assert reply.endswith(b"fenced")


def test_error_messages_are_cut_to_the_string_limit_on_a_character_boundary() -> None:
    reply = error_reply(1, errno.EIO, "é" * 5000, structured=True)
    _, size = p.ERROR_PAYLOAD.unpack_from(reply, p.STRUCTURED_HEADER.size)
    text = reply[p.STRUCTURED_HEADER.size + p.ERROR_PAYLOAD.size :]
    assert size == len(text) <= p.MAX_STRING_BYTES
    assert text.decode() == "é" * (size // 2)


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (errno.EINVAL, errno.EINVAL),
        (errno.ENOSPC, errno.ENOSPC),
        (errno.EDQUOT, errno.ENOSPC),
        (errno.EFBIG, errno.ENOSPC),
        (errno.EROFS, errno.EPERM),
        (errno.ESHUTDOWN, errno.ESHUTDOWN),
        (errno.ESTALE, errno.EIO),
        (errno.ECONNRESET, errno.EIO),
        (0, errno.EIO),
    ],
)
def test_errno_mapping(code: int, wire: int) -> None:
    assert p.nbd_errno(code) == wire


def test_budget_bytes() -> None:
    assert budget_bytes(Request(0, R, 1, 0, 4096)) == 4096
    assert budget_bytes(Request(0, W, 1, 0, 4096)) == 4096
    assert budget_bytes(Request(0, TRIM, 1, 0, 1 << 31)) == p.MAX_REQUEST_BYTES
    assert budget_bytes(Request(0, FLUSH, 1, 0, 0)) == 0
    assert budget_bytes(Request(0, CACHE, 1, 0, 4096)) == 0


def test_the_core_is_sans_io() -> None:
    code = (
        "import sys, dst.nbd, dst.nbd.handshake, dst.nbd.transmission\n"
        "print(sorted(m for m in ('trio', 'socket', 'ssl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@settings(max_examples=500, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1) | st.sampled_from([0, 512, MiB - 512, MiB, 2**63]),
    st.integers(0, 2**32 - 1) | st.sampled_from([0, 512, 1024, 32 * MiB]),
    st.booleans(),
)
def test_fuzz_headers(flags: int, command: int, offset: int, length: int, sr: bool) -> None:
    try:
        req = parse_request(p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, 1, offset, length))
    except RemoteProtocolError:
        assert command == W and length > p.MAX_DISCARD_BYTES
        return
    session = SR_SESSION if sr else SESSION
    refused = check_request(req, session)
    if refused is not None:
        assert refused.errno in (errno.EINVAL, errno.ENOSPC)
        return
    assert command in SERVED_COMMANDS
    assert not flags & ~p.KNOWN_COMMAND_FLAGS
    if command != FLUSH:
        assert 0 < length and offset + length <= session.size
        assert offset % 512 == 0 and length % 512 == 0
    if command in (R, W):
        assert length <= session.maximum_block
