"""The messages of the dst wire protocol, as typed values.

Every frame carries one message: a frozen, slotted dataclass below.  The codec
(:mod:`dst.wire.codec`) turns them into bytes and back, after
:func:`dst.wire.rules.validate` has said they are well formed; the connection
state machine (:mod:`dst.wire.connection`) decides which may be sent when.
This module knows no bytes and no rules: it names the message types, the
header flags and the Linux errno numbers that travel in replies.

``pages`` follows seed 003: the client's pages, run-length encoded as
``(size, offset, count)`` runs -- ``count`` consecutive client pages, each
contributing ``size`` bytes starting ``offset`` bytes into the page.

The administration messages (0x50..0x53) serve ``dst status``, ``dst
promote`` and ``dst verify``: StatusRequest is answered by a StatusReply,
whose ``status`` is a JSON-like tree; PromoteRequest by a Reply;
ChecksumRequest, a request like a read, by a Reply whose data is the packed
big-endian crc32c of each ``extent``-sized piece of the range.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class MsgType(enum.IntEnum):
    """The ``type`` byte of a frame header."""

    HELLO = 0x01
    WELCOME = 0x02
    ATTACH = 0x03
    ATTACHED = 0x04
    READ = 0x10
    WRITE = 0x11
    FLUSH = 0x12
    TRIM = 0x13
    WRITE_ZEROES = 0x14
    PING = 0x20
    PONG = 0x21
    REPLY = 0x30
    RECEIVED = 0x31
    GOODBYE = 0x40
    STATUS = 0x50
    STATUS_REPLY = 0x51
    PROMOTE = 0x52
    CHECKSUM = 0x53
    SYNC = 0x54


class FrameFlags(enum.IntFlag):
    """The ``flags`` field of a frame header (requests only)."""

    FUA = 0x1  # the write is on stable storage before the reply
    PREFLUSH = 0x2  # everything acknowledged before is stable before this runs
    FAILFAST = 0x4  # fail at once rather than retry (mirror legs, seed 004)
    NO_HOLE = 0x8  # WRITE_ZEROES must allocate, not punch a hole
    RECV_ACK = 0x10  # send Received as soon as the write's data is in (replication protocol B)


class Errno(enum.IntEnum):
    """Linux errno numbers as they travel on the wire, whatever the platform."""

    OK = 0
    EPERM = 1
    ENOENT = 2
    EIO = 5
    E2BIG = 7
    EBADF = 9
    EBUSY = 16
    EEXIST = 17
    EINVAL = 22
    ENOSPC = 28
    EROFS = 30
    EPROTO = 71
    EOVERFLOW = 75
    EPROTONOSUPPORT = 93
    EOPNOTSUPP = 95
    ESHUTDOWN = 108
    ETIMEDOUT = 110
    EALREADY = 114
    ESTALE = 116


Pages = tuple[tuple[int, int, int], ...]
# A StatusReply's tree, JSON-like: arrays may be given as lists and are kept
# as tuples, maps are kept read-only (what the decoder builds, so that a sent
# and a received reply compare equal).
StatusValue = (
    int
    | str
    | bool
    | None
    | list["StatusValue"]
    | tuple["StatusValue", ...]
    | Mapping[str, "StatusValue"]
)
# How deep _frozen_status freezes: beyond any tree rules.validate accepts
# (MAX_STATUS_DEPTH), so what is left as given -- a cycle, say -- is refused
# there rather than looped over here.
_FREEZE_DEPTH = 32


def _frozen_limits(limits: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(limits))


def _frozen_status(value: StatusValue, depth: int = 1) -> StatusValue:
    if depth > _FREEZE_DEPTH:
        return value
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen_status(v, depth + 1) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen_status(v, depth + 1) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server, first frame on a connection."""

    versions: tuple[int, int]  # (min, max) protocol versions the client speaks
    node_id: str
    role: str
    page_size: int  # the client's page size; `pages` in its requests refer to it
    limits: Mapping[str, int]
    features: tuple[str, ...]
    max_inflight: int  # how many requests the client means to keep outstanding

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", _frozen_limits(self.limits))


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server -> client, the answer to an acceptable Hello."""

    version: int  # the protocol version chosen for this connection
    node_id: str
    role: str
    page_size: int
    limits: Mapping[str, int]
    features: tuple[str, ...]  # the subset of the Hello's features the server supports
    max_inflight: int  # the server's cap on the client's outstanding requests

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", _frozen_limits(self.limits))


#: How an Attach claims its volume (PROTOCOL.md section 9).
CLAIMS = ("share", "own", "takeover")


@dataclass(frozen=True, slots=True)
class Attach:
    tid: int
    volume: str
    epoch: int = 0  # 0: whatever epoch is current (share) / a new claim (own)
    claim: str = "share"  # one of CLAIMS


@dataclass(frozen=True, slots=True)
class Attached:
    tid: int
    handle: int
    size: int
    epoch: int
    limits: Mapping[str, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", _frozen_limits(self.limits))


@dataclass(frozen=True, slots=True)
class ReadRequest:
    tid: int
    sub: int
    handle: int
    offset: int
    length: int
    pages: Pages
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WriteRequest:
    tid: int
    sub: int
    handle: int
    offset: int
    length: int
    epoch: int
    pages: Pages
    flags: int = 0


@dataclass(frozen=True, slots=True)
class FlushRequest:
    tid: int
    sub: int
    handle: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class TrimRequest:
    tid: int
    sub: int
    handle: int
    offset: int
    length: int
    epoch: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WriteZeroesRequest:
    tid: int
    sub: int
    handle: int
    offset: int
    length: int
    epoch: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    token: int


@dataclass(frozen=True, slots=True)
class Pong:
    token: int  # the token of the Ping it answers


@dataclass(frozen=True, slots=True)
class Reply:
    tid: int
    sub: int
    errno: int  # 0: success
    message: str = ""  # empty on success


@dataclass(frozen=True, slots=True)
class Received:
    """Server -> client, for a WriteRequest flagged RECV_ACK, at most once and before its
    Reply: the data is in the server's memory (DRBD's P_RECV_ACK).  Not an answer: the
    request stays in flight until its Reply."""

    tid: int
    sub: int


@dataclass(frozen=True, slots=True)
class Goodbye:
    errno: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Client -> server: what is your state?  Answered by a StatusReply (or an
    error Reply) under ``(tid, 0)``."""

    tid: int


