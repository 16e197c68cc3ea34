"""Bad input, answered as ``nbdkit memory`` answers it (TESTING.md, "Bad input").

The bad-request table: one nbdsh script, in libnbd's non-strict mode (so libnbd sends what
it is told) plus a raw socket for what libnbd cannot send at all (unknown command types, a
FLUSH with an offset, DF without structured replies), runs against ``nbdkit memory 1M``,
against nbdkit with the bridge's block-size constraints (``blocksize-policy`` 512/4096/32M),
and against the bridge over a 1 MiB MemoryStore.  For every case: the same errno, and the
connection still usable afterwards.  Two rows differ from plain nbdkit on purpose and say why
(DELIBERATE); the table is printed.

The handshake abuse cases use raw Trio sockets against serve_nbd — and, where the bridge means
to behave as nbdkit does, against nbdkit too — and after each one a well-behaved client
(nbdinfo) must still work against the same bridge.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import pytest
import trio

from dst.block import MemoryStore
from dst.nbd import bridge as nbd_bridge
from dst.nbd import protocol as p
from dst.nbd.bridge import NbdExport
from dst.nbd.protocol import Command, Option, Reply
from tests.integration.nbdtools import run
from tests.integration.test_nbd_bridge import STEP_S, RawClient, Watch, bridge, uri

MiB = 1 << 20
#: nbdkit memory under the bridge's advertised block sizes (a filter, then its parameters).
CONSTRAINED = [
    "blocksize-minimum=512",
    "blocksize-preferred=4096",
    "blocksize-maximum=33554432",
    "blocksize-error-policy=error",
]
#: Rows where the bridge deliberately answers otherwise than plain ``nbdkit memory``.
DELIBERATE = {
    "zero FAST_ZERO": "the bridge cannot know a layer's zeroing is fast, so it does not "
    "advertise SEND_FAST_ZERO and the spec says EINVAL (nbdkit memory advertises it)",
    "read unaligned": "minimum block size 512 (nbdkit memory: 1); nbdkit with the same "
    "constraint answers EINVAL too",
    "write unaligned": "as above",
    "trim unaligned": "as above",
}

SCRIPT = r"""
import json, socket, struct, urllib.parse

h.set_strict_mode(0)
S = h.get_size()
F = nbd

def row(case, fn, usable):
    try:
        fn()
        answer = "ok"
    except nbd.Error as e:
        answer = e.errno or "error"
    except (EOFError, OSError) as e:
        answer = "closed"
    try:
        ok = usable()
    except Exception:
        ok = False
    print(json.dumps({"case": case, "answer": answer, "usable": ok}), flush=True)

def lib(case, fn):
    row(case, fn, lambda: h.pread(512, 0) is not None)

W = b"\x5a" * 512
lib("read past end", lambda: h.pread(512, S))
lib("read straddling end", lambda: h.pread(1024, S - 512))
lib("read at 2^63", lambda: h.pread(512, 1 << 63))
lib("read wrapping 2^64", lambda: h.pread(1024, (1 << 64) - 512))
lib("read 40M", lambda: h.pread(40 << 20, 0))
lib("write past end", lambda: h.pwrite(W, S))
lib("write straddling end", lambda: h.pwrite(W * 2, S - 512))
lib("write wrapping 2^64", lambda: h.pwrite(W * 2, (1 << 64) - 512))
lib("read length 0", lambda: h.pread(0, 0))
lib("read length 0 past end", lambda: h.pread(0, S + 512))
lib("write length 0", lambda: h.pwrite(b"", 0))
lib("trim length 0", lambda: h.trim(0, 0))
lib("zero length 0", lambda: h.zero(0, 0))
lib("cache length 0", lambda: h.cache(0, 0))
lib("trim past end", lambda: h.trim(512, S))
lib("trim straddling end", lambda: h.trim(1024, S - 512))
lib("zero past end", lambda: h.zero(512, S))
lib("zero straddling end", lambda: h.zero(1024, S - 512))
lib("cache past end", lambda: h.cache(512, S))
lib("cache straddling end", lambda: h.cache(1024, S - 512))
lib("read flag 0x100", lambda: h.pread(512, 0, 0x100))
lib("write flag 0x100", lambda: h.pwrite(W, 0, 0x100))
lib("trim flag 0x8000", lambda: h.trim(512, 0, 0x8000))
lib("zero flag 0x100", lambda: h.zero(512, 0, 0x100))
lib("flush flag 0x100", lambda: h.flush(0x100))
lib("cache flag 0x100", lambda: h.cache(512, 0, 0x100))
lib("read NO_HOLE", lambda: h.pread(512, 0, F.CMD_FLAG_NO_HOLE))
lib("write NO_HOLE", lambda: h.pwrite(W, 0, F.CMD_FLAG_NO_HOLE))
lib("trim NO_HOLE", lambda: h.trim(512, 0, F.CMD_FLAG_NO_HOLE))
lib("read REQ_ONE", lambda: h.pread(512, 0, F.CMD_FLAG_REQ_ONE))
lib("write DF", lambda: h.pwrite(W, 0, F.CMD_FLAG_DF))
lib("read DF (structured)", lambda: h.pread(512, 0, F.CMD_FLAG_DF))
lib("read FUA", lambda: h.pread(512, 0, F.CMD_FLAG_FUA))
lib("write FUA", lambda: h.pwrite(W, 0, F.CMD_FLAG_FUA))
lib("trim FUA", lambda: h.trim(512, 0, F.CMD_FLAG_FUA))
lib("zero NO_HOLE|FUA", lambda: h.zero(512, 0, F.CMD_FLAG_NO_HOLE | F.CMD_FLAG_FUA))
lib("flush FUA", lambda: h.flush(F.CMD_FLAG_FUA))
lib("cache FUA", lambda: h.cache(512, 0, F.CMD_FLAG_FUA))
lib("zero FAST_ZERO", lambda: h.zero(512, 0, F.CMD_FLAG_FAST_ZERO))
lib("read unaligned", lambda: h.pread(100, 3))
lib("write unaligned", lambda: h.pwrite(b"x" * 100, 3))
lib("trim unaligned", lambda: h.trim(100, 3))

