"""The rules a well-formed dst message obeys, and the bounds behind them.

:func:`validate` is the one place that says what a well-formed message is.
The encoder runs it before sending (a failure is our bug: LocalProtocolError)
and the decoder after reading (a failure is the peer's: a BadRequest to answer
for a request, a fatal RemoteProtocolError for the rest; see
``proto/PROTOCOL.md``).  It checks what can be checked without knowing the
connection; what depends on the handshake (the peer's page size, the
negotiated max_bytes, in-flight ids) is :mod:`dst.wire.connection`'s part.
Every bound is a named constant here with the reason for its value;
PROTOCOL.md's caps table repeats them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from dst.errors import ProtocolError
from dst.wire.messages import (
    CLAIMS,
    REQUEST_TYPES,
    SYNC_ACTIONS,
    Attach,
    Attached,
    ChecksumRequest,
    Errno,
    FlushRequest,
    FrameFlags,
    Goodbye,
    Hello,
    Message,
    Pages,
    Ping,
    Pong,
    PromoteRequest,
    ReadRequest,
    Received,
    Reply,
    StatusReply,
    StatusRequest,
    SyncRequest,
    TrimRequest,
    Welcome,
    WriteRequest,
    WriteZeroesRequest,
)

U16_MAX = 2**16 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
# The most negative integer msgpack encodes; only a status tree holds signed ones.
I64_MIN = -(2**63)
# The largest data payload one frame may carry, whatever was negotiated: it
# bounds the buffer a receiver must be ready to allocate for a single frame.
# 16 MiB is far above any useful block request (Linux caps a bio at 256 pages
# of 4 KiB = 1 MiB unless huge pages are in play) and well below memory sizes.
MAX_DATA_LEN = 16 * 1024 * 1024
# Node ids name peers in logs and in certificates; 128 bytes fits a host name
# plus a suffix and keeps a Hello small.
MAX_NODE_ID_LEN = 128
# A volume is a file in the data directory, so its name obeys NAME_MAX (255).
MAX_VOLUME_NAME_LEN = 255
# Error text in Reply/Goodbye: a sentence naming a field and its value, no
# more -- an error reply must stay cheap to send even under a flood of them.
MAX_MESSAGE_LEN = 1024
# Page sizes from a 512-byte sector to a 1 MiB huge page; the pages of a
# request are described relative to the sender's announced page size.
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1024 * 1024
# Feature names are short tokens; 32 of them at 64 bytes bounds the work of
# intersecting two lists during the handshake.
MAX_FEATURES = 32
MAX_FEATURE_LEN = 64
# A request's page runs: a bio has at most max_segments segments (Linux: 256
# vecs) and each yields at most three runs (head, whole pages, tail), so real
# requests need a handful.  2048 leaves room for that while bounding the tuple
# the decoder builds, and guarantees the meta fits MAX_META_LEN: a run encodes
# in at most 16 bytes (array header + three u32), 2048 * 16 = 32 KiB.  A
# client splits a request that would need more, as it splits for max_segments.
MAX_PAGE_RUNS = 2048
# Outstanding requests per connection: the server keeps one table entry per
# in-flight (tid, sub); 65536 bounds that table whatever a peer asks for.
MAX_INFLIGHT_CAP = 65536
# ChecksumRequest: the reply's data is 4 bytes (a big-endian crc32c) per
# extent, so 16384 checksums keep it at 64 KiB -- a small buffer on both ends,
# far below MAX_DATA_LEN -- and still cover 1 GiB of volume per request at the
# dirty bitmap's default 64 KiB extent (64 MiB at 4 KiB); verify pipelines
# such requests as a client pipelines reads.  More is E2BIG: split it.
MAX_CHECKSUMS = 16384
CHECKSUM_SIZE = 4
# The smallest checksum extent, a power of two like every extent: the dirty
# bitmap's smallest extent (dst.replication.bitmap.MIN_EXTENT_SIZE), where a
# difference verify finds is marked for resync; finer pieces find nothing more.
MIN_CHECKSUM_EXTENT = 4096
# A ChecksumRequest's length is whole 512-byte sectors, the smallest logical
# block any volume has, so that every piece the replicas compare is whole blocks.
CHECKSUM_LENGTH_ALIGN = 512
# A StatusReply's tree: containers nest at most 8 deep, the status map itself
# being the first level (dst's own, status > volumes > volume > resync, needs
# 4), which bounds the recursion of whoever walks it; keys are names a program
# looks up, 128 bytes like a node id.  The whole tree is bounded by
# MAX_META_LEN, which the encoder enforces on every frame.
MAX_STATUS_DEPTH = 8
MAX_STATUS_KEY_LEN = 128
# Linux errno values are below MAX_ERRNO (include/linux/err.h).
MAX_ERRNO = 4095
# Roles are certificate roles (dst.security): a Hello comes from a client, an
# NBD bridge or a server replicating to its peer; a Welcome from a server,
# and servers hold replica certificates.
HELLO_ROLES = ("client", "bridge", "replica")
WELCOME_ROLES = ("replica",)
# Keys of a limits map (the block-layer Limits); unknown keys are ignored.
LIMIT_KEYS = (
    "logical_block_size",
    "page_size",
    "max_bytes",
    "max_segments",
    "max_segment_size",
    "boundary",
)

_F = FrameFlags
# Header flags each request type may carry; any other bit is answered EINVAL.
ALLOWED_FLAGS: Mapping[type, int] = MappingProxyType(
    {
        ReadRequest: int(_F.FAILFAST),
        FlushRequest: int(_F.FAILFAST),
        WriteRequest: int(_F.FUA | _F.PREFLUSH | _F.FAILFAST | _F.RECV_ACK),
        TrimRequest: int(_F.FUA | _F.PREFLUSH | _F.FAILFAST),
        WriteZeroesRequest: int(_F.FUA | _F.PREFLUSH | _F.FAILFAST | _F.NO_HOLE),
        ChecksumRequest: int(_F.FAILFAST),
    }
)


class FieldError(ProtocolError):
    """A field breaks a rule.  Raised by :func:`validate`; the codec turns it
    into a LocalProtocolError (encoding), a BadRequest or a fatal
    RemoteProtocolError (decoding).  ``field`` names the field."""

    def __init__(self, field: str, value: object, rule: str, errno: int = Errno.EINVAL) -> None:
        shown = repr(value)
        if len(shown) > 64:  # keep the error reply below MAX_MESSAGE_LEN
            shown = shown[:61] + "..."
        super().__init__(f"field {field!r} = {shown}: {rule}", errno)
        self.field = field


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # IntEnum yes, True no


def _uint(name: str, value: int, hi: int, lo: int = 0) -> None:
    if type(value) is int and lo <= value <= hi:  # the common case, without a call per field
        return
    if not _is_int(value) or not lo <= value <= hi:
        raise FieldError(name, value, f"must be an integer in [{lo}, {hi}]")


def _text(name: str, value: str, max_len: int, *, name_like: bool = False) -> None:
    """A string field; ``name_like`` ones (ids, volume names, features) are
    non-empty and printable, since they end up in logs and file names."""
    if not isinstance(value, str):
        raise FieldError(name, value, "must be a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates cannot go on the wire
        raise FieldError(name, value, "must be valid Unicode") from None
    if size > max_len:
        raise FieldError(name, value, f"must be at most {max_len} bytes of UTF-8")
    if name_like and (size == 0 or not value.isprintable()):
        raise FieldError(name, value, "must be non-empty and printable")


def _limits(name: str, limits: Mapping[str, int]) -> None:
    for key, value in limits.items():
        if key not in LIMIT_KEYS:
            raise FieldError(name, key, f"unknown limit; known: {', '.join(LIMIT_KEYS)}")
        _uint(f"{name}.{key}", value, U64_MAX)


def _page_size(name: str, value: int) -> None:
    _uint(name, value, MAX_PAGE_SIZE, MIN_PAGE_SIZE)
    if value & (value - 1):
        raise FieldError(name, value, "must be a power of two")


def _handshake(msg: Hello | Welcome, roles: tuple[str, ...]) -> None:
    _text("node_id", msg.node_id, MAX_NODE_ID_LEN, name_like=True)
    if msg.role not in roles:
        raise FieldError("role", msg.role, f"must be one of {', '.join(roles)}")
    _page_size("page_size", msg.page_size)
    _limits("limits", msg.limits)
    if not isinstance(msg.features, tuple) or len(msg.features) > MAX_FEATURES:
        raise FieldError("features", msg.features, f"a tuple of at most {MAX_FEATURES}")
    for feature in msg.features:
        _text("features", feature, MAX_FEATURE_LEN, name_like=True)
    if len(set(msg.features)) != len(msg.features):
        raise FieldError("features", msg.features, "must not repeat a feature")
    # A Hello may say 0 (no preference); a Welcome's figure is the cap, >= 1.
    _uint("max_inflight", msg.max_inflight, MAX_INFLIGHT_CAP, int(isinstance(msg, Welcome)))


def _pages(pages: Pages, length: int) -> None:
    if not isinstance(pages, tuple) or not 1 <= len(pages) <= MAX_PAGE_RUNS:
        raise FieldError("pages", pages, f"must be a tuple of 1..{MAX_PAGE_RUNS} runs")
    total = 0
    for i, run in enumerate(pages):
        if not isinstance(run, tuple) or len(run) != 3:
            raise FieldError(f"pages[{i}]", run, "must be a (size, offset, count) tuple")
        size, offset, count = run
        _uint(f"pages[{i}].size", size, MAX_PAGE_SIZE, 1)
        _uint(f"pages[{i}].offset", offset, MAX_PAGE_SIZE - 1)
        _uint(f"pages[{i}].count", count, U32_MAX, 1)
        if offset + size > MAX_PAGE_SIZE:
            raise FieldError(f"pages[{i}]", (size, offset, count), "runs past any page")
        total += size * count
    if total != length:
        raise FieldError("pages", pages, f"cover {total} bytes, length is {length}")


def pages_misfit(pages: Pages, page_size: int) -> str | None:
    """Why ``pages`` cannot describe pages of ``page_size`` bytes, or None."""
    for i, (size, offset, count) in enumerate(pages):
        if offset + size > page_size:
            return f"field 'pages[{i}]' = {(size, offset, count)!r}: past page size {page_size}"
    return None


def _range(
    msg: ReadRequest | WriteRequest | TrimRequest | WriteZeroesRequest | ChecksumRequest,
    max_length: int,
) -> None:
    """offset/length of a request: non-empty, capped, inside the u64 space."""
    _uint("handle", msg.handle, U32_MAX)
    _uint("offset", msg.offset, U64_MAX)
    _uint("length", msg.length, U64_MAX)
    if msg.length == 0:
        raise FieldError("length", 0, "must be > 0")
    if msg.length > max_length:
        raise FieldError("length", msg.length, f"over {max_length}", Errno.E2BIG)
    if msg.offset + msg.length > U64_MAX + 1:
        why = f"offset {msg.offset} + length passes 2**64"
        raise FieldError("length", msg.length, why, Errno.EOVERFLOW)


def checksum_count(msg: ChecksumRequest) -> int:
    """How many checksums answer a valid ``msg``: one per extent, the last maybe short."""
    return -(-msg.length // msg.extent)


def checksum_data_len(msg: ChecksumRequest) -> int:
    """The data length of the successful Reply to ``msg``."""
    return CHECKSUM_SIZE * checksum_count(msg)


def _checksum(msg: ChecksumRequest) -> None:
    _range(msg, U64_MAX)
    if msg.length % CHECKSUM_LENGTH_ALIGN:
        raise FieldError("length", msg.length, f"must be a multiple of {CHECKSUM_LENGTH_ALIGN}")
    _uint("extent", msg.extent, 2**63, MIN_CHECKSUM_EXTENT)
    if msg.extent & (msg.extent - 1):
        raise FieldError("extent", msg.extent, "must be a power of two")
    if checksum_count(msg) > MAX_CHECKSUMS:
        why = f"asks for more than {MAX_CHECKSUMS} checksums of {msg.extent} bytes"
        raise FieldError("length", msg.length, why, Errno.E2BIG)


def _at(path: str, key: str | int) -> str:
    """``path`` one level down, ``.key`` in a map or ``[i]`` in an array; keys
    escaped and cut short, since the path ends up in an error message."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    shown = repr(key)[1:-1]
    return f"{path}.{shown[:20] + '...' if len(shown) > 23 else shown}"


