"""Mutual TLS 1.3 between real Trio peers on loopback: who gets in, and what role they prove.

A test server (trio.serve_tcp on 127.0.0.1 port 0) wraps each connection in trio.SSLStream
with server_context, checks the peer's role, answers ``ping`` with ``pong <role>``, and
reports each connection's outcome on a channel, so a test can assert what the server saw and
that it keeps serving after refusing someone.

In TLS 1.3 the client's do_handshake returns before the server has judged the client's
certificate; a refused client learns of it on its first receive. The tests therefore drive
refused clients through handshake, send and receive, and expect BrokenResourceError somewhere.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from dst.errors import ProtocolError
from dst.security.certs import ROLES, init_ca, issue
from dst.security.tls import (
    TlsConfig,
    client_context,
    own_role,
    peer_role,
    require_peer_role,
    server_context,
)

# Loopback handshakes take milliseconds; this only keeps a broken test from hanging.
STEP_TIMEOUT_S = 10


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the server saw on one connection: the peer's role, or where and why it failed."""

    role: str | None = None
    stage: str | None = None  # "handshake" or "role" when refused
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Server:
    port: int
    outcomes: trio.MemoryReceiveChannel[Outcome]

    async def next_outcome(self) -> Outcome:
        with trio.fail_after(STEP_TIMEOUT_S):
            return await self.outcomes.receive()


@dataclass(frozen=True, slots=True)
class Pki:
    """Two independent CAs: ``good`` (the cluster's) and ``foreign``."""

    good: Path
    foreign: Path

    def node(self, name: str, role: str, *, foreign: bool = False) -> TlsConfig:
        return TlsConfig.load(issue(self.foreign if foreign else self.good, name, role))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    good, foreign = tmp_path / "good", tmp_path / "foreign"
    init_ca(good, name="dst-ca")
    init_ca(foreign, name="dst-ca")  # same name on purpose: only the key tells them apart
    return Pki(good, foreign)


async def receive_exactly(stream: trio.abc.ReceiveStream, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = await stream.receive_some(length - len(data))
        if not chunk:
            raise trio.BrokenResourceError(f"EOF after {len(data)} of {length} bytes")
        data += chunk
    return bytes(data)


@asynccontextmanager
async def serving(ctx: ssl.SSLContext, allowed: Collection[str] = ROLES) -> AsyncIterator[Server]:
    send, receive = trio.open_memory_channel[Outcome](100)

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as e:
                send.send_nowait(Outcome(stage="handshake", error=e))
                return
            try:
                role = require_peer_role(stream, allowed)
            except ProtocolError as e:
                send.send_nowait(Outcome(stage="role", error=e))
                return
            request = await receive_exactly(stream, 4)
            assert request == b"ping"
            await stream.send_all(b"pong " + role.encode())
            send.send_nowait(Outcome(role=role))
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with receive:
            yield Server(port, receive)
        nursery.cancel_scope.cancel()


async def ping(server: Server, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Connect, handshake, ping; return (the server's role, what the server said we are)."""
    with trio.fail_after(STEP_TIMEOUT_S):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=ctx)
        async with stream:
            await stream.do_handshake()
            assert stream.version() == "TLSv1.3"
            server_role = require_peer_role(stream, {"replica"})
            await stream.send_all(b"ping")
            reply = await receive_exactly(stream, len(b"pong ") + 1)
            reply += await stream.receive_some(16)
    assert reply.startswith(b"pong ")
    return server_role, reply[len(b"pong ") :].decode()


async def expect_refused(server: Server, ctx: ssl.SSLContext) -> None:
    """The connection must break by the client's first receive, and carry no data."""
    with trio.fail_after(STEP_TIMEOUT_S):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=ctx)
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await stream.do_handshake()
                await stream.send_all(b"ping")
                await receive_exactly(stream, 1)


def handshake_failure(outcome: Outcome) -> ssl.SSLError:
    assert outcome.stage == "handshake", outcome
    assert isinstance(outcome.error, trio.BrokenResourceError)
    cause = outcome.error.__cause__
    assert isinstance(cause, ssl.SSLError), repr(cause)
    return cause


@pytest.mark.parametrize("role", ROLES)
async def test_mutual_handshake_each_side_sees_the_others_role(pki: Pki, role: str) -> None:
    replica = pki.node("r1", "replica")
    peer = pki.node(f"{role}-1", role)
    assert own_role(peer) == role
    async with serving(server_context(replica)) as server:
        server_role, my_role = await ping(server, client_context(peer))
        assert (server_role, my_role) == ("replica", role)
        assert (await server.next_outcome()).role == role


async def test_peer_role_through_ssl_stream(pki: Pki) -> None:
    replica = pki.node("r1", "replica")
    async with serving(server_context(replica)) as server:
        ctx = client_context(pki.node("b1", "bridge"))
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=ctx)
        async with stream:
            await stream.do_handshake()
            assert peer_role(stream) == "replica"
            await stream.send_all(b"ping")
            assert await receive_exactly(stream, len(b"pong bridge")) == b"pong bridge"
        assert (await server.next_outcome()).role == "bridge"