# What libnbd refuses to send even in non-strict mode: by hand, on a socket of our own.
parsed = urllib.parse.urlparse(URI)
if parsed.scheme == "nbd+unix":
    address = urllib.parse.parse_qs(parsed.query)["socket"][0]
    family = socket.AF_UNIX
else:
    address, family = (parsed.hostname, parsed.port), socket.AF_INET
NAME = parsed.path.lstrip("/").encode()

def recv(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError()
        data += chunk
    return data

def connect(structured):
    s = socket.socket(family)
    s.settimeout(10)
    s.connect(address)
    recv(s, 18)
    s.sendall(struct.pack(">I", 3))
    def option(o, data=b""):
        s.sendall(b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data)
        while True:
            _, _, reply, length = struct.unpack(">QIII", recv(s, 20))
            recv(s, length)
            if reply not in (2, 3):
                return reply
    if structured:
        assert option(8) == 1
    assert option(7, struct.pack(">I", len(NAME)) + NAME + b"\0\0") == 1
    return s

def reply(s):
    magic = struct.unpack(">I", recv(s, 4))[0]
    if magic == 0x67446698:
        error, _ = struct.unpack(">IQ", recv(s, 12))
        return error
    flags, kind, _, length = struct.unpack(">HHQI", recv(s, 16))
    payload = recv(s, length)
    error = struct.unpack(">I", payload[:4])[0] if kind & 0x8000 else 0
    return error if flags & 1 else reply(s)

def raw(case, command, offset=0, length=0, flags=0, payload=b"", structured=False):
    s = connect(structured)
    def send():
        s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, command, 1, offset, length) + payload)
        error = reply(s)
        if error:
            raise nbd.Error("error reply", error)  # .errno gives its name, as for libnbd
    def usable():
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 2, 0, 512))
        ok = reply(s) == 0
        if not structured:
            recv(s, 512)
        return ok
    try:
        row(case, send, usable)
    finally:
        s.close()

for sr in (False, True):
    tag = " (structured)" if sr else ""
    raw("command 9" + tag, 9, 0, 512, structured=sr)
    raw("command 100" + tag, 100, 0, 512, structured=sr)
    raw("command 0xffff, length 0" + tag, 0xFFFF, structured=sr)
    raw("BLOCK_STATUS, no context" + tag, 7, 0, 512, structured=sr)
    raw("RESIZE" + tag, 8, structured=sr)
    raw("FLUSH with an offset" + tag, 3, 512, 0, structured=sr)
    raw("FLUSH with a length" + tag, 3, 0, 512, structured=sr)
