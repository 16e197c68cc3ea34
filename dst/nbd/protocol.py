"""NBD wire constants: magics, options, replies, commands, flags, info types and errnos.

Everything here is a number from the NBD protocol (NetworkBlockDevice/nbd ``doc/proto.md``),
named as the specification names it minus the ``NBD_`` prefix; plus the bounds the bridge
applies, the errno mapping from dst's :class:`~dst.errors.BlockError` to the NBD error field,
and what the bridge advertises for an export (:class:`ExportInfo`, :func:`export_info`,
:func:`check_exports`).  Sans-IO, like all of :mod:`dst.nbd` but the Trio adapter
(``ruff.toml`` enforces it).

All integers on the wire are big-endian; the ``struct`` formats below say so with ``>``.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from dst.errors import ConfigError

# --- magics ---------------------------------------------------------------------------------

#: ``NBDMAGIC``: first 8 bytes the server sends (the old INIT_PASSWD).
NBDMAGIC: Final = 0x4E42444D41474943
#: ``IHAVEOPT``: second 8 bytes of the newstyle greeting, and the start of every option.
IHAVEOPT: Final = 0x49484156454F5054
#: Start of every option reply (fixed newstyle).
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
#: Start of every transmission request.
REQUEST_MAGIC: Final = 0x25609513
#: Start of a simple reply.
SIMPLE_REPLY_MAGIC: Final = 0x67446698
#: Start of a structured reply chunk.
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- fixed sizes and formats ----------------------------------------------------------------

#: Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
GREETING = struct.Struct(">QQH")
#: Client flags, the client's first 4 bytes.
CLIENT_FLAGS = struct.Struct(">I")
#: Option header: IHAVEOPT, option, data length.
OPTION_HEADER = struct.Struct(">QII")
#: Option reply header: magic, option, reply type, data length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: NBD_OPT_EXPORT_NAME's answer: size, transmission flags (then 124 zeros unless NO_ZEROES).
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
#: Transmission request: magic, command flags, type, handle, offset, length.
REQUEST = struct.Struct(">IHHQQI")
#: Simple reply: magic, error, handle.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: Structured reply chunk header: magic, flags, type, handle, payload length.
STRUCTURED_HEADER = struct.Struct(">IHHQI")
#: NBD_REPLY_TYPE_OFFSET_DATA: the chunk header followed by the 64-bit offset of the data.
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
#: NBD_REPLY_TYPE_ERROR payload start: error, message length.
ERROR_PAYLOAD = struct.Struct(">IH")

# --- handshake flags ------------------------------------------------------------------------

FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
#: What the bridge offers in its greeting.
SERVER_HANDSHAKE_FLAGS: Final = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
#: A client flag outside this set means the server MUST drop the connection.
KNOWN_CLIENT_FLAGS: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES


class TransmissionFlags(enum.IntFlag):
    """Per-export flags sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    """Option types of the haggling phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Reply(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9


class Info(enum.IntEnum):
    """NBD_INFO types in NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlags(enum.IntFlag):
    """Per-request flags."""

    NONE = 0
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


#: Every flag the protocol defines; a bit outside it is "unknown" (EINVAL).
KNOWN_COMMAND_FLAGS: Final = int(
    CommandFlags.FUA
    | CommandFlags.NO_HOLE
    | CommandFlags.DF
    | CommandFlags.REQ_ONE
    | CommandFlags.FAST_ZERO
)

REPLY_FLAG_DONE: Final = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


# --- bounds ---------------------------------------------------------------------------------

#: The NBD spec's limit for every string (export names, descriptions, error messages): a name
#: of 4096 bytes is legal, 4097 is answered NBD_REP_ERR_INVALID (as nbdkit does).
MAX_STRING_BYTES: Final = 4096
#: Largest option payload the bridge reads.  A legal GO/INFO is at most 4 + 4096 + 2 + 2n
#: bytes and the bridge supports no option with a longer payload; anything bigger is a client
#: trying to make the server buffer it, so it is refused (ERR_TOO_BIG) without being read and
#: the connection is closed.  (nbdkit's cap is 64 MiB; qemu-nbd's is 4 KiB + a little.)
MAX_OPTION_BYTES: Final = 64 * 1024
#: Options one connection may send before the bridge hangs up.  Real clients send a handful
#: (STARTTLS, STRUCTURED_REPLY, a few INFO/META_CONTEXT probes, GO; ``nbdinfo --list`` a few
#: per export).  A flood of 100,000 cheap options would otherwise keep a connection and a
#: task busy forever without ever authenticating; nbdkit cuts off at 32, we allow 128.
MAX_OPTIONS: Final = 128
#: The largest READ or WRITE the bridge takes in one request, advertised as the maximum
#: block size.  2**25 is the size the spec tells clients is always safe (and QEMU's cap); it
#: is NOT the layer's max_bytes, because the bridge splits each request to the layer's
#: limits with dst.block.split like any other edge — the cap bounds the memory one request
#: can pin, not the shape the layer below can take.
MAX_REQUEST_BYTES: Final = 32 * 1024 * 1024
#: A WRITE longer than MAX_REQUEST_BYTES is refused, but its payload must still be read off
#: the socket to keep the stream in step; the bridge skips up to this many bytes (nbdkit's
#: own request cap, so a WRITE nbdkit would answer is answered here too) and hangs up on
#: anything longer rather than spend time draining it.
MAX_DISCARD_BYTES: Final = 64 * 1024 * 1024
#: NBD_REPLY_TYPE_ERROR messages are capped like every string; longer ones are truncated.
MAX_ERROR_MESSAGE_BYTES: Final = MAX_STRING_BYTES

