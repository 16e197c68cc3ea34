"""The NBD handshake core (dst.nbd.handshake), without sockets.

Every scenario is fed whole and one byte at a time and must produce the same events and the
same bytes.  The abuse cases of TESTING.md ("Bad input") each have a test: export names of
4096 and 4097 bytes, a name length of 0xffffffff, an option announcing 4 GiB, unknown options
with payloads, an option flood, transmission requests before the handshake ends, plaintext
injected behind STARTTLS, and state carried across STARTTLS (CVE-2021-3716).  Hypothesis then
throws arbitrary bytes and arbitrary option sequences at the machine: it progresses or raises
RemoteProtocolError, nothing else, and never buffers more than one option plus one receive.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dst.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from dst.nbd import protocol as p
from dst.nbd.handshake import (
    NEED_DATA,
    Aborted,
    Event,
    OptionAnswered,
    PeerClosed,
    Phase,
    Ready,
    ServerHandshake,
    StartTls,
)
from dst.nbd.protocol import ExportInfo, Info, Option, Reply, TransmissionFlags, check_exports

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MiB = 1 << 20
FLAGS = int(TransmissionFlags.SEND_FLUSH | TransmissionFlags.SEND_FUA)
VOL0 = ExportInfo("vol0", 64 * MiB, FLAGS, 512, 4096, 32 * MiB, "the first volume")
VOL1 = ExportInfo("vol1", 2 * MiB, FLAGS, 4096, 4096, 32 * MiB)
LONG = ExportInfo("n" * 4096, MiB, FLAGS, 512, 4096, 32 * MiB)
EXPORTS = (VOL0, VOL1, LONG)
GREETING_LEN = p.GREETING.size
#: What one receive may add to the buffer in these tests (the adapter's RECV_BYTES).
RECV = 64 * 1024


def opt(option: int, data: bytes = b"", length: int | None = None) -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data) if length is None else length) + data


def info_data(name: bytes, infos: tuple[int, ...] = (), name_len: int | None = None) -> bytes:
    head = struct.pack(">I", len(name) if name_len is None else name_len)
    return (
        head + name + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
    )


def flags(value: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", value)


@dataclass
class Run:
    events: list[Event] = field(default_factory=list)
    out: bytes = b""
    error: RemoteProtocolError | None = None


def drive(hs: ServerHandshake, data: bytes, chunk: int = 0, *, eof: bool = False) -> Run:
    """Feed ``data`` (in ``chunk``-byte pieces; 0 = whole), collecting events and output until
    the machine wants data it will not get, or stops.  StartTls is completed at once."""
    run = Run()
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    if eof:
        pieces.append(b"")
    pieces.reverse()
    try:
        while hs.phase in (Phase.CLIENT_FLAGS, Phase.OPTIONS):
            event = hs.next_event()
            run.out += hs.data_to_send()
            if event is NEED_DATA:
                if not pieces:
                    break
                hs.receive_data(pieces.pop())
                continue
            run.events.append(event)
            if isinstance(event, StartTls):
                hs.tls_established()
    except RemoteProtocolError as exc:
        run.error = exc
        run.out += hs.data_to_send()
    return run


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies: (option, reply type, payload)."""
    found = []
    while out:
        magic, option, reply, length = p.OPTION_REPLY_HEADER.unpack_from(out)
        assert magic == p.OPTION_REPLY_MAGIC
        end = p.OPTION_REPLY_HEADER.size + length
        found.append((option, reply, out[p.OPTION_REPLY_HEADER.size : end]))
        out = out[end:]
    return found


def reply_of(event: Event) -> int:
    assert isinstance(event, OptionAnswered), event
    return event.reply


def both_ways(data: bytes, *, tls: bool = False, eof: bool = False) -> Run:
    """Run ``data`` whole and byte by byte; both must agree exactly."""
    whole = drive(ServerHandshake(EXPORTS, tls_required=tls), data, eof=eof)
    single = drive(ServerHandshake(EXPORTS, tls_required=tls), data, 1, eof=eof)
    assert whole.events == single.events
    assert whole.out == single.out
    assert repr(whole.error) == repr(single.error)
    assert whole.out[:GREETING_LEN] == p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 3)
    whole.out = whole.out[GREETING_LEN:]
    return whole