@dataclass(frozen=True, slots=True)
class StatusReply:
    tid: int
    status: Mapping[str, StatusValue]  # role, connection, disk, out of sync, resync...

    def __post_init__(self) -> None:
        status = self.status
        if isinstance(status, Mapping):  # anything else is refused by validate
            object.__setattr__(self, "status", _frozen_status(status))


@dataclass(frozen=True, slots=True)
class PromoteRequest:
    """Client -> server: make ``volume`` primary here.  Answered by a Reply
    under ``(tid, 0)``."""

    tid: int
    volume: str
    force: bool  # override what the server safely can (PROTOCOL.md, Administration)


@dataclass(frozen=True, slots=True)
class ChecksumRequest:
    """The crc32c of each ``extent``-sized piece of ``[offset, offset + length)``
    (the last may be short), as the data of the successful Reply: 4 bytes,
    big-endian, per piece."""

    tid: int
    sub: int
    handle: int
    offset: int
    length: int
    extent: int
    flags: int = 0


#: What a SyncRequest may ask (PROTOCOL.md, Administration).
SYNC_ACTIONS = ("query", "target", "adopt", "epoch", "resolve")


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """Replication state between the two servers of a pair, and the operator's
    split-brain resolution.  ``action`` is one of SYNC_ACTIONS; ``state`` carries
    the sender's generation identifiers where the action needs them.  Answered by
    a StatusReply (the receiver's state) or an error Reply under ``(tid, 0)``."""

    tid: int
    volume: str
    action: str
    state: Mapping[str, StatusValue]

    def __post_init__(self) -> None:
        if isinstance(self.state, Mapping):  # anything else is refused by validate
            object.__setattr__(self, "state", _frozen_status(self.state))


@dataclass(frozen=True, slots=True)
class BadRequest:
    """Not a wire message: what the decoder returns for a sound frame holding
    a request it can answer but not accept.  The receiver answers it with
    ``Reply(tid, sub, errno, message)`` and discards the frame's data."""

    tid: int
    sub: int
    msg_type: int
    errno: int
    message: str


Request = (
    ReadRequest | WriteRequest | FlushRequest | TrimRequest | WriteZeroesRequest | ChecksumRequest
)
Message = (
    Hello
    | Welcome
    | Attach
    | Attached
    | ReadRequest
    | WriteRequest
    | FlushRequest
    | TrimRequest
    | WriteZeroesRequest
    | Ping
    | Pong
    | Reply
    | Received
    | Goodbye
    | StatusRequest
    | StatusReply
    | PromoteRequest
    | ChecksumRequest
    | SyncRequest
    | BadRequest
)
# Requests: tracked by (tid, sub), carry header flags, answered by a Reply.
REQUEST_TYPES = (
    ReadRequest,
    WriteRequest,
    FlushRequest,
    TrimRequest,
    WriteZeroesRequest,
    ChecksumRequest,
)
# The client's other messages that are answered: no sub, tracked by (tid, 0).
TID_ONLY_TYPES = (Attach, StatusRequest, PromoteRequest, SyncRequest)

MSG_TYPE_OF: Mapping[type, MsgType] = MappingProxyType(
    {
        Hello: MsgType.HELLO,
        Welcome: MsgType.WELCOME,
        Attach: MsgType.ATTACH,
        Attached: MsgType.ATTACHED,
        ReadRequest: MsgType.READ,
        WriteRequest: MsgType.WRITE,
        FlushRequest: MsgType.FLUSH,
        TrimRequest: MsgType.TRIM,
        WriteZeroesRequest: MsgType.WRITE_ZEROES,
        Ping: MsgType.PING,
        Pong: MsgType.PONG,
        Reply: MsgType.REPLY,
        Received: MsgType.RECEIVED,
        Goodbye: MsgType.GOODBYE,
        StatusRequest: MsgType.STATUS,
        StatusReply: MsgType.STATUS_REPLY,
        PromoteRequest: MsgType.PROMOTE,
        ChecksumRequest: MsgType.CHECKSUM,
        SyncRequest: MsgType.SYNC,
    }
)
