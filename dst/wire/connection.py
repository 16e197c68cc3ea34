"""The dst connection state machine: which message may travel which way, when.

Theory of operation
-------------------

A :class:`Connection` is one end of one dst connection, as a client (which
includes a bridge, and a server replicating to its peer) or as a server.  It
sees messages, never bytes: the Trio adapter reads a frame with the codec
(``parse_prefix``, ``parse_meta``, ``check_data``) and hands the prefix and
message to :meth:`Connection.receive`; it calls :meth:`Connection.send`
before it encodes and writes a frame.  Neither call does I/O, so every rule
below is tested without a socket (``tests/unit/test_connection.py``).

States, the same for both ends::

    HANDSHAKE --(Welcome sent / received)--> READY
        |                                      |
        +---(Goodbye either way, close(), fatal error)---> CLOSED

In HANDSHAKE the client sends one Hello and the server receives it; the server
answers Welcome (-> READY) or Goodbye (-> CLOSED).  Nothing else crosses
before: a request, Attach or Ping during the handshake is fatal, because the
server must not open or allocate anything for an unauthenticated peer.  A
Welcome must pick a version inside the Hello's range and a subset of its
features; a Welcome that does not is fatal on the client.

In READY the client sends Attach, requests (ChecksumRequest is one) and the
administration messages StatusRequest, PromoteRequest and SyncRequest; the
server answers each with Attached, StatusReply or Reply; both may Ping and Pong.
Hello and Welcome are over.  Requests are pipelined and answered in any order,
so each end keeps an *in-flight table* keyed by ``(tid, sub)`` (Attach and the
administration messages count as ``(tid, 0)``).  The client's entry lives from
send(request) to receive(reply); the server's from receive(request) to
send(reply).  From the table follow the rules: no reply without a request, a
read's successful reply carries exactly ``length`` data bytes and a
checksum's 4 per extent, Attach succeeds with Attached and only Attach does,
StatusRequest and SyncRequest with StatusReply and only they do, at most the server's
``max_inflight`` requests outstanding, no second request under a
``(tid, sub)`` still in flight.

CLOSED is terminal.  A Goodbye may be sent in any state, once, as the last
frame; after it, or after :meth:`close`, both calls raise
LocalProtocolError (the adapter stops reading).  After the peer's Goodbye a
further frame is fatal.

Errors.  What *we* get wrong raises LocalProtocolError.  What the peer gets
wrong is either fatal -- :meth:`receive` raises RemoteProtocolError, the state
becomes CLOSED, the adapter may send ``Goodbye(exc.errno, str(exc))`` and
closes -- or answerable: :meth:`receive` returns a BadRequest (those from the
codec pass through), the request stays in the table, and the server answers it
with ``Reply(tid, sub, errno, message)``.  A duplicate ``(tid, sub)`` is
answered EEXIST and counted apart, so the error reply for it does not retire
the original request.  Exceeding ``max_inflight`` is fatal: the cap exists to
bound the server's memory, and a peer that ignores it is not to be trusted
with more.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from dst.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from dst.wire.codec import PROTOCOL_VERSION, FramePrefix
from dst.wire.messages import (
    MSG_TYPE_OF,
    REQUEST_TYPES,
    TID_ONLY_TYPES,
    Attach,
    Attached,
    BadRequest,
    ChecksumRequest,
    Errno,
    FrameFlags,
    Goodbye,
    Hello,
    Message,
    Ping,
    Pong,
    ReadRequest,
    Received,
    Reply,
    StatusReply,
    StatusRequest,
    SyncRequest,
    Welcome,
    WriteRequest,
)
from dst.wire.rules import MAX_DATA_LEN, MAX_INFLIGHT_CAP, checksum_data_len, pages_misfit

# The protocol versions this implementation speaks, (min, max).
SUPPORTED_VERSIONS = (PROTOCOL_VERSION, PROTOCOL_VERSION)

Key = tuple[int, int]
Answer = Attached | StatusReply | Reply


class ConnState(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the handshake settled; ``node_id`` .. ``max_inflight`` describe
    the peer as it announced itself."""

    version: int
    node_id: str
    role: str
    page_size: int
    limits: Mapping[str, int]
    features: tuple[str, ...]  # the features both ends agreed on (the Welcome's)
    max_inflight: int
    max_bytes: int  # the largest read or write either end accepts on this connection