def test_go_reports_export_block_sizes_and_enters_transmission() -> None:
    run = both_ways(flags() + opt(Option.GO, info_data(b"vol0", (Info.BLOCK_SIZE,))))
    (ready,) = run.events
    assert isinstance(ready, Ready) and ready.export == VOL0
    assert not ready.structured_replies
    assert ready.flags == FLAGS | TransmissionFlags.HAS_FLAGS
    got = replies(run.out)
    assert [(o, r) for o, r, _ in got] == [(Option.GO, Reply.INFO)] * 2 + [(Option.GO, Reply.ACK)]
    assert got[0][2] == struct.pack(">HQH", Info.EXPORT, 64 * MiB, ready.flags)
    assert got[1][2] == struct.pack(">HIII", Info.BLOCK_SIZE, 512, 4096, 32 * MiB)


def test_empty_name_is_the_first_export_and_info_does_not_end_haggling() -> None:
    data = flags() + opt(Option.INFO, info_data(b"", (Info.NAME, Info.DESCRIPTION)))
    run = both_ways(data + opt(Option.GO, info_data(b"vol1")))
    assert isinstance(run.events[0], OptionAnswered) and run.events[0].reply == Reply.ACK
    assert isinstance(run.events[1], Ready) and run.events[1].export == VOL1
    info_payloads = [payload for o, r, payload in replies(run.out) if o == Option.INFO]
    assert struct.pack(">H", Info.NAME) + b"vol0" in info_payloads
    assert struct.pack(">H", Info.DESCRIPTION) + b"the first volume" in info_payloads


def test_structured_replies_flag_and_send_df() -> None:
    run = both_ways(flags() + opt(Option.STRUCTURED_REPLY) + opt(Option.GO, info_data(b"vol0")))
    ready = run.events[-1]
    assert isinstance(ready, Ready) and ready.structured_replies
    assert ready.flags & TransmissionFlags.SEND_DF
    bad = both_ways(flags() + opt(Option.STRUCTURED_REPLY, b"x"))
    assert [reply_of(e) for e in bad.events] == [Reply.ERR_INVALID]


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_answers_size_flags_and_honours_no_zeroes(no_zeroes: bool) -> None:
    cflags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)
    run = both_ways(flags(cflags) + opt(Option.EXPORT_NAME, b"vol1") + b"\x25\x60")
    assert isinstance(run.events[0], Ready)
    expected = struct.pack(">QH", 2 * MiB, FLAGS | TransmissionFlags.HAS_FLAGS)
    assert run.out == expected + (b"" if no_zeroes else bytes(124))


def test_bytes_pipelined_after_go_are_handed_over() -> None:
    hs = ServerHandshake(EXPORTS, tls_required=False)
    request = p.REQUEST.pack(p.REQUEST_MAGIC, 0, 0, 7, 0, 512)
    run = drive(hs, flags() + opt(Option.GO, info_data(b"vol0")) + request)
    assert isinstance(run.events[-1], Ready)
    assert hs.trailing_data == request
    with pytest.raises(LocalProtocolError):
        hs.next_event()


def test_export_names_of_4096_bytes_are_allowed_and_4097_refused() -> None:
    run = both_ways(flags() + opt(Option.INFO, info_data(b"n" * 4096)) + opt(Option.LIST))
    assert replies(run.out)[-2][1] == Reply.SERVER  # still haggling after the INFO
    assert isinstance(run.events[0], OptionAnswered) and run.events[0].reply == Reply.ACK
    run = both_ways(flags() + opt(Option.GO, info_data(b"n" * 4097)) + opt(Option.LIST))
    assert isinstance(run.events[0], OptionAnswered)
    assert run.events[0].reply == Reply.ERR_INVALID
    assert replies(run.out)[-1][1] == Reply.ACK  # the LIST after it is answered
    assert both_ways(flags() + opt(Option.EXPORT_NAME, b"n" * 4096)).events[0] == Ready(
        LONG, False, FLAGS | TransmissionFlags.HAS_FLAGS
    )
    assert "4097 bytes" in str(both_ways(flags() + opt(Option.EXPORT_NAME, b"n" * 4097)).error)


