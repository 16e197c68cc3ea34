"""The server side of the NBD fixed-newstyle handshake, sans-IO.

Theory of operation
-------------------

A :class:`ServerHandshake` is one connection's negotiation, from the server greeting to the
first byte of the transmission phase.  It sees bytes, never sockets: the Trio adapter
(:mod:`dst.nbd.bridge`) sends :meth:`~ServerHandshake.data_to_send`, feeds what it receives
to :meth:`~ServerHandshake.receive_data` (``b""`` for EOF) and asks
:meth:`~ServerHandshake.next_event` what happened, as with h11.  Replies to options are
queued by the machine itself — an option's answer is fully determined by the option and the
state — so the events are only what the adapter must *act* on::

    CLIENT_FLAGS --4 bytes--> OPTIONS --GO ok / EXPORT_NAME ok--> TRANSMISSION (Ready)
                                 |  ^
                       STARTTLS  |  | tls_established()
                       ACKed     v  |
                              TLS_PENDING
    any phase --ABORT / EOF at a boundary / fatal error--> CLOSED

- ``NEED_DATA``: feed more bytes.
- :class:`OptionAnswered`: an option got its final reply (for the log); keep going.
- :class:`StartTls`: the ACK is queued; send it, wrap the stream in TLS, call
  :meth:`~ServerHandshake.tls_established`.  Everything negotiated before is dropped there —
  a fresh :class:`_Negotiated` replaces the old one, so no flag can survive by being
  forgotten in a reset (nbdkit's CVE-2021-3716 carried structured replies across STARTTLS).
- :class:`Ready`: transmission starts; :attr:`~ServerHandshake.trailing_data` holds any
  bytes the client pipelined behind its last option.
- :class:`Aborted` (NBD_OPT_ABORT, ACK queued) and :class:`PeerClosed` (EOF between options).

TLS.  With ``tls_required`` the machine is a FORCEDTLS server: before STARTTLS every option
but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which cannot
be answered with an error, is fatal.  Without it, STARTTLS gets NBD_REP_ERR_POLICY.  Bytes
already buffered behind a STARTTLS were sent in plaintext before the client could have seen
the ACK — an injection into the coming TLS session (the CVE-2011-0411 pattern) — and are fatal.

Bounds, each named in :mod:`dst.nbd.protocol`: an option's announced length is checked against
``MAX_OPTION_BYTES`` *before* its data is buffered (larger: NBD_REP_ERR_TOO_BIG, then fatal);
string lengths inside options are checked against the option's own length before anything is
sliced (a name length of 0xffffffff is NBD_REP_ERR_INVALID, nothing allocated), and names
against ``MAX_STRING_BYTES``; at most ``MAX_OPTIONS`` options per connection.  The buffer
therefore never holds more than one option plus what one receive delivered.

Errors.  Anything the client gets fatally wrong raises RemoteProtocolError (phase CLOSED;
flush :meth:`~ServerHandshake.data_to_send` once more, then close).  Misuse by the adapter
raises LocalProtocolError.  Nothing else escapes, whatever the bytes (hypothesis checks it).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from dst.errors import LocalProtocolError, RemoteProtocolError
from dst.nbd import protocol as p
from dst.nbd.protocol import ExportInfo, Info, Option, Reply, TransmissionFlags, check_exports

__all__ = [
    "NEED_DATA",
    "Aborted",
    "Event",
    "NeedData",
    "OptionAnswered",
    "PeerClosed",
    "Phase",
    "Ready",
    "ServerHandshake",
    "StartTls",
]

_NAME_LEN = struct.Struct(">I")
_U16 = struct.Struct(">H")
#: NBD_INFO_BLOCK_SIZE payload: minimum, preferred, maximum.
_BLOCK_SIZES = struct.Struct(">III")
#: Bytes of an INFO/GO payload around the name: 32-bit name length, 16-bit request count.
_INFO_FIXED_BYTES: Final = 6


class NeedData:
    """Sentinel type of :data:`NEED_DATA`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class OptionAnswered:
    """An option got its final reply ``reply`` (a :class:`~dst.nbd.protocol.Reply`)."""

    option: int
    reply: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS was ACKed: send it, start TLS, then call ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Transmission starts on ``export`` with the flags the client was sent."""

    export: ExportInfo
    structured_replies: bool
    flags: int


@dataclass(frozen=True, slots=True)
class Aborted:
    """NBD_OPT_ABORT: the ACK is queued; send it and close."""


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The client hung up between options."""


Event = NeedData | OptionAnswered | StartTls | Ready | Aborted | PeerClosed


class Phase(enum.Enum):
    CLIENT_FLAGS = "client_flags"
    OPTIONS = "options"
    TLS_PENDING = "tls_pending"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(slots=True)
class _Negotiated:
    """Everything an option can change; replaced whole when TLS starts."""

    structured_replies: bool = False