async def test_replication_link_requires_a_replica(pki: Pki) -> None:
    async with serving(server_context(pki.node("r1", "replica")), {"replica"}) as server:
        await expect_refused(server, client_context(pki.node("c1", "client")))
        outcome = await server.next_outcome()
        assert outcome.stage == "role"
        assert isinstance(outcome.error, ProtocolError)
        assert outcome.error.errno == errno.EPERM
        assert "'client' is not allowed" in str(outcome.error)
        assert await ping(server, client_context(pki.node("r2", "replica"))) == (
            "replica",
            "replica",
        )
        assert (await server.next_outcome()).role == "replica"


async def test_client_from_a_foreign_ca_is_refused_and_server_keeps_serving(pki: Pki) -> None:
    async with serving(server_context(pki.node("r1", "replica"))) as server:
        # A perfectly formed client certificate, role and all, from the wrong CA -- held by
        # a client that trusts our (public) ca.pem, so only the server can refuse it.
        intruder = pki.node("c1", "client", foreign=True)
        intruder.ca_path.write_bytes((pki.good / "ca.pem").read_bytes())
        await expect_refused(server, client_context(intruder))
        assert handshake_failure(await server.next_outcome()).reason == (
            "CERTIFICATE_VERIFY_FAILED"
        )
        assert await ping(server, client_context(pki.node("c2", "client"))) == (
            "replica",
            "client",
        )
        assert (await server.next_outcome()).role == "client"


async def test_client_refuses_a_server_from_a_foreign_ca(pki: Pki) -> None:
    async with serving(server_context(pki.node("r1", "replica", foreign=True))) as server:
        ctx = client_context(pki.node("c1", "client"))
        with trio.fail_after(STEP_TIMEOUT_S):
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=ctx)
            async with stream:
                with pytest.raises(trio.BrokenResourceError) as info:
                    await stream.do_handshake()
        cause = info.value.__cause__
        assert isinstance(cause, ssl.SSLError)
        assert cause.reason == "CERTIFICATE_VERIFY_FAILED"
        handshake_failure(await server.next_outcome())  # it got our alert


async def test_client_without_certificate_is_refused(pki: Pki) -> None:
    cfg = pki.node("c1", "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=cfg.ca_path)  # trusts the server, has nothing to show
    async with serving(server_context(pki.node("r1", "replica"))) as server:
        await expect_refused(server, ctx)
        assert handshake_failure(await server.next_outcome()).reason == (
            "PEER_DID_NOT_RETURN_A_CERTIFICATE"
        )
        assert await ping(server, client_context(cfg)) == ("replica", "client")


async def test_tls12_client_is_refused(pki: Pki) -> None:
    cfg = pki.node("c1", "client")
    ctx = client_context(cfg)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serving(server_context(pki.node("r1", "replica"))) as server:
        with trio.fail_after(STEP_TIMEOUT_S):
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=ctx)
            async with stream:
                with pytest.raises(trio.BrokenResourceError):  # fails in the handshake itself
                    await stream.do_handshake()
        assert handshake_failure(await server.next_outcome()).reason == "UNSUPPORTED_PROTOCOL"
        assert await ping(server, client_context(cfg)) == ("replica", "client")


def test_peer_role_on_stdlib_ssl_objects(pki: Pki) -> None:
    """The same contexts and peer_role with plain ssl.SSLObjects, handshaking in memory."""
    server_bios = (ssl.MemoryBIO(), ssl.MemoryBIO())  # (incoming, outgoing)
    client_bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
    server = server_context(pki.node("r1", "replica")).wrap_bio(*server_bios, server_side=True)
    client = client_context(pki.node("b1", "bridge")).wrap_bio(*client_bios)
    done = {"server": False, "client": False}
    for _ in range(10):  # TLS 1.3 needs two flights; the bound only stops a runaway loop
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_bios[0].write(client_bios[1].read())
        client_bios[0].write(server_bios[1].read())
        if all(done.values()):
            break
    assert done == {"server": True, "client": True}
    assert client.version() == server.version() == "TLSv1.3"
    assert peer_role(client) == "replica"
    assert peer_role(server) == "bridge"