@pytest.mark.parametrize(
    "data",
    [
        info_data(b"vol0", name_len=0xFFFFFFFF),  # the length field lies
        info_data(b"vol0", name_len=5),  # one byte too long
        b"\0\0\0",  # shorter than the fixed part
        info_data(b"vol0", (Info.NAME,))[:-1],  # request count overruns
        info_data(b"vol0", (Info.NAME,)) + b"\0",  # trailing garbage
    ],
)
def test_malformed_info_is_invalid_and_haggling_continues(data: bytes) -> None:
    run = both_ways(flags() + opt(Option.INFO, data) + opt(Option.GO, info_data(b"vol0")))
    assert isinstance(run.events[0], OptionAnswered)
    assert run.events[0].reply == Reply.ERR_INVALID
    assert isinstance(run.events[1], Ready)


def test_unknown_export_is_err_unknown_for_go_and_fatal_for_export_name() -> None:
    run = both_ways(flags() + opt(Option.GO, info_data(b"nope")))
    assert run.events[0] == OptionAnswered(Option.GO, Reply.ERR_UNKNOWN, "no export named 'nope'")
    assert "no export named 'nope'" in str(
        both_ways(flags() + opt(Option.EXPORT_NAME, b"nope")).error
    )


def test_option_announcing_4_gib_is_refused_before_its_data_is_read() -> None:
    hs = ServerHandshake(EXPORTS, tls_required=False)
    run = drive(hs, flags() + opt(Option.INFO, length=0xFFFFFFFF))
    assert run.error is not None and "4294967295" in str(run.error)
    assert replies(run.out[GREETING_LEN:])[0][1] == Reply.ERR_TOO_BIG
    assert hs.phase is Phase.CLOSED and hs.buffered == p.OPTION_HEADER.size  # header only
    run = both_ways(flags() + opt(99, b"x" * (p.MAX_OPTION_BYTES + 1)))
    assert run.error is not None and replies(run.out)[0][1] == Reply.ERR_TOO_BIG


def test_unknown_options_have_their_payload_consumed() -> None:
    data = flags() + opt(99, b"payload" * 100) + opt(0xFFFFFFFF, b"\0" * 9) + opt(Option.LIST)
    run = both_ways(data)
    assert [e.reply for e in run.events if isinstance(e, OptionAnswered)] == [
        Reply.ERR_UNSUP,
        Reply.ERR_UNSUP,
        Reply.ACK,
    ]
    assert run.error is None


def test_an_option_flood_is_cut_off_after_max_options() -> None:
    hs = ServerHandshake(EXPORTS, tls_required=False)
    run = drive(hs, flags() + opt(99) * 100_000)
    assert len(run.events) == p.MAX_OPTIONS
    assert run.error is not None and "MAX_OPTIONS" in str(run.error)
    # The rest of the flood was never parsed: the machine stopped at the first excess header.
    assert hs.options_seen == p.MAX_OPTIONS


def test_transmission_request_before_the_handshake_ends_is_fatal() -> None:
    request = p.REQUEST.pack(p.REQUEST_MAGIC, 0, 1, 1, 0, 512) + b"\0" * 512
    run = both_ways(flags() + opt(Option.LIST) + request)
    assert run.error is not None and "IHAVEOPT" in str(run.error)
    assert both_ways(request).error is not None  # even in place of the client flags