class ServerHandshake:
    """One connection's fixed-newstyle negotiation, server side (see the module docstring)."""

    def __init__(self, exports: Sequence[ExportInfo], *, tls_required: bool) -> None:
        check_exports(exports)
        self._exports = tuple(exports)
        self._names = tuple(e.name.encode() for e in self._exports)
        self._tls_required = tls_required
        self.tls_active = False
        self.phase = Phase.CLIENT_FLAGS
        self.options_seen = 0
        self._negotiated = _Negotiated()
        self._no_zeroes = False
        self._buf = bytearray()
        self._eof = False
        self._out = bytearray(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.SERVER_HANDSHAKE_FLAGS))

    @property
    def structured_replies(self) -> bool:
        return self._negotiated.structured_replies

    @property
    def buffered(self) -> int:
        """Received bytes not yet consumed (bounded; see the module docstring)."""
        return len(self._buf)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase not in (Phase.CLIENT_FLAGS, Phase.OPTIONS):
            raise LocalProtocolError(f"receive_data in phase {self.phase.value}")
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if data:
            self._buf += data
        else:
            self._eof = True

    def tls_established(self) -> None:
        """TLS is up: forget everything negotiated in plaintext and take options again."""
        if self.phase is not Phase.TLS_PENDING:
            raise LocalProtocolError(f"tls_established in phase {self.phase.value}")
        self._negotiated = _Negotiated()
        self.tls_active = True
        self.phase = Phase.OPTIONS

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the option that started transmission (taken once)."""
        if self.phase is not Phase.TRANSMISSION:
            raise LocalProtocolError(f"trailing_data in phase {self.phase.value}")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_event(self) -> Event:
        if self.phase not in (Phase.CLIENT_FLAGS, Phase.OPTIONS):
            raise LocalProtocolError(f"next_event in phase {self.phase.value}")
        try:
            return self._next()
        except RemoteProtocolError:
            self.phase = Phase.CLOSED
            raise

    # -- parsing -------------------------------------------------------------------------------

    def _need(self, what: str) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise RemoteProtocolError(
                f"peer closed in the middle of {what} ({len(self._buf)} bytes buffered)"
            )
        self.phase = Phase.CLOSED
        return PeerClosed()

    def _next(self) -> Event:
        if self.phase is Phase.CLIENT_FLAGS:
            if len(self._buf) < p.CLIENT_FLAGS.size:
                return self._need("the client flags")
            (flags,) = p.CLIENT_FLAGS.unpack_from(self._buf)
            del self._buf[: p.CLIENT_FLAGS.size]
            if flags & ~p.KNOWN_CLIENT_FLAGS:
                raise RemoteProtocolError(f"unknown client flags 0x{flags:08x}")
            if self._tls_required and not flags & p.FLAG_C_FIXED_NEWSTYLE:
                raise RemoteProtocolError("TLS is required and needs fixed newstyle; not offered")
            self._no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
            self.phase = Phase.OPTIONS
        if len(self._buf) < p.OPTION_HEADER.size:
            return self._need("an option header")
        magic, option, length = p.OPTION_HEADER.unpack_from(self._buf)
        if magic != p.IHAVEOPT:
            # Where a transmission request sent before the handshake ended lands.
            raise RemoteProtocolError(f"option magic 0x{magic:016x} is not IHAVEOPT")
        if self.options_seen >= p.MAX_OPTIONS:
            raise RemoteProtocolError(f"more than MAX_OPTIONS={p.MAX_OPTIONS} options")
        if length > p.MAX_OPTION_BYTES:
            message = f"option data of {length} bytes exceeds {p.MAX_OPTION_BYTES}"
            self._reply(option, Reply.ERR_TOO_BIG, message.encode())
            raise RemoteProtocolError(f"option {p.name_of(Option, option)}: {message}")
        end = p.OPTION_HEADER.size + length
        if len(self._buf) < end:
            return self._need(f"option {p.name_of(Option, option)}")
        data = bytes(self._buf[p.OPTION_HEADER.size : end])
        del self._buf[:end]
        self.options_seen += 1
        return self._handle(option, data)

    # -- options -------------------------------------------------------------------------------

    def _handle(self, option: int, data: bytes) -> Event:
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            self.phase = Phase.CLOSED
            return Aborted()
        if option == Option.STARTTLS:
            return self._starttls(data)
        if self._tls_required and not self.tls_active:
            return self._refuse(option, Reply.ERR_TLS_REQD, "TLS is required: STARTTLS first")
        if option == Option.LIST:
            if data:
                return self._refuse(option, Reply.ERR_INVALID, "NBD_OPT_LIST carries no data")
            for name, export in zip(self._names, self._exports, strict=True):
                payload = _NAME_LEN.pack(len(name)) + name + export.description.encode()
                self._reply(option, Reply.SERVER, payload)
            self._reply(option, Reply.ACK)
            return OptionAnswered(option, Reply.ACK, f"{len(self._exports)} exports")
        if option in (Option.INFO, Option.GO):
            return self._info(option, data)
        if option == Option.STRUCTURED_REPLY:
            if data:
                return self._refuse(option, Reply.ERR_INVALID, "STRUCTURED_REPLY carries no data")
            self._negotiated.structured_replies = True
            self._reply(option, Reply.ACK)
            return OptionAnswered(option, Reply.ACK)
        return self._refuse(option, Reply.ERR_UNSUP, "option not supported")

    def _starttls(self, data: bytes) -> Event:
        if not self._tls_required:
            return self._refuse(Option.STARTTLS, Reply.ERR_POLICY, "TLS is not configured")
        if self.tls_active:
            return self._refuse(Option.STARTTLS, Reply.ERR_INVALID, "TLS is already active")
        if data:
            return self._refuse(Option.STARTTLS, Reply.ERR_INVALID, "STARTTLS carries no data")
        if self._buf:
            raise RemoteProtocolError(
                f"{len(self._buf)} plaintext bytes sent after STARTTLS, before its ACK"
            )
        self._reply(Option.STARTTLS, Reply.ACK)
        self.phase = Phase.TLS_PENDING
        return StartTls()

    def _export_name(self, name: bytes) -> Event:
        # NBD_OPT_EXPORT_NAME has no error reply: every refusal is a hang-up.
        if self._tls_required and not self.tls_active:
            raise RemoteProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS; TLS is required")
        if len(name) > p.MAX_STRING_BYTES:
            raise RemoteProtocolError(f"export name of {len(name)} bytes (max 4096)")
        export = self._find(name)
        if export is None:
            raise RemoteProtocolError(f"no export named {_show(name)}")
        flags = self._flags(export)
        self._out += p.EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self._no_zeroes:
            self._out += bytes(p.EXPORT_NAME_PADDING)
        return self._ready(export, flags)

    def _info(self, option: int, data: bytes) -> Event:
        if len(data) < _INFO_FIXED_BYTES:
            return self._refuse(option, Reply.ERR_INVALID, f"{len(data)} bytes is too short")
        (name_len,) = _NAME_LEN.unpack_from(data)
        # Checked against what is really there before anything is sliced or allocated.
        if name_len > len(data) - _INFO_FIXED_BYTES:
            return self._refuse(
                option, Reply.ERR_INVALID, f"name length {name_len} overruns {len(data)} bytes"
            )
        if name_len > p.MAX_STRING_BYTES:
            return self._refuse(option, Reply.ERR_INVALID, f"name of {name_len} bytes (max 4096)")
        name = data[4 : 4 + name_len]
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != _INFO_FIXED_BYTES + name_len + 2 * count:
            return self._refuse(
                option, Reply.ERR_INVALID, f"{count} info requests do not fill {len(data)} bytes"
            )
        start = _INFO_FIXED_BYTES + name_len
        wanted = {_U16.unpack_from(data, start + 2 * i)[0] for i in range(count)}
        export = self._find(name)
        if export is None:
            return self._refuse(option, Reply.ERR_UNKNOWN, f"no export named {_show(name)}")
        flags = self._flags(export)
        self._info_reply(option, Info.EXPORT, p.EXPORT_NAME_REPLY.pack(export.size, flags))
        if Info.NAME in wanted:
            self._info_reply(option, Info.NAME, export.name.encode())
        if Info.DESCRIPTION in wanted and export.description:
            self._info_reply(option, Info.DESCRIPTION, export.description.encode())
        # Always sent: the bridge enforces a minimum of 512, not the default 1.
        sizes = (export.minimum_block, export.preferred_block, export.maximum_block)
        self._info_reply(option, Info.BLOCK_SIZE, _BLOCK_SIZES.pack(*sizes))
        self._reply(option, Reply.ACK)
        if option == Option.GO:
            return self._ready(export, flags)
        return OptionAnswered(option, Reply.ACK, f"export {export.name!r}")

    # -- helpers -------------------------------------------------------------------------------

    def _find(self, name: bytes) -> ExportInfo | None:
        if not name:
            return self._exports[0]  # the default export, as nbdkit picks its first
        for candidate, export in zip(self._names, self._exports, strict=True):
            if candidate == name:
                return export
        return None

    def _flags(self, export: ExportInfo) -> int:
        flags = export.flags | TransmissionFlags.HAS_FLAGS
        if self._negotiated.structured_replies:
            flags |= TransmissionFlags.SEND_DF  # every read is answered in one chunk anyway
        return int(flags)

    def _ready(self, export: ExportInfo, flags: int) -> Ready:
        self.phase = Phase.TRANSMISSION
        return Ready(export, self._negotiated.structured_replies, flags)

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _info_reply(self, option: int, info: int, payload: bytes) -> None:
        self._reply(option, Reply.INFO, _U16.pack(info) + payload)

    def _refuse(self, option: int, reply: int, message: str) -> OptionAnswered:
        self._reply(option, reply, message.encode()[: p.MAX_STRING_BYTES])
        return OptionAnswered(option, reply, message)


def _show(name: bytes) -> str:
    """A client-chosen name for a message: decoded leniently and cut short."""
    text = name[:64].decode("utf-8", "backslashreplace")
    return repr(text) + ("..." if len(name) > 64 else "")