raw("read DF, simple replies", 0, 0, 512, flags=4)
raw("write 40M past end", 1, S, 40 << 20, payload=bytes(40 << 20))
raw("write 0x100 with payload", 1, 0, 4096, flags=0x100, payload=bytes(4096))
"""


async def table(argv: list[str]) -> dict[str, tuple[str, bool]]:
    """Run the script; {case: (answer, connection usable afterwards)}."""
    result = await run(argv, debian=True, timeout_s=180)
    rows = [json.loads(line) for line in result.stdout.decode().splitlines() if line]
    return {row["case"]: (row["answer"], row["usable"]) for row in rows}


def nbdkit_argv(script: Path, *params: str) -> list[str]:
    code = f'exec(open("{script}").read())'
    inner = f"""nbdsh -u "$uri" -c "URI = '$uri'" -c '{code}'"""
    filters = ["--filter=blocksize-policy"] if params else []
    return ["nbdkit", "-U", "-", *filters, "memory", "1M", *params, "--run", inner]


async def test_bad_requests_get_nbdkit_memory_answers(tmp_path: Path) -> None:
    script = tmp_path / "table.py"
    script.write_text(SCRIPT)
    plain = await table(nbdkit_argv(script))
    constrained = await table(nbdkit_argv(script, *CONSTRAINED))
    async with bridge(NbdExport("vol0", MemoryStore(MiB))) as address:
        code = f'exec(open("{script}").read())'
        argv = ["nbdsh", "-u", uri(address), "-c", f"URI = {uri(address)!r}", "-c", code]
        ours = await table(argv)

    width = max(map(len, plain))
    lines = [f"{'case':{width}}  {'nbdkit memory':>14}  {'+blocksize':>11}  {'bridge':>9}"]
    for case, (answer, _) in plain.items():
        mark = "  (deliberate)" if case in DELIBERATE else ""
        row = f"{case:{width}}  {answer:>14}  {constrained[case][0]:>11}  {ours[case][0]:>9}"
        lines.append(row + mark)
    print("\n" + "\n".join(lines))

    assert len(plain) == len(ours) == len(constrained) >= 55
    for case, (answer, usable) in plain.items():
        assert usable and constrained[case][1] and ours[case][1], f"{case}: connection broken"
        if case in DELIBERATE:
            assert ours[case][0] == "EINVAL" and answer == "ok", case
        else:
            assert ours[case][0] == answer, f"{case}: bridge {ours[case][0]}, nbdkit {answer}"
        if case != "zero FAST_ZERO":  # nbdkit has no way to withdraw fast zero (see report)
            assert ours[case][0] == constrained[case][0], case
    assert {answer for answer, _ in ours.values()} == {"ok", "EINVAL", "ENOSPC"}


# --- handshake abuse -----------------------------------------------------------------------

Connect = Callable[[], Awaitable[RawClient]]


@asynccontextmanager
async def nbdkit_memory(tmp_path: Path) -> AsyncIterator[Connect]:
    """``nbdkit memory 1M`` on a Unix socket, killed when the block ends."""
    sock = tmp_path / "nbdkit.sock"
    argv = ["nbdkit", "-f", "-U", str(sock), "memory", "1M"]
    async with trio.open_nursery() as nursery:

        async def kill(process: trio.Process) -> None:
            process.kill()  # SIGTERM makes nbdkit wait for its clients

        run_nbdkit = partial(
            trio.run_process, argv, check=False, capture_stderr=True, deliver_cancel=kill
        )
        await nursery.start(run_nbdkit)
        with trio.fail_after(STEP_S):
            while not sock.exists():
                await trio.sleep(0.05)

        async def connect() -> RawClient:
            client = RawClient(await trio.open_unix_socket(str(sock)))
            assert p.GREETING.unpack(await client.recv(18))[:2] == (p.NBDMAGIC, p.IHAVEOPT)
            await client.send(struct.pack(">I", 3))
            return client

        try:
            yield connect
        finally:
            nursery.cancel_scope.cancel()


def go(name: bytes, name_len: int | None = None) -> bytes:
    return struct.pack(">I", len(name) if name_len is None else name_len) + name + b"\0\0"


async def abuse(connect: Connect, well_behaved: Callable[[], Awaitable[object]]) -> dict[str, str]:
    """The handshake cases both servers should answer alike: each option's final reply and
    whether the same connection then still answers a LIST; or that the server hung up.
    After each case ``well_behaved`` (a real client) must still be served."""
    out: dict[str, str] = {}
    for case, option, data in [
        ("GO name 4096", Option.GO, go(b"n" * 4096)),
        ("GO name 4097", Option.GO, go(b"n" * 4097)),
        ("INFO name length 0xffffffff", Option.INFO, go(b"vol0", 0xFFFFFFFF)),
        ("unknown option with payload", 99, b"payload" * 1000),
        ("LIST with data", Option.LIST, b"x"),
    ]:
        client = await connect()
        await client.option(option, data)
        reply = (await client.final_reply())[0]
        out[case] = p.name_of(Reply, reply)
        if reply != Reply.ACK or option != Option.GO:  # else: in transmission now
            await client.option(Option.LIST)
            out[case] += ", then LIST " + p.name_of(Reply, (await client.final_reply())[0])
        await client.aclose()
        await well_behaved()
    for case, raw in [
        ("option announcing 4 GiB", p.OPTION_HEADER.pack(p.IHAVEOPT, Option.INFO, 0xFFFFFFFF)),
        ("EXPORT_NAME of 4097 bytes", p.OPTION_HEADER.pack(p.IHAVEOPT, 1, 4097) + b"n" * 4097),
        ("READ before the handshake ends", p.REQUEST.pack(p.REQUEST_MAGIC, 0, 0, 1, 0, 512)),
    ]:
        client = await connect()
        await client.send(raw)
        replies = await client.until_closed()  # TooSlowError unless it hangs up promptly
        await client.aclose()
        await well_behaved()
        out[case] = "closed"
        if replies:  # the bridge explains a 4 GiB option before hanging up; nbdkit does not
            assert p.OPTION_REPLY_HEADER.unpack_from(replies)[2] == Reply.ERR_TOO_BIG
    return out


async def test_handshake_abuse_like_nbdkit_and_the_bridge_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with nbdkit_memory(tmp_path) as connect_nbdkit:
        theirs = await abuse(connect_nbdkit, trio.lowlevel.checkpoint)
    exports = (NbdExport("vol0", MemoryStore(MiB)), NbdExport("n" * 4096, MemoryStore(MiB)))
    async with bridge(*exports) as address:
        nbdinfo = partial(run, ["nbdinfo", "--json", uri(address)])
        ours = await abuse(partial(RawClient.connect, address), nbdinfo)
        info = json.loads((await nbdinfo()).stdout)
        assert info["exports"][0]["export-size"] == MiB
    print("\n" + "\n".join(f"{c:32} nbdkit={theirs[c]}  bridge={ours[c]}" for c in ours))
    assert ours == theirs
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("event=refused" in m and "4294967295" in m for m in warnings)
    assert any("event=option_GO" in m and "ERR_INVALID" in m for m in warnings)
    assert all(m.startswith("peer=") for m in warnings)


async def test_option_flood_is_cut_off_while_others_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100,000 options on one connection: the bridge answers MAX_OPTIONS of them (nbdkit
    answers 32), then hangs up; meanwhile and afterwards nbdinfo works."""
    unsup = p.OPTION_HEADER.pack(p.IHAVEOPT, 99, 0)
    async with bridge(NbdExport("vol0", MemoryStore(MiB))) as address:
        # All at once: 1.6 MB of options at a bridge serving nbdinfo at the same time.
        client = await RawClient.connect(address)
        answered = 0

        async def blast() -> None:
            with suppress(trio.BrokenResourceError):  # the bridge hangs up mid-flood
                await client.stream.send_all(unsup * 100_000)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blast)
            await run(["nbdinfo", uri(address)])
            with trio.fail_after(STEP_S), suppress(EOFError, trio.BrokenResourceError):
                while True:
                    assert (await client.reply())[1] == Reply.ERR_UNSUP
                    answered += 1
        # A reset may drop replies still in our receive queue, so count exactly below.
        assert 0 < answered <= p.MAX_OPTIONS

        # In batches, reading each batch's replies: exactly MAX_OPTIONS answers, then EOF.
        client, answered = await RawClient.connect(address), 0
        with suppress(EOFError, trio.BrokenResourceError):
            for _ in range(100_000 // 16):
                await client.send(unsup * 16)
                for _ in range(16):
                    assert (await client.reply())[1] == Reply.ERR_UNSUP
                    answered += 1
        assert answered == p.MAX_OPTIONS
        await run(["nbdinfo", uri(address)])
    refusals = [r for r in caplog.records if "MAX_OPTIONS" in r.getMessage()]
    assert len(refusals) == 2 and all(r.levelname == "WARNING" for r in refusals)


async def test_requests_before_the_handshake_ends_are_never_executed() -> None:
    watch = Watch(MemoryStore(MiB))
    async with bridge(NbdExport("vol0", watch)) as address:
        for command in (Command.WRITE, Command.READ, Command.FLUSH):
            client = await RawClient.connect(address)
            await client.option(Option.LIST)
            await client.final_reply()
            payload = b"\xee" * 512 if command == Command.WRITE else b""
            await client.request(command, 0, len(payload) or 0)
            await client.send(payload)
            assert await client.until_closed() == b""
            await client.aclose()
        assert watch.seen == 0  # not one bio reached the layer
        await run(["nbdinfo", uri(address)])  # and a well-behaved client is still served
    assert watch.below.contents(0, 512) == bytes(512)  # type: ignore[attr-defined]


async def test_a_stalled_handshake_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbd_bridge, "HANDSHAKE_TIMEOUT_S", 0.5)
    async with bridge(NbdExport("vol0", MemoryStore(MiB))) as address:
        client = await RawClient.connect(address)  # greeting read, flags sent, then silence
        with trio.fail_after(STEP_S):
            assert await client.until_closed() == b""
        await run(["nbdinfo", uri(address)])