@pytest.mark.parametrize("cflags", [0x4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_are_fatal(cflags: int) -> None:
    assert "unknown client flags" in str(both_ways(flags(cflags)).error)


def test_abort_list_and_eof() -> None:
    run = both_ways(flags() + opt(Option.LIST) + opt(Option.ABORT, b"ignored"))
    assert isinstance(run.events[-1], Aborted)
    servers = [payload for _, r, payload in replies(run.out) if r == Reply.SERVER]
    assert servers[0] == struct.pack(">I", 4) + b"vol0the first volume"
    assert len(servers) == len(EXPORTS)
    invalid = both_ways(flags() + opt(Option.LIST, b"x"))
    assert reply_of(invalid.events[0]) == Reply.ERR_INVALID
    assert both_ways(flags() + opt(Option.LIST), eof=True).events[-1] == PeerClosed()
    assert both_ways(b"", eof=True).events == [PeerClosed()]
    assert "in the middle" in str(both_ways(flags() + opt(Option.GO)[:10], eof=True).error)


def test_starttls_without_tls_is_policy() -> None:
    run = both_ways(flags() + opt(Option.STARTTLS) + opt(Option.GO, info_data(b"vol0")))
    assert reply_of(run.events[0]) == Reply.ERR_POLICY
    assert isinstance(run.events[1], Ready)


def test_forced_tls_refuses_everything_but_starttls_and_abort() -> None:
    before = [opt(Option.LIST), opt(Option.GO, info_data(b"vol0")), opt(99, b"abc")]
    before.append(opt(Option.STRUCTURED_REPLY))
    run = both_ways(flags() + b"".join(before) + opt(Option.ABORT), tls=True)
    answered = [e.reply for e in run.events if isinstance(e, OptionAnswered)]
    assert answered == [Reply.ERR_TLS_REQD] * 4
    assert isinstance(run.events[-1], Aborted)
    assert "before STARTTLS" in str(
        both_ways(flags() + opt(Option.EXPORT_NAME, b"vol0"), tls=True).error
    )
    assert "fixed newstyle" in str(both_ways(flags(0), tls=True).error)


def test_starttls_then_options_work_and_a_second_starttls_is_invalid() -> None:
    for chunk in (0, 1):
        hs = ServerHandshake(EXPORTS, tls_required=True)
        run = drive(hs, flags() + opt(Option.STARTTLS), chunk)
        assert run.events == [StartTls()] and hs.tls_active  # drive() completed the TLS step
        run = drive(hs, opt(Option.STARTTLS) + opt(Option.GO, info_data(b"")), chunk)
        assert reply_of(run.events[0]) == Reply.ERR_INVALID
        assert isinstance(run.events[1], Ready) and run.events[1].export == VOL0
    hs = ServerHandshake(EXPORTS, tls_required=True)
    drive(hs, flags() + opt(Option.STARTTLS, b"data"))
    assert hs.phase is Phase.OPTIONS and not hs.tls_active  # refused, not started


def test_plaintext_behind_starttls_is_an_injection() -> None:
    hs = ServerHandshake(EXPORTS, tls_required=True)
    hs.receive_data(flags() + opt(Option.STARTTLS) + opt(Option.STRUCTURED_REPLY))
    with pytest.raises(RemoteProtocolError, match="16 plaintext bytes"):
        hs.next_event()
    assert hs.phase is Phase.CLOSED
    assert Reply.ACK not in [r for _, r, _ in replies(hs.data_to_send()[GREETING_LEN:])]


def test_adapter_misuse_during_tls_is_local() -> None:
    hs = ServerHandshake(EXPORTS, tls_required=True)
    hs.receive_data(flags() + opt(Option.STARTTLS))
    while not isinstance(hs.next_event(), StartTls):
        pass
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        hs.next_event()
    hs.tls_established()
    with pytest.raises(LocalProtocolError):
        hs.tls_established()


def test_starttls_drops_everything_negotiated_before_it() -> None:
    """CVE-2021-3716: nbdkit kept structured replies negotiated in plaintext after STARTTLS.
    In FORCEDTLS nothing stateful is accepted before TLS (observable), and the negotiated
    state is replaced whole at tls_established (structural: even a flag set by some future
    option before STARTTLS could not survive it)."""
    hs = ServerHandshake(EXPORTS, tls_required=True)
    run = drive(hs, flags() + opt(Option.STRUCTURED_REPLY) + opt(Option.STARTTLS))
    assert reply_of(run.events[0]) == Reply.ERR_TLS_REQD
    run = drive(hs, opt(Option.GO, info_data(b"vol0")))
    ready = run.events[-1]
    assert isinstance(ready, Ready) and not ready.structured_replies
    assert not ready.flags & TransmissionFlags.SEND_DF

    hs = ServerHandshake(EXPORTS, tls_required=True)
    drive(hs, flags())
    hs._negotiated.structured_replies = True  # as if an option had set it in plaintext
    drive(hs, opt(Option.STARTTLS))
    assert hs.tls_active and not hs.structured_replies
    run = drive(hs, opt(Option.STRUCTURED_REPLY) + opt(Option.GO, info_data(b"vol0")))
    assert isinstance(run.events[-1], Ready) and run.events[-1].structured_replies


def test_check_exports_rejects_impossible_exports() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        check_exports([])
    with pytest.raises(ConfigError, match="twice"):
        check_exports([VOL0, VOL0])
    with pytest.raises(ConfigError, match="4097 bytes"):
        check_exports([ExportInfo("x" * 4097, MiB, 0, 512, 4096, MiB)])
    with pytest.raises(ConfigError, match="NUL"):
        check_exports([ExportInfo("a\0b", MiB, 0, 512, 4096, MiB)])
    with pytest.raises(ConfigError, match="minimum_block"):
        check_exports([ExportInfo("a", MiB, 0, 1 << 17, 1 << 17, MiB)])
    with pytest.raises(ConfigError, match="preferred"):
        check_exports([ExportInfo("a", MiB, 0, 512, 256, MiB)])
    with pytest.raises(ConfigError, match="size"):
        check_exports([ExportInfo("a", 1000, 0, 512, 4096, MiB)])


# --- hypothesis --------------------------------------------------------------------------------


def fuzz(data: bytes, chunks: list[int], tls: bool) -> None:
    """Feed ``data`` in the given chunk sizes; only progress or RemoteProtocolError, and the
    buffer stays within one option plus one receive."""
    hs = ServerHandshake(EXPORTS, tls_required=tls)
    bound = p.OPTION_HEADER.size + p.MAX_OPTION_BYTES + RECV
    position = 0
    try:
        while hs.phase in (Phase.CLIENT_FLAGS, Phase.OPTIONS):
            event = hs.next_event()
            hs.data_to_send()
            assert hs.buffered <= bound
            if event is NEED_DATA:
                if position >= len(data):
                    hs.receive_data(b"")
                    continue
                size = chunks[position % len(chunks)] if chunks else RECV
                hs.receive_data(data[position : position + min(size, RECV)])
                position += min(size, RECV)
            elif isinstance(event, StartTls):
                hs.tls_established()
    except RemoteProtocolError:
        assert hs.phase is Phase.CLOSED


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(1, 64), max_size=8), st.booleans())
def test_fuzz_raw_bytes_after_valid_flags(data: bytes, chunks: list[int], tls: bool) -> None:
    fuzz(flags() + data, chunks, tls)
    fuzz(data, chunks, tls)


