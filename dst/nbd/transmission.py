"""The NBD transmission phase, sans-IO: request headers in; verdicts and replies out.

After the handshake (:mod:`dst.nbd.handshake`) the client sends 28-byte requests, a WRITE's
payload right behind its header, and the server answers each, in any order, with a simple
reply or — once NBD_OPT_STRUCTURED_REPLY was negotiated — structured reply chunks.  This
module holds the pure parts, so the Trio adapter (:mod:`dst.nbd.bridge`) only moves bytes:

- :func:`parse_request` turns a header into a :class:`Request`.  Only a broken stream is
  fatal (RemoteProtocolError): a wrong magic, or a WRITE whose payload is too big even to
  skip (``MAX_DISCARD_BYTES``).  Everything else is answerable.
- :func:`check_request` decides whether a well-framed request may run, and if not which
  errno it gets.  The checks and their order are nbdkit's (``validate_request``), so a client
  sees the same answer from the bridge as from ``nbdkit memory`` (tests/integration/
  test_nbd_vs_nbdkit.py prints the table): the range first (length 0 or past the end: EINVAL,
  ENOSPC for WRITE and WRITE_ZEROES; FLUSH with an offset or length: EINVAL; unknown commands:
  EINVAL), then flags (unknown bits, or a flag on a command it does not apply to: EINVAL),
  then what the bridge itself adds: READ/WRITE longer than the advertised maximum block size,
  and offsets or lengths not multiples of the minimum block size (EINVAL, as the spec asks).
  A refused WRITE's payload is still read and thrown away by the adapter, so the connection
  stays usable.
- Mapping a runnable request onto a bio is the adapter's job (as :mod:`dst.net.convert` is
  for the dst wire): this module knows NBD only, and imports neither trio nor dst.block.
- The ``*_reply`` functions encode replies.  A READ's reply is a header that the adapter sends
  with the bio's buffer behind it (one ``sendmsg``), so the data is never copied here.  Errors
  go out as the NBD errno of the BlockError (:func:`~dst.nbd.protocol.nbd_errno`), with the
  message in an NBD_REPLY_TYPE_ERROR chunk when structured replies are on.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Final, NamedTuple

from dst.errors import BlockError, LocalProtocolError, RemoteProtocolError
from dst.nbd import protocol as p
from dst.nbd.protocol import Command, CommandFlags, ExportInfo, ReplyType, TransmissionFlags

__all__ = [
    "SERVED_COMMANDS",
    "Request",
    "Session",
    "budget_bytes",
    "check_request",
    "error_reply",
    "ok_reply",
    "parse_request",
    "read_reply_header",
]

#: Commands that address a range of the export and are range-checked first (nbdkit's set).
_RANGED: Final = frozenset(
    {
        Command.READ,
        Command.WRITE,
        Command.TRIM,
        Command.WRITE_ZEROES,
        Command.CACHE,
        Command.BLOCK_STATUS,
    }
)
#: Commands that would change the export: past the end they are ENOSPC, not EINVAL.
_WRITING: Final = frozenset({Command.WRITE, Command.WRITE_ZEROES})
#: Commands whose length is a payload on the wire, so capped at the maximum block size.
_PAYLOAD: Final = frozenset({Command.READ, Command.WRITE})
#: Commands the bridge serves; BLOCK_STATUS needs a metadata context, which it never grants.
SERVED_COMMANDS: Final = frozenset(
    {
        Command.READ,
        Command.WRITE,
        Command.FLUSH,
        Command.TRIM,
        Command.WRITE_ZEROES,
        Command.CACHE,
    }
)


class Request(NamedTuple):
    """One transmission request, as framed on the wire (not yet judged).  A named tuple, as
    :class:`dst.wire.FramePrefix`: one per request, built in a third of a frozen
    dataclass's time."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int

    @property
    def payload_length(self) -> int:
        """Bytes of data following the header: a WRITE's length, whatever its verdict."""
        return self.length if self.command == Command.WRITE else 0

    def describe(self) -> str:
        return (
            f"cmd={p.name_of(Command, self.command)} flags=0x{self.flags:x} "
            f"offset={self.offset} length={self.length}"
        )


@dataclass(frozen=True, slots=True)
class Session:
    """What the handshake settled that judging a request depends on."""

    size: int
    #: The transmission flags the client was sent.
    flags: int
    structured_replies: bool
    minimum_block: int
    maximum_block: int

    @classmethod
    def for_export(cls, export: ExportInfo, *, flags: int, structured_replies: bool) -> Session:
        return cls(
            export.size, flags, structured_replies, export.minimum_block, export.maximum_block
        )


def budget_bytes(req: Request) -> int:
    """What a runnable request holds of the adapter's byte budgets while in flight: its buffer
    for READ and WRITE; for TRIM and WRITE_ZEROES the range of one chunk (the adapter submits
    them in chunks of MAX_REQUEST_BYTES), which bounds how many pieces are in flight below as
    a buffer would; nothing for FLUSH and CACHE."""
    if req.command in _PAYLOAD:
        return req.length
    if req.command in (Command.TRIM, Command.WRITE_ZEROES):
        return min(req.length, p.MAX_REQUEST_BYTES)
    return 0