# --- errors ---------------------------------------------------------------------------------

#: The error values the NBD spec allows in a reply.
NBD_ERRNOS: Final = frozenset(
    {
        errno.EPERM,
        errno.EIO,
        errno.ENOMEM,
        errno.EINVAL,
        errno.ENOSPC,
        errno.EOVERFLOW,
        errno.ENOTSUP,
        errno.ESHUTDOWN,
    }
)

#: Linux errnos that have a better NBD name than EIO (the spec: EDQUOT and EFBIG → ENOSPC;
#: a read-only or forbidden target → EPERM).
_ERRNO_ALIASES: Final = {
    errno.EDQUOT: errno.ENOSPC,
    errno.EFBIG: errno.ENOSPC,
    errno.EROFS: errno.EPERM,
    errno.EACCES: errno.EPERM,
}


def nbd_errno(code: int) -> int:
    """The NBD error value for Linux errno ``code`` (as carried by BlockError).

    Errnos the NBD spec does not list become EIO: a failure the bridge cannot name more
    precisely (a fenced write's ESTALE, a lost server's ECONNRESET) is an I/O error to a block
    device, and the Linux nbd driver turns every error into EIO anyway.
    """
    code = _ERRNO_ALIASES.get(code, code)
    return code if code in NBD_ERRNOS else errno.EIO


def name_of(kind: type[enum.IntEnum], value: int) -> str:
    """``Option.GO`` → ``"GO"``, unknown values as ``"#99"`` — for log lines."""
    try:
        return kind(value).name
    except ValueError:
        return f"#{value}"


# --- exports --------------------------------------------------------------------------------

#: Largest legal minimum block size (the spec: "MUST NOT be larger than 2^16").
_MAX_MINIMUM_BLOCK: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    #: Transmission flags; HAS_FLAGS is added, and SEND_DF once structured replies are on.
    flags: int
    minimum_block: int
    preferred_block: int
    maximum_block: int
    description: str = ""


#: What every export offers.  Not SEND_FAST_ZERO: the bridge cannot know whether the layer
#: below zeroes faster than it writes, and a client may not use FAST_ZERO unless offered.
SERVED_FLAGS: Final = int(
    TransmissionFlags.SEND_FLUSH
    | TransmissionFlags.SEND_FUA
    | TransmissionFlags.SEND_TRIM
    | TransmissionFlags.SEND_WRITE_ZEROES
    | TransmissionFlags.SEND_CACHE
)


def export_info(
    name: str, size: int, logical_block_size: int, page_size: int, multi_conn: bool, desc: str
) -> ExportInfo:
    """What the bridge advertises for a layer: its logical block size as the minimum, the
    larger of 4096 and the page size as preferred, MAX_REQUEST_BYTES as the maximum — the
    bridge's own cap, not the layer's max_bytes: requests are split to the layer's limits
    like every bio, so the cap only bounds the memory one request pins."""
    if page_size < 512 or page_size & (page_size - 1):
        raise ConfigError(f"page_size={page_size} must be a power of two >= 512")
    flags = SERVED_FLAGS | (TransmissionFlags.CAN_MULTI_CONN if multi_conn else 0)
    preferred = max(4096, page_size, logical_block_size)
    sizes = (logical_block_size, preferred, MAX_REQUEST_BYTES)
    return ExportInfo(name, size, int(flags), *sizes, desc)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_exports(exports: Sequence[ExportInfo]) -> None:
    """Raise ConfigError unless ``exports`` can be served: non-empty, unique names, strings
    within the spec's limits, block sizes as the spec requires them."""
    if not exports:
        raise ConfigError("an NBD server needs at least one export")
    seen: set[str] = set()
    for e in exports:
        for what, text in (("name", e.name), ("description", e.description)):
            raw = text.encode()
            if len(raw) > MAX_STRING_BYTES or "\0" in text:
                raise ConfigError(
                    f"export {what} {text[:40]!r}: must be at most {MAX_STRING_BYTES} "
                    f"UTF-8 bytes without NUL, got {len(raw)} bytes"
                )
        if e.name in seen:
            raise ConfigError(f"export name {e.name!r} appears twice")
        seen.add(e.name)
        lo, pref, hi = e.minimum_block, e.preferred_block, e.maximum_block
        if not (_power_of_two(lo) and lo <= _MAX_MINIMUM_BLOCK):
            raise ConfigError(
                f"export {e.name!r}: minimum_block={lo} must be a power of two <= 65536"
            )
        if not (_power_of_two(pref) and pref >= max(lo, 512) and hi % lo == 0 and hi >= pref):
            raise ConfigError(
                f"export {e.name!r}: block sizes min={lo} preferred={pref} max={hi} must satisfy "
                "power-of-two preferred >= max(min, 512), max a multiple of min, max >= preferred"
            )
        if e.size < 0 or e.size % lo or e.size >= 1 << 63:
            raise ConfigError(f"export {e.name!r}: size={e.size} must be a multiple of {lo}")