def choose_version(versions: tuple[int, int]) -> int | None:
    """The highest version in both ``versions`` and SUPPORTED_VERSIONS, or None
    (then the server answers Goodbye(EPROTONOSUPPORT))."""
    high = min(versions[1], SUPPORTED_VERSIONS[1])
    return high if high >= max(versions[0], SUPPORTED_VERSIONS[0]) else None


def _version_ok(version: int, offered: tuple[int, int]) -> bool:
    """A Welcome's version is one the Hello offered and we speak."""
    lo, hi = max(offered[0], SUPPORTED_VERSIONS[0]), min(offered[1], SUPPORTED_VERSIONS[1])
    return lo <= version <= hi


def _key(msg: Message) -> Key:
    if isinstance(msg, (*TID_ONLY_TYPES, Attached, StatusReply)):
        return (msg.tid, 0)
    assert isinstance(msg, (*REQUEST_TYPES, Reply, Received, BadRequest))
    return (msg.tid, msg.sub)


def _name(msg: Message) -> str:
    return type(msg).__name__


class Connection:
    """One end of a dst connection; see the module docstring.

    ``max_bytes`` and ``max_inflight`` are this end's hard caps: what we
    announce (``limits["max_bytes"]``, ``max_inflight`` in our Hello or
    Welcome) may be lower, never higher, and the lower figure is enforced."""

    def __init__(
        self,
        our_role: Literal["client", "server"],
        *,
        max_bytes: int = MAX_DATA_LEN,
        max_inflight: int = 128,
    ) -> None:
        if our_role not in ("client", "server"):
            raise ConfigError(f"our_role {our_role!r}: must be 'client' or 'server'")
        if not 1 <= max_bytes <= MAX_DATA_LEN:
            raise ConfigError(f"max_bytes {max_bytes}: must be in [1, {MAX_DATA_LEN}]")
        if not 1 <= max_inflight <= MAX_INFLIGHT_CAP:
            raise ConfigError(f"max_inflight {max_inflight}: must be in [1, {MAX_INFLIGHT_CAP}]")
        self.our_role = our_role
        self._max_bytes = max_bytes
        self._max_inflight = max_inflight
        self._state = ConnState.HANDSHAKE
        self._hello: Hello | None = None
        self._welcome: Welcome | None = None
        self._negotiated: Negotiated | None = None
        self._inflight: dict[Key, Message] = {}
        self._dups: dict[Key, int] = {}  # duplicates owed an EEXIST reply (server)
        #: EEXIST answers to copies of our requests the network made (client)
        self.duplicates_answered = 0
        self._received: set[Key] = set()  # writes whose Received has crossed
        self._we_closed = False

    @property
    def state(self) -> ConnState:
        return self._state

    @property
    def negotiated(self) -> Negotiated | None:
        return self._negotiated

    @property
    def outstanding(self) -> int:
        """Requests sent (client) or received (server) and not yet answered."""
        return len(self._inflight) + sum(self._dups.values())

    def close(self) -> None:
        """We are closing the transport: nothing more is sent or received."""
        self._state = ConnState.CLOSED
        self._we_closed = True

    # -- sending ------------------------------------------------------------

    def send(self, msg: Message, *, data_len: int | None = None) -> None:
        """Check that we may send ``msg`` now and record it.  ``data_len``,
        when given, is checked too (a read's Reply carries ``length`` bytes, a
        checksum's 4 per extent, any other none)."""
        if self._we_closed:
            raise LocalProtocolError(f"send {_name(msg)} on a closed connection", Errno.ESHUTDOWN)
        if isinstance(msg, Goodbye):
            self._state, self._we_closed = ConnState.CLOSED, True
            return
        if self._state is ConnState.CLOSED:
            raise LocalProtocolError(f"send {_name(msg)} after the peer closed", Errno.ESHUTDOWN)
        if self.our_role == "client":
            self._send_client(msg)
        else:
            self._send_server(msg, data_len)

    def _send_client(self, msg: Message) -> None:
        state, welcome = self._state, self._welcome
        if isinstance(msg, Hello) and state is ConnState.HANDSHAKE and self._hello is None:
            if msg.max_inflight > self._max_inflight:
                raise LocalProtocolError(f"Hello max_inflight {msg.max_inflight} over our cap")
            if choose_version(msg.versions) is None:
                raise LocalProtocolError(
                    f"Hello versions {msg.versions}: we speak {SUPPORTED_VERSIONS}"
                )
            self._hello = msg
        elif isinstance(msg, Ping | Pong) and state is ConnState.READY:
            pass
        elif isinstance(msg, (*TID_ONLY_TYPES, *REQUEST_TYPES)) and welcome and self._hello:
            key = _key(msg)
            if key in self._inflight:
                raise LocalProtocolError(f"(tid, sub) {key} already in flight", Errno.EEXIST)
            if self.outstanding >= welcome.max_inflight:
                why = f"{self.outstanding} outstanding, server allows {welcome.max_inflight}"
                raise LocalProtocolError(why)
            if isinstance(msg, ReadRequest | WriteRequest):
                if msg.length > self._limit_bytes():
                    why = f"length {msg.length} over max_bytes {self._limit_bytes()}"
                    raise LocalProtocolError(why, Errno.E2BIG)
                misfit = pages_misfit(msg.pages, self._hello.page_size)
                if misfit:
                    raise LocalProtocolError(misfit, Errno.EINVAL)
            self._inflight[key] = msg
        else:
            raise LocalProtocolError(f"client may not send {_name(msg)} in {state.name}")

    def _send_server(self, msg: Message, data_len: int | None) -> None:
        state, hello = self._state, self._hello
        if isinstance(msg, Welcome) and state is ConnState.HANDSHAKE and hello is not None:
            if not _version_ok(msg.version, hello.versions):
                why = f"Welcome version {msg.version}: Hello offers {hello.versions}"
                raise LocalProtocolError(f"{why}, we speak {SUPPORTED_VERSIONS}")
            if not set(msg.features) <= set(hello.features):
                raise LocalProtocolError(f"Welcome features {msg.features} not all offered")
            if msg.max_inflight > self._max_inflight:
                raise LocalProtocolError(f"Welcome max_inflight {msg.max_inflight} over our cap")
            self._ready(msg, peer=hello)
        elif isinstance(msg, Ping | Pong) and state is ConnState.READY:
            pass
        elif isinstance(msg, Received) and state is ConnState.READY:
            self._check_received(msg, LocalProtocolError)
        elif isinstance(msg, Answer) and state is ConnState.READY:
            key = _key(msg)
            pending = self._inflight.get(key)
            if pending is None:
                raise LocalProtocolError(f"{_name(msg)} {key}: no such request in flight")
            if isinstance(msg, Reply) and msg.errno and self._dups.get(key):
                self._retire_dup(key)  # the EEXIST answer to a duplicate
                return
            self._check_answer(msg, pending, data_len, LocalProtocolError)
            del self._inflight[key]
            self._received.discard(key)
        else:
            raise LocalProtocolError(f"server may not send {_name(msg)} in {state.name}")

    # -- receiving ----------------------------------------------------------

    def receive(self, prefix: FramePrefix, msg: Message) -> Message:
        """Check the peer's ``msg`` (its frame header is ``prefix``).  Returns
        it, or a BadRequest to answer; raises RemoteProtocolError if fatal."""
        if self._we_closed:
            raise LocalProtocolError(f"receive {_name(msg)} on a closed connection")
        if self._state is ConnState.CLOSED:
            raise RemoteProtocolError(f"{_name(msg)} after the peer's Goodbye")
        try:
            if isinstance(msg, Goodbye):
                self._state = ConnState.CLOSED
                return msg
            if self.our_role == "client":
                return self._receive_client(prefix, msg)
            return self._receive_server(prefix, msg)
        except RemoteProtocolError:
            self._state = ConnState.CLOSED
            raise

    def _receive_client(self, prefix: FramePrefix, msg: Message) -> Message:
        state, hello = self._state, self._hello
        if isinstance(msg, Welcome) and state is ConnState.HANDSHAKE and hello is not None:
            if not _version_ok(msg.version, hello.versions):
                raise RemoteProtocolError(f"Welcome version {msg.version} not in {hello.versions}")
            if not set(msg.features) <= set(hello.features):
                raise RemoteProtocolError(f"Welcome features {msg.features} were not offered")
            self._ready(msg, peer=msg)
        elif state is not ConnState.READY:
            raise RemoteProtocolError(f"{_name(msg)} before the handshake ended")
        elif isinstance(msg, Answer):
            key = _key(msg)
            pending = self._inflight.get(key)
            if pending is None:
                raise RemoteProtocolError(f"{_name(msg)} {key}: no such request in flight")
            if isinstance(msg, Reply) and msg.errno == Errno.EEXIST:
                # We sent this (tid, sub) once: the server saw it twice, so the network
                # duplicated the frame.  This answers the copy; the original's follows.
                self.duplicates_answered += 1
                return msg
            self._check_answer(msg, pending, prefix.data_len, RemoteProtocolError)
            del self._inflight[key]
            self._received.discard(key)
        elif isinstance(msg, Received):
            self._check_received(msg, RemoteProtocolError)
        elif not isinstance(msg, Ping | Pong):
            raise RemoteProtocolError(f"a server does not send {_name(msg)}")
        return msg

    def _receive_server(self, prefix: FramePrefix, msg: Message) -> Message:
        state, welcome, peer = self._state, self._welcome, self._negotiated
        if isinstance(msg, Hello) and state is ConnState.HANDSHAKE and self._hello is None:
            self._hello = msg
            return msg
        if state is not ConnState.READY or welcome is None or peer is None:
            raise RemoteProtocolError(f"{_name(msg)} before the handshake ended")
        if isinstance(msg, Ping | Pong):
            return msg
        if not isinstance(msg, (*TID_ONLY_TYPES, BadRequest, *REQUEST_TYPES)):
            raise RemoteProtocolError(f"a client does not send {_name(msg)}")
        key = _key(msg)
        if self.outstanding >= welcome.max_inflight:
            why = f"over max_inflight {welcome.max_inflight}: {key} with {self.outstanding} out"
            raise RemoteProtocolError(why)
        if key in self._inflight:
            self._dups[key] = self._dups.get(key, 0) + 1
            return self._bad(msg, Errno.EEXIST, f"(tid, sub) {key} already in flight")
        if isinstance(msg, ReadRequest | WriteRequest):
            if msg.length > peer.max_bytes:  # a write's data_len == length (codec)
                why = f"length {msg.length} over max_bytes {peer.max_bytes}"
                msg = self._bad(msg, Errno.E2BIG, why)
            elif misfit := pages_misfit(msg.pages, peer.page_size):
                msg = self._bad(msg, Errno.EINVAL, misfit)
        self._inflight[key] = msg
        return msg

    # -- helpers ------------------------------------------------------------

    def _ready(self, welcome: Welcome, *, peer: Hello | Welcome) -> None:
        self._welcome, self._state = welcome, ConnState.READY
        self._negotiated = Negotiated(
            welcome.version, peer.node_id, peer.role, peer.page_size, peer.limits,
            welcome.features, peer.max_inflight, self._limit_bytes(),
        )  # fmt: skip

    def _limit_bytes(self) -> int:
        """Our cap, lowered by what the server announced (0 or absent: none)."""
        announced = self._welcome.limits.get("max_bytes", 0) if self._welcome else 0
        return min(self._max_bytes, announced or MAX_DATA_LEN)

    @staticmethod
    def _bad(msg: Message, errno: int, why: str) -> BadRequest:
        if isinstance(msg, BadRequest):
            return BadRequest(msg.tid, msg.sub, msg.msg_type, errno, why)
        tid, sub = _key(msg)
        return BadRequest(tid, sub, MSG_TYPE_OF[type(msg)], errno, why)

    def _retire_dup(self, key: Key) -> None:
        self._dups[key] -= 1
        if not self._dups[key]:
            del self._dups[key]

    def _check_received(
        self, msg: Received, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        """Received: for an in-flight WRITE flagged RECV_ACK, once, before its Reply."""
        key = _key(msg)
        pending = self._inflight.get(key)
        if not isinstance(pending, WriteRequest) or not pending.flags & FrameFlags.RECV_ACK:
            raise error(f"Received {key}: no write asking RECV_ACK in flight")
        if key in self._received:
            raise error(f"Received {key} twice")
        self._received.add(key)

    @staticmethod
    def _check_answer(
        msg: Answer,
        pending: Message,
        data_len: int | None,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        """The answer fits the request: Attached for Attach, StatusReply for
        StatusRequest, read and checksum data sized."""
        if isinstance(msg, Attached) and not isinstance(pending, Attach):
            raise error(f"Attached {_key(msg)} answers {_name(pending)}, not Attach")
        if isinstance(msg, StatusReply) and not isinstance(pending, StatusRequest | SyncRequest):
            raise error(f"StatusReply {_key(msg)} answers {_name(pending)}, not StatusRequest")
        ok = isinstance(msg, Reply) and not msg.errno
        if ok and isinstance(pending, Attach | StatusRequest | SyncRequest | BadRequest):
            raise error(f"success Reply {_key(msg)} to {_name(pending)}: must be an error")
        want = 0
        if ok and isinstance(pending, ReadRequest):
            want = pending.length
        elif ok and isinstance(pending, ChecksumRequest):
            want = checksum_data_len(pending)
        if data_len is not None and data_len != want:
            raise error(f"{_name(msg)} {_key(msg)} carries {data_len} data bytes, not {want}")