OPTION_IDS = st.sampled_from([*map(int, Option), 0, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF])
NAMES = st.sampled_from([b"", b"vol0", b"vol1", b"nope", b"n" * 4096, b"n" * 4097])


@st.composite
def options(draw: st.DrawFn) -> bytes:
    option = draw(OPTION_IDS)
    if option in (Option.INFO, Option.GO) and draw(st.booleans()):
        infos = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        lie = draw(st.sampled_from([None, None, 0, 0xFFFFFFFF, draw(st.integers(0, 5000))]))
        data = info_data(draw(NAMES), infos, lie)
    elif option == Option.EXPORT_NAME:
        data = draw(NAMES)
    else:
        data = draw(st.binary(max_size=64))
    length = draw(st.sampled_from([None, None, None, 0, 0xFFFFFFFF, p.MAX_OPTION_BYTES + 1]))
    return opt(option, data, length)


@FUZZ
@given(st.lists(options(), max_size=12), st.lists(st.integers(1, 97), max_size=4), st.booleans())
def test_fuzz_option_sequences(sequence: list[bytes], chunks: list[int], tls: bool) -> None:
    fuzz(flags() + b"".join(sequence), chunks, tls)
    # And every option that was answered got exactly one final reply.
    hs = ServerHandshake(EXPORTS, tls_required=tls)
    run = drive(hs, flags() + b"".join(sequence))
    out = run.out[GREETING_LEN:]
    go_ack = p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, Option.GO, Reply.ACK, 0)
    if run.events and isinstance(run.events[-1], Ready) and not out.endswith(go_ack):
        out = out[: -p.EXPORT_NAME_REPLY.size]  # EXPORT_NAME's answer is no option reply
    finals = [r for r in replies(out) if r[1] not in (Reply.SERVER, Reply.INFO)]
    answered = [e for e in run.events if isinstance(e, OptionAnswered | Aborted | StartTls)]
    go_done = any(isinstance(e, Ready) for e in run.events) and hs.phase is Phase.TRANSMISSION
    assert len(finals) >= len(answered)
    assert len(finals) <= len(answered) + 1 + int(go_done)  # + a TOO_BIG, + GO's ACK
