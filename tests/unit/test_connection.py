"""The connection state machine: every message type, sent and received, in
every state, for both roles (a table, as h2's test_state_machines), then the
in-flight rules -- duplicates, max_inflight, read and checksum data, answers of
the right kind -- and a hypothesis state machine driving a client and a server
through the real codec."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dst.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from dst.wire import (
    MAX_DATA_LEN,
    MSG_TYPE_OF,
    SUPPORTED_VERSIONS,
    Attach,
    Attached,
    BadRequest,
    ChecksumRequest,
    Connection,
    ConnState,
    Errno,
    FlushRequest,
    FrameDecoder,
    FrameFlags,
    FramePrefix,
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
    SyncRequest,
    TrimRequest,
    Welcome,
    WriteRequest,
    WriteZeroesRequest,
    checksum_data_len,
    choose_version,
    encode_frame,
)

MIB = 1024 * 1024
HELLO = Hello((1, 1), "client-a", "client", 4096, {"max_bytes": MIB}, ("trim", "zero"), 8)
WELCOME = Welcome(1, "server-1", "replica", 4096, {"max_bytes": MIB}, ("trim",), 5)


def prefix(msg: Message, data_len: int = 0) -> FramePrefix:
    """A header as the codec would have parsed it (the Connection reads data_len)."""
    msg_type = msg.msg_type if isinstance(msg, BadRequest) else 0
    return FramePrefix(msg_type, getattr(msg, "flags", 0), 1, data_len, 0, 0)


def read(tid: int, sub: int = 0, length: int = 4096, pages: Any = None) -> ReadRequest:
    return ReadRequest(tid, sub, 1, 0, length, pages or ((4096, 0, length // 4096),))


# -- connections in each state --------------------------------------------------

# What a READY connection has outstanding: 3 of WELCOME's 5.
IN_FLIGHT = (Attach(1, "vol0"), read(2), StatusRequest(3))


def client_in(state: str) -> Connection:
    conn = Connection("client")
    if state != "fresh":
        conn.send(HELLO)
    if state in ("ready", "closed_by_us", "closed_by_peer"):
        conn.receive(prefix(WELCOME), WELCOME)
        for msg in IN_FLIGHT:
            conn.send(msg)
    if state == "closed_by_us":
        conn.send(Goodbye(Errno.ESHUTDOWN, "bye"))
    if state == "closed_by_peer":
        conn.receive(prefix(Goodbye(0)), Goodbye(0))
    return conn


def server_in(state: str) -> Connection:
    conn = Connection("server")
    if state != "fresh":
        conn.receive(prefix(HELLO), HELLO)
    if state in ("ready", "closed_by_us", "closed_by_peer"):
        conn.send(WELCOME)
        for msg in IN_FLIGHT:
            conn.receive(prefix(msg), msg)
    if state == "closed_by_us":
        conn.send(Goodbye(Errno.ESHUTDOWN, "bye"))
    if state == "closed_by_peer":
        conn.receive(prefix(Goodbye(0)), Goodbye(0))
    return conn


SAMPLES: dict[str, Message] = {
    "hello": HELLO,
    "welcome": WELCOME,
    "attach": Attach(10, "vol1"),
    "attached": Attached(1, 7, MIB, 3, {}),  # answers IN_FLIGHT's Attach
    "read": read(11),
    "write": WriteRequest(12, 0, 1, 0, 4096, 3, ((4096, 0, 1),)),
    "flush": FlushRequest(13, 0, 1),
    "trim": TrimRequest(14, 0, 1, 0, 4096, 3),
    "zeroes": WriteZeroesRequest(15, 0, 1, 0, 4096, 3),
    "checksum": ChecksumRequest(17, 0, 1, 0, 8704, 4096),
    "status": StatusRequest(18),
    "promote": PromoteRequest(19, "vol0", False),
    "sync": SyncRequest(20, "vol0", "query", {}),
    "received": Received(2, 0),  # for IN_FLIGHT's read: never allowed
    "status_reply": StatusReply(3, {"role": "primary"}),  # answers IN_FLIGHT's StatusRequest
    "ping": Ping(5),
    "pong": Pong(5),
    "reply": Reply(2, 0, Errno.EIO, "disk"),  # answers IN_FLIGHT's read, with an error
    "goodbye": Goodbye(Errno.ESHUTDOWN, "going"),
    "bad": BadRequest(16, 0, 0x15, Errno.EOPNOTSUPP, "unknown message type 0x15"),
}
STATES = ["fresh", "hello", "ready", "closed_by_us", "closed_by_peer"]
REQUESTS = {
    "attach", "read", "write", "flush", "trim", "zeroes", "checksum", "status", "promote", "sync"
}  # fmt: skip
ALL = set(SAMPLES)

# What is allowed; everything else raises LocalProtocolError when sent and
# RemoteProtocolError when received -- except that, once we closed, receiving
# is our own mistake (LocalProtocolError) too.
CAN_SEND = {
    ("client", "fresh"): {"hello", "goodbye"},
    ("client", "hello"): {"goodbye"},
    ("client", "ready"): REQUESTS | {"ping", "pong", "goodbye"},
    ("client", "closed_by_us"): set(),
    ("client", "closed_by_peer"): {"goodbye"},
    ("server", "fresh"): {"goodbye"},
    ("server", "hello"): {"welcome", "goodbye"},
    ("server", "ready"): {"attached", "status_reply", "reply", "ping", "pong", "goodbye"},
    ("server", "closed_by_us"): set(),
    ("server", "closed_by_peer"): {"goodbye"},
}
CAN_RECEIVE = {
    ("client", "fresh"): {"goodbye"},
    ("client", "hello"): {"welcome", "goodbye"},
    ("client", "ready"): {"attached", "status_reply", "reply", "ping", "pong", "goodbye"},
    ("client", "closed_by_us"): set(),
    ("client", "closed_by_peer"): set(),
    ("server", "fresh"): {"hello", "goodbye"},
    ("server", "hello"): {"goodbye"},
    ("server", "ready"): REQUESTS | {"bad", "ping", "pong", "goodbye"},
    ("server", "closed_by_us"): set(),
    ("server", "closed_by_peer"): set(),
}
TABLE = [(r, s, m) for r in ("client", "server") for s in STATES for m in sorted(SAMPLES)]


def make(role: str, state: str) -> Connection:
    return client_in(state) if role == "client" else server_in(state)


@pytest.mark.parametrize(("role", "state", "name"), TABLE)
def test_send_table(role: str, state: str, name: str) -> None:
    conn, msg = make(role, state), SAMPLES[name]
    if name in CAN_SEND[(role, state)]:
        conn.send(msg)
        if name == "goodbye":
            assert conn.state is ConnState.CLOSED
        if name == "welcome" or (name == "hello" and state == "fresh"):
            assert conn.state is (ConnState.READY if name == "welcome" else ConnState.HANDSHAKE)
    else:
        before = conn.state
        with pytest.raises(LocalProtocolError):
            conn.send(msg)
        assert conn.state is before  # a refused send changes nothing


@pytest.mark.parametrize(("role", "state", "name"), TABLE)
def test_receive_table(role: str, state: str, name: str) -> None:
    conn, msg = make(role, state), SAMPLES[name]
    if name in CAN_RECEIVE[(role, state)]:
        assert conn.receive(prefix(msg), msg) == msg
        if name in ("welcome", "goodbye"):
            assert conn.state is (ConnState.READY if name == "welcome" else ConnState.CLOSED)
    elif state == "closed_by_us":
        with pytest.raises(LocalProtocolError):
            conn.receive(prefix(msg), msg)
    else:
        with pytest.raises(RemoteProtocolError):
            conn.receive(prefix(msg), msg)
        assert conn.state is ConnState.CLOSED  # fatal: the adapter closes
        conn.send(Goodbye(Errno.EPROTO, "protocol error"))  # ... after saying why


def test_close_ends_everything() -> None:
    conn = client_in("ready")
    conn.close()
    assert conn.state is ConnState.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(Goodbye(0))
    with pytest.raises(LocalProtocolError):
        conn.receive(prefix(Ping(1)), Ping(1))


# -- handshake -----------------------------------------------------------------------


def test_negotiated_values_on_both_ends() -> None:
    client, server = Connection("client", max_bytes=512 * 1024), Connection("server")
    assert client.negotiated is None and server.negotiated is None
    client.send(HELLO)
    server.receive(prefix(HELLO), HELLO)
    assert server.negotiated is None and server.state is ConnState.HANDSHAKE
    server.send(WELCOME)
    client.receive(prefix(WELCOME), WELCOME)
    c, s = client.negotiated, server.negotiated
    assert c is not None and s is not None
    assert (c.version, c.node_id, c.role, c.page_size) == (1, "server-1", "replica", 4096)
    assert (s.version, s.node_id, s.role, s.page_size) == (1, "client-a", "client", 4096)
    assert c.features == s.features == ("trim",)
    assert (c.max_inflight, s.max_inflight) == (5, 8)
    assert dict(c.limits) == dict(s.limits) == {"max_bytes": MIB}
    assert (c.max_bytes, s.max_bytes) == (512 * 1024, MIB)  # the lower cap wins


def test_versions() -> None:
    assert SUPPORTED_VERSIONS == (1, 1)
    assert choose_version((1, 1)) == 1 and choose_version((1, 9)) == 1
    assert choose_version((2, 3)) is None
    with pytest.raises(LocalProtocolError, match="versions"):
        Connection("client").send(Hello((2, 3), "c", "client", 4096, {}, (), 1))


@pytest.mark.parametrize(
    ("welcome", "match"),
    [
        (Welcome(2, "s", "replica", 4096, {}, (), 4), "version"),
        (Welcome(1, "s", "replica", 4096, {}, ("compress",), 4), "features"),
        (Welcome(1, "s", "replica", 4096, {}, (), 129), "max_inflight"),
    ],
)
def test_server_may_not_send_a_welcome_that_does_not_fit(welcome: Welcome, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        server_in("hello").send(welcome)


@pytest.mark.parametrize(
    ("welcome", "match"),
    [
        (Welcome(2, "s", "replica", 4096, {}, (), 4), "version"),
        (Welcome(1, "s", "replica", 4096, {}, ("compress",), 4), "features"),
    ],
)
def test_client_refuses_a_welcome_that_does_not_fit(welcome: Welcome, match: str) -> None:
    conn = client_in("hello")
    with pytest.raises(RemoteProtocolError, match=match):
        conn.receive(prefix(welcome), welcome)
    assert conn.state is ConnState.CLOSED


@pytest.mark.parametrize(
    "kwargs", [{"max_bytes": 0}, {"max_bytes": MAX_DATA_LEN + 1}, {"max_inflight": 0}]
)
def test_bad_construction(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        Connection("client", **kwargs)
    with pytest.raises(ConfigError):
        Connection("peer")  # type: ignore[arg-type]


# -- in flight -------------------------------------------------------------------------


def test_duplicate_tid_sub_is_answered_eexist_and_the_original_survives() -> None:
    conn = server_in("ready")
    assert conn.outstanding == 3
    dup = conn.receive(prefix(read(2)), read(2))
    assert (
        isinstance(dup, BadRequest) and dup.errno == Errno.EEXIST and (dup.tid, dup.sub) == (2, 0)
    )
    assert dup.msg_type == MsgType.READ
    assert conn.outstanding == 4
    conn.send(Reply(2, 0, Errno.EEXIST, dup.message))  # the duplicate's answer ...
    assert conn.outstanding == 3
    conn.send(Reply(2, 0, 0), data_len=4096)  # ... does not retire the original
    assert conn.outstanding == 2
    with pytest.raises(LocalProtocolError, match="no such request"):
        conn.send(Reply(2, 0, 0), data_len=4096)


def test_client_may_not_reuse_a_tid_sub_in_flight() -> None:
    conn = client_in("ready")
    with pytest.raises(LocalProtocolError) as info:
        conn.send(read(2))
    assert info.value.errno == Errno.EEXIST
    conn.send(read(2, sub=1))  # another sub of the same transaction is fine


def test_client_respects_the_servers_max_inflight() -> None:
    conn = client_in("ready")  # 3 of WELCOME's 5 are in flight
    conn.send(read(20))
    conn.send(read(21))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        conn.send(read(22))
    conn.receive(prefix(Reply(20, 0, 5, "x")), Reply(20, 0, 5, "x"))
    conn.send(read(22))
    assert conn.outstanding == 5


def test_server_closes_on_a_client_over_max_inflight() -> None:
    conn = server_in("ready")
    conn.receive(prefix(read(20)), read(20))
    conn.receive(prefix(read(21)), read(21))
    with pytest.raises(RemoteProtocolError, match="max_inflight"):
        conn.receive(prefix(read(22)), read(22))
    assert conn.state is ConnState.CLOSED


def test_read_data_must_match_length() -> None:
    server = server_in("ready")
    with pytest.raises(LocalProtocolError, match="data bytes"):
        server.send(Reply(2, 0, 0), data_len=100)
    server.send(Reply(2, 0, 0), data_len=4096)
    client = client_in("ready")
    with pytest.raises(RemoteProtocolError, match="data bytes"):
        client.receive(prefix(Reply(2, 0, 0), 100), Reply(2, 0, 0))
    client = client_in("ready")
    assert client.receive(prefix(Reply(2, 0, 0), 4096), Reply(2, 0, 0)) == Reply(2, 0, 0)


def test_write_success_carries_no_data() -> None:
    client = client_in("ready")
    client.send(WriteRequest(30, 0, 1, 0, 512, 3, ((512, 0, 1),)))
    with pytest.raises(RemoteProtocolError, match="data bytes"):
        client.receive(prefix(Reply(30, 0, 0), 512), Reply(30, 0, 0))


@pytest.mark.parametrize(
    ("answer", "match"),
    [(Reply(1, 0, 0), "must be an error"), (Attached(2, 7, MIB, 3, {}), "not Attach")],
)
def test_answers_of_the_wrong_kind(answer: Message, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        server_in("ready").send(answer)
    client = client_in("ready")
    with pytest.raises(RemoteProtocolError, match=match):
        client.receive(prefix(answer), answer)


def test_a_bad_request_is_tracked_until_answered_with_an_error() -> None:
    conn, bad = server_in("ready"), SAMPLES["bad"]
    assert isinstance(bad, BadRequest)
    assert conn.receive(prefix(bad), bad) == bad and conn.outstanding == 4
    with pytest.raises(LocalProtocolError, match="must be an error"):
        conn.send(Reply(bad.tid, bad.sub, 0))
    conn.send(Reply(bad.tid, bad.sub, bad.errno, bad.message))
    assert conn.outstanding == 3


def test_server_answers_e2big_and_misfit_pages() -> None:
    conn = server_in("ready")
    big = read(40, length=2 * MIB)
    got = conn.receive(prefix(big), big)
    assert isinstance(got, BadRequest) and got.errno == Errno.E2BIG and "max_bytes" in got.message
    misfit = read(41, length=8192, pages=((8192, 0, 1),))  # a run past the client's 4 KiB page
    got = conn.receive(prefix(misfit), misfit)
    assert isinstance(got, BadRequest) and got.errno == Errno.EINVAL and "pages" in got.message
    assert conn.outstanding == 5  # both still owe a reply
    conn.send(Reply(40, 0, Errno.E2BIG, "too big"))
    conn.send(Reply(41, 0, Errno.EINVAL, "pages"))


# -- administration -----------------------------------------------------------------------

SUM = ChecksumRequest(40, 1, 1, 0, 8704, 4096)  # 3 checksums, the last of a 512-byte tail


def test_checksum_reply_carries_4_bytes_per_extent() -> None:
    assert checksum_data_len(SUM) == 12
    server = server_in("ready")
    server.receive(prefix(SUM), SUM)
    for wrong in (0, 8, 8704, 16):
        with pytest.raises(LocalProtocolError, match="not 12"):
            server.send(Reply(40, 1, 0), data_len=wrong)
    server.send(Reply(40, 1, 0), data_len=12)
    client = client_in("ready")
    client.send(SUM)
    with pytest.raises(RemoteProtocolError, match="not 12"):
        client.receive(prefix(Reply(40, 1, 0), 8704), Reply(40, 1, 0))
    client = client_in("ready")
    client.send(SUM)
    assert client.receive(prefix(Reply(40, 1, 0), 12), Reply(40, 1, 0)) == Reply(40, 1, 0)
    assert client.outstanding == 3


def test_checksum_error_reply_carries_no_data() -> None:
    server = server_in("ready")
    server.receive(prefix(SUM), SUM)
    with pytest.raises(LocalProtocolError, match="not 0"):
        server.send(Reply(40, 1, Errno.EIO, "disk"), data_len=12)
    server.send(Reply(40, 1, Errno.EIO, "disk"), data_len=0)


def test_checksums_are_requests_not_reads() -> None:
    """Tracked by (tid, sub) and counted against max_inflight, but not capped by
    max_bytes: a checksum moves 4 bytes per extent, not the range."""
    big = ChecksumRequest(50, 0, 1, 0, 64 * MIB, 4096)  # over max_bytes, 16384 checksums
    client, server = client_in("ready"), server_in("ready")
    client.send(big)
    assert server.receive(prefix(big), big) == big
    client.send(ChecksumRequest(50, 1, 1, 0, 4096, 4096))
    with pytest.raises(LocalProtocolError, match="outstanding"):
        client.send(ChecksumRequest(50, 2, 1, 0, 4096, 4096))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client_in("ready").send(ChecksumRequest(2, 0, 1, 0, 4096, 4096))  # read(2)'s key
    server.receive(prefix(read(51)), read(51))
    with pytest.raises(RemoteProtocolError, match="max_inflight"):
        server.receive(prefix(big), ChecksumRequest(52, 0, 1, 0, 4096, 4096))


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (Reply(3, 0, 0), "must be an error"),  # a success Reply to the StatusRequest
        (Attached(3, 7, MIB, 3, {}), "not Attach"),  # Attached to the StatusRequest
        (StatusReply(1, {}), "not StatusRequest"),  # StatusReply to the Attach
        (StatusReply(2, {}), "not StatusRequest"),  # ... to the read, sub 0
        (StatusReply(9, {}), "no such request"),
    ],
)
def test_status_is_answered_by_status_reply_only(answer: Message, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        server_in("ready").send(answer)
    with pytest.raises(RemoteProtocolError, match=match):
        client_in("ready").receive(prefix(answer), answer)


def test_status_answers() -> None:
    server = server_in("ready")
    with pytest.raises(LocalProtocolError, match="data bytes"):
        server.send(StatusReply(3, {}), data_len=1)
    server.send(StatusReply(3, {"role": "secondary"}), data_len=0)
    client = client_in("ready")  # a server that predates status answers EOPNOTSUPP
    answer = Reply(3, 0, Errno.EOPNOTSUPP, "unknown message type 0x50")
    assert client.receive(prefix(answer), answer) == answer and client.outstanding == 2


def test_promote_is_answered_by_a_reply() -> None:
    promote = PromoteRequest(60, "vol0", True)
    for answer, data_len in ((Reply(60, 0, 0), 0), (Reply(60, 0, Errno.EBUSY, "peer"), 0)):
        server, client = server_in("ready"), client_in("ready")
        client.send(promote)
        assert server.receive(prefix(promote), promote) == promote
        server.send(answer, data_len=data_len)
        assert client.receive(prefix(answer), answer) == answer
        assert server.outstanding == client.outstanding == 3
    for wrong in (StatusReply(60, {}), Attached(60, 1, MIB, 1, {})):
        client = client_in("ready")
        client.send(promote)
        with pytest.raises(RemoteProtocolError, match="answers PromoteRequest"):
            client.receive(prefix(wrong), wrong)
    client = client_in("ready")
    client.send(promote)
    with pytest.raises(RemoteProtocolError, match="data bytes"):
        client.receive(prefix(Reply(60, 0, 0), 4), Reply(60, 0, 0))


def test_received_comes_once_for_a_write_asking_it_before_its_reply() -> None:
    pages = ((4096, 0, 1),)
    asking = WriteRequest(40, 0, 1, 0, 4096, 3, pages, flags=FrameFlags.RECV_ACK)
    plain = WriteRequest(41, 0, 1, 0, 4096, 3, pages)
    server, client = server_in("ready"), client_in("ready")
    for msg in (asking, plain):
        client.send(msg)
        assert server.receive(prefix(msg, 4096), msg) == msg
    outstanding = (client.outstanding, server.outstanding)
    with pytest.raises(LocalProtocolError, match="no write asking RECV_ACK"):
        server.send(Received(41, 0))
    server.send(Received(40, 0))
    with pytest.raises(LocalProtocolError, match="twice"):
        server.send(Received(40, 0))
    assert client.receive(prefix(Received(40, 0)), Received(40, 0)) == Received(40, 0)
    assert (client.outstanding, server.outstanding) == outstanding  # still in flight
    with pytest.raises(RemoteProtocolError, match="twice"):
        client_copy = client_in("ready")
        client_copy.send(asking)
        client_copy.receive(prefix(Received(40, 0)), Received(40, 0))
        client_copy.receive(prefix(Received(40, 0)), Received(40, 0))
    server.send(Reply(40, 0, 0), data_len=0)
    assert client.receive(prefix(Reply(40, 0, 0)), Reply(40, 0, 0)) == Reply(40, 0, 0)
    with pytest.raises(RemoteProtocolError, match="no write asking"):
        client.receive(prefix(Received(40, 0)), Received(40, 0))  # after its Reply
    with pytest.raises(RemoteProtocolError, match="no write asking"):
        client_in("ready").receive(prefix(Received(41, 0)), Received(41, 0))


def test_sync_is_answered_by_status_reply_or_an_error() -> None:
    sync = SyncRequest(70, "vol0", "query", {})
    for answer in (StatusReply(70, {"dirty": ()}), Reply(70, 0, Errno.EPERM, "no")):
        server, client = server_in("ready"), client_in("ready")
        client.send(sync)
        assert server.receive(prefix(sync), sync) == sync
        server.send(answer, data_len=0)
        assert client.receive(prefix(answer), answer) == answer
    client = client_in("ready")
    client.send(sync)
    with pytest.raises(RemoteProtocolError, match="must be an error"):
        client.receive(prefix(Reply(70, 0, 0)), Reply(70, 0, 0))


@pytest.mark.parametrize(
    "msg", [StatusRequest(2), PromoteRequest(2, "v", False), Attach(2, "v")], ids=repr
)
def test_tid_only_messages_share_sub_0_with_requests(msg: Message) -> None:
    """read(2) is in flight as (2, 0): a StatusRequest(2) would be its twin."""
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client_in("ready").send(msg)
    got = server_in("ready").receive(prefix(msg), msg)
    assert isinstance(got, BadRequest) and got.errno == Errno.EEXIST
    assert (got.tid, got.sub) == (2, 0) and got.msg_type == MSG_TYPE_OF[type(msg)]


def test_client_checks_its_own_requests() -> None:
    conn = client_in("ready")
    with pytest.raises(LocalProtocolError, match="max_bytes") as info:
        conn.send(read(40, length=2 * MIB))
    assert info.value.errno == Errno.E2BIG
    with pytest.raises(LocalProtocolError, match="page size"):
        conn.send(read(41, length=8192, pages=((8192, 0, 1),)))


# -- a client and a server through the real codec ----------------------------------------


class Pair(RuleBasedStateMachine):
    """Requests pipelined from a client to a server and answered in any order;
    the two in-flight tables must agree after every step."""

    @initialize()
    def handshake(self) -> None:
        self.client, self.server = Connection("client"), Connection("server")
        self.pending: dict[tuple[int, int], Message] = {}  # server side: still to answer
        self.exchange(self.client, self.server, HELLO)
        self.exchange(self.server, self.client, WELCOME)

    def exchange(
        self, sender: Connection, receiver: Connection, msg: Message, data: bytes = b""
    ) -> Message:
        sender.send(msg, data_len=len(data)) if sender.our_role == "server" else sender.send(msg)
        decoder = FrameDecoder()
        decoder.receive_data(encode_frame(msg, [data] if data else []) + data)
        frame = decoder.next_frame()
        assert frame is not None
        return receiver.receive(frame.prefix, frame.message)

    @precondition(lambda self: self.client.outstanding < WELCOME.max_inflight)
    @rule(
        tid=st.integers(0, 3),
        sub=st.integers(0, 2),
        kind=st.sampled_from(["read", "write", "attach", "status", "promote", "checksum"]),
    )
    def request(self, tid: int, sub: int, kind: str) -> None:
        msg: Message
        if kind == "attach":
            msg, sub = Attach(tid, "vol"), 0
        elif kind == "status":
            msg, sub = StatusRequest(tid), 0
        elif kind == "promote":
            msg, sub = PromoteRequest(tid, "vol", bool(tid % 2)), 0
        elif kind == "read":
            msg = read(tid, sub, 512, ((512, 0, 1),))
        elif kind == "checksum":
            msg = ChecksumRequest(tid, sub, 1, 0, 512 + 4096 * tid, 4096)
        else:
            msg = WriteRequest(tid, sub, 1, 0, 512, 1, ((512, 0, 1),))
        if (tid, sub) in self.pending:
            with pytest.raises(LocalProtocolError):
                self.client.send(msg)
            return
        data = b"w" * 512 if kind == "write" else b""
        got = self.exchange(self.client, self.server, msg, data)
        assert got == msg
        self.pending[(tid, sub)] = msg

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), fail=st.booleans())
    def answer(self, data: st.DataObject, fail: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.pending)))
        msg = self.pending.pop(key)
        answer: Message
        payload = b""
        if fail or (isinstance(msg, Attach) and data.draw(st.booleans())):
            answer = Reply(*key, Errno.EIO, "failed")
        elif isinstance(msg, Attach):
            answer = Attached(key[0], 1, MIB, 1, {})
        elif isinstance(msg, StatusRequest):
            answer = StatusReply(key[0], {"role": "primary", "volumes": [{"name": "vol"}]})
        else:
            answer = Reply(*key, 0)
            if isinstance(msg, ReadRequest):
                payload = b"r" * 512
            elif isinstance(msg, ChecksumRequest):
                payload = b"c" * checksum_data_len(msg)
        assert self.exchange(self.server, self.client, answer, payload) == answer

    @rule(token=st.integers(0, 2**64 - 1))
    def ping(self, token: int) -> None:
        assert self.exchange(self.client, self.server, Ping(token)) == Ping(token)
        assert self.exchange(self.server, self.client, Pong(token)) == Pong(token)

    @invariant()
    def tables_agree(self) -> None:
        assert self.client.outstanding == self.server.outstanding == len(self.pending)
        assert self.client.state is self.server.state is ConnState.READY


Pair.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_pair = Pair.TestCase


def test_only_protocol_errors_escape() -> None:
    # receive() on a message object the codec never produces is still a ProtocolError.
    conn = server_in("ready")
    with pytest.raises(ProtocolError):
        conn.receive(prefix(Goodbye(0)), Welcome(1, "s", "replica", 4096, {}, (), 1))


def test_a_client_keeps_waiting_after_the_eexist_answer_to_a_network_duplicate() -> None:
    """A correct client sends each (tid, sub) once, so an EEXIST answer can only be the
    server's answer to a copy the network made: the request stays in flight, and the
    original's own answer completes it."""
    client = client_in("ready")
    dup = Reply(2, 0, Errno.EEXIST, "(tid, sub) (2, 0) already in flight")
    assert client.receive(prefix(dup), dup) == dup
    assert client.outstanding == len(IN_FLIGHT) and client.duplicates_answered == 1
    done = Reply(2, 0, 0)
    assert client.receive(prefix(done, 4096), done) == done
    assert client.outstanding == len(IN_FLIGHT) - 1
    with pytest.raises(RemoteProtocolError, match="no such request"):
        client.receive(prefix(done, 4096), done)