def parse_request(header: bytes | bytearray | memoryview) -> Request:
    """Decode a 28-byte request header; RemoteProtocolError if the stream cannot go on."""
    if len(header) != p.REQUEST.size:
        raise LocalProtocolError(f"request header is {p.REQUEST.size} bytes, got {len(header)}")
    magic, flags, command, handle, offset, length = p.REQUEST.unpack(header)
    if magic != p.REQUEST_MAGIC:
        raise RemoteProtocolError(f"request magic 0x{magic:08x} is not 0x{p.REQUEST_MAGIC:08x}")
    if command == Command.WRITE and length > p.MAX_DISCARD_BYTES:
        raise RemoteProtocolError(
            f"WRITE of {length} bytes: over MAX_DISCARD_BYTES={p.MAX_DISCARD_BYTES}, "
            "too big even to skip"
        )
    return Request(flags, command, handle, offset, length)


def _refuse(code: int, req: Request, why: str) -> BlockError:
    return BlockError(code, f"{p.name_of(Command, req.command)}: {why}")


def _check_flags(req: Request, session: Session) -> BlockError | None:
    flags, cmd = req.flags, req.command
    if not flags:  # most requests: skip the IntFlag tests below
        return None
    if flags & ~p.KNOWN_COMMAND_FLAGS:
        return _refuse(errno.EINVAL, req, f"unknown flags 0x{flags & ~p.KNOWN_COMMAND_FLAGS:x}")
    if flags & CommandFlags.NO_HOLE and cmd != Command.WRITE_ZEROES:
        return _refuse(errno.EINVAL, req, "NO_HOLE applies to WRITE_ZEROES only")
    if flags & CommandFlags.FAST_ZERO and (
        cmd != Command.WRITE_ZEROES or not session.flags & TransmissionFlags.SEND_FAST_ZERO
    ):
        return _refuse(errno.EINVAL, req, "FAST_ZERO is not offered")
    if flags & CommandFlags.DF and (cmd != Command.READ or not session.structured_replies):
        return _refuse(errno.EINVAL, req, "DF applies to READ with structured replies only")
    if flags & CommandFlags.REQ_ONE and cmd != Command.BLOCK_STATUS:
        return _refuse(errno.EINVAL, req, "REQ_ONE applies to BLOCK_STATUS only")
    if flags & CommandFlags.FUA and not session.flags & TransmissionFlags.SEND_FUA:
        return _refuse(errno.EINVAL, req, "FUA is not offered")
    return None


def check_request(req: Request, session: Session) -> BlockError | None:
    """None if ``req`` may run; otherwise the BlockError to answer it with (its errno is
    already an NBD one).  NBD_CMD_DISC is the adapter's business and is not judged here."""
    cmd = req.command
    if cmd in _RANGED:
        if req.length == 0 or req.offset + req.length > session.size:
            code = errno.ENOSPC if cmd in _WRITING else errno.EINVAL
            where = f"offset={req.offset} length={req.length}"
            return _refuse(code, req, f"{where} is out of range for size={session.size}")
    elif cmd == Command.FLUSH:
        if req.offset or req.length:
            return _refuse(errno.EINVAL, req, "offset and length must be 0")
    else:
        return _refuse(errno.EINVAL, req, "unknown command")
    refused = _check_flags(req, session)
    if refused is not None:
        return refused
    if cmd not in SERVED_COMMANDS:
        return _refuse(errno.EINVAL, req, "not negotiated (no metadata context)")
    if cmd in _PAYLOAD and req.length > session.maximum_block:
        return _refuse(errno.EINVAL, req, f"length={req.length} over max={session.maximum_block}")
    lbs = session.minimum_block
    if req.offset % lbs or req.length % lbs:
        where = f"offset={req.offset} length={req.length}"
        return _refuse(errno.EINVAL, req, f"{where} not multiples of minimum block size {lbs}")
    return None


# --- replies --------------------------------------------------------------------------------


def ok_reply(handle: int) -> bytes:
    """Success without data: a simple reply (allowed even with structured replies on)."""
    return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle)


def read_reply_header(handle: int, offset: int, length: int, *, structured: bool) -> bytes:
    """What goes in front of ``length`` bytes of READ data: a simple reply, or one
    NBD_REPLY_TYPE_OFFSET_DATA chunk marked DONE (so DF is always honoured)."""
    if not structured:
        return ok_reply(handle)
    return p.OFFSET_DATA_HEADER.pack(
        p.STRUCTURED_REPLY_MAGIC,
        p.REPLY_FLAG_DONE,
        ReplyType.OFFSET_DATA,
        handle,
        p.OFFSET_DATA_HEADER.size - p.STRUCTURED_HEADER.size + length,
        offset,
    )


def error_reply(handle: int, code: int, message: str, *, structured: bool) -> bytes:
    """A failed request: ``code`` (any Linux errno; mapped to an NBD one) and, with
    structured replies, ``message`` for the user, cut to the spec's string limit."""
    error = p.nbd_errno(code)
    if not structured:
        return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, handle)
    # Cut to the limit, then drop a multi-byte character the cut may have split.
    cut = message.encode("utf-8", "replace")[: p.MAX_ERROR_MESSAGE_BYTES]
    text = cut.decode("utf-8", "ignore").encode()
    payload = p.ERROR_PAYLOAD.pack(error, len(text)) + text
    head = p.STRUCTURED_HEADER.pack(
        p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, ReplyType.ERROR, handle, len(payload)
    )
    return head + payload