def _status(path: str, value: Any, depth: int) -> None:
    """A StatusValue: int, str, bool, None, or a tuple or map of them, nested
    at most MAX_STATUS_DEPTH deep (``depth`` is the level of ``value``)."""
    if isinstance(value, Mapping | tuple):
        if depth > MAX_STATUS_DEPTH:
            raise FieldError(path, value, f"nests deeper than {MAX_STATUS_DEPTH} levels")
        if isinstance(value, Mapping):
            for key, item in value.items():
                _text(f"{path} key", key, MAX_STATUS_KEY_LEN)
                _status(_at(path, key), item, depth + 1)
        else:
            for i, item in enumerate(value):
                _status(_at(path, i), item, depth + 1)
    elif _is_int(value):
        _uint(path, value, U64_MAX, I64_MIN)
    elif isinstance(value, str):
        _text(path, value, U32_MAX)
    elif value is not None and not isinstance(value, bool):
        raise FieldError(path, value, "must be an int, str, bool, None, array or map")


def validate(msg: Message) -> None:
    """Raise FieldError unless ``msg`` obeys every rule a receiver checks
    without knowing the connection (that part is in connection.py)."""
    if isinstance(msg, REQUEST_TYPES):
        _uint("tid", msg.tid, U64_MAX)
        _uint("sub", msg.sub, U16_MAX)
        allowed = ALLOWED_FLAGS[type(msg)]
        if not _is_int(msg.flags) or msg.flags & ~allowed:
            raise FieldError("flags", msg.flags, f"allowed flags: {allowed:#x}")
        if isinstance(msg, FlushRequest):
            _uint("handle", msg.handle, U32_MAX)
            return
        if isinstance(msg, ChecksumRequest):
            _checksum(msg)
            return
        # A read or write moves its bytes in one frame; trims and zeroes none.
        data_bearing = isinstance(msg, ReadRequest | WriteRequest)
        _range(msg, MAX_DATA_LEN if data_bearing else U64_MAX)
        if not isinstance(msg, ReadRequest):
            _uint("epoch", msg.epoch, U64_MAX)
        if isinstance(msg, ReadRequest | WriteRequest):
            _pages(msg.pages, msg.length)
    elif isinstance(msg, Hello):
        if type(msg.versions) is not tuple or len(msg.versions) != 2:
            raise FieldError("versions", msg.versions, "must be a (min, max) pair")
        lo, hi = msg.versions
        _uint("versions", lo, U16_MAX, 1)
        _uint("versions", hi, U16_MAX, lo)
        _handshake(msg, HELLO_ROLES)
    elif isinstance(msg, Welcome):
        _uint("version", msg.version, U16_MAX, 1)
        _handshake(msg, WELCOME_ROLES)
    elif isinstance(msg, Attach):
        _uint("tid", msg.tid, U64_MAX)
        _text("volume", msg.volume, MAX_VOLUME_NAME_LEN, name_like=True)
        _uint("epoch", msg.epoch, U64_MAX)
        if msg.claim not in CLAIMS:
            raise FieldError("claim", msg.claim, f"must be one of {', '.join(CLAIMS)}")
    elif isinstance(msg, Attached):
        _uint("tid", msg.tid, U64_MAX)
        _uint("handle", msg.handle, U32_MAX)
        _uint("size", msg.size, U64_MAX)
        _uint("epoch", msg.epoch, U64_MAX)
        _limits("limits", msg.limits)
    elif isinstance(msg, StatusRequest):
        _uint("tid", msg.tid, U64_MAX)
    elif isinstance(msg, StatusReply):
        _uint("tid", msg.tid, U64_MAX)
        if not isinstance(msg.status, Mapping):
            raise FieldError("status", msg.status, "must be a map")
        _status("status", msg.status, 1)
    elif isinstance(msg, SyncRequest):
        _uint("tid", msg.tid, U64_MAX)
        _text("volume", msg.volume, MAX_VOLUME_NAME_LEN, name_like=True)
        if msg.action not in SYNC_ACTIONS:
            raise FieldError("action", msg.action, f"must be one of {', '.join(SYNC_ACTIONS)}")
        if not isinstance(msg.state, Mapping):
            raise FieldError("state", msg.state, "must be a map")
        _status("state", msg.state, 1)
    elif isinstance(msg, PromoteRequest):
        _uint("tid", msg.tid, U64_MAX)
        _text("volume", msg.volume, MAX_VOLUME_NAME_LEN, name_like=True)
        if not isinstance(msg.force, bool):
            raise FieldError("force", msg.force, "must be a boolean")
    elif isinstance(msg, Received):
        _uint("tid", msg.tid, U64_MAX)
        _uint("sub", msg.sub, U16_MAX)
    elif isinstance(msg, Ping | Pong):
        _uint("token", msg.token, U64_MAX)
    elif isinstance(msg, Reply | Goodbye):
        if isinstance(msg, Reply):
            _uint("tid", msg.tid, U64_MAX)
            _uint("sub", msg.sub, U16_MAX)
        _uint("errno", msg.errno, MAX_ERRNO)
        _text("message", msg.message, MAX_MESSAGE_LEN)
        if isinstance(msg, Reply) and msg.errno == 0 and msg.message:
            raise FieldError("message", msg.message, "must be empty on success")
    else:
        raise FieldError("type", type(msg).__name__, "is not a wire message")
