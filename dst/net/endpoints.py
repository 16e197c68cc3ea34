"""Addresses, connecting and listening, with or without mutual TLS.

``HOST:PORT`` (``[v6]:PORT`` for IPv6) everywhere.  A listener completes the TLS handshake and
reads the peer's role from its certificate *before* the connection handler runs, so nothing is
opened or allocated for a peer that has not authenticated.  Plaintext needs ``tls=None``,
which the CLI only passes with an explicit ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from dst.errors import ConfigError, ProtocolError
from dst.net.framed import FramedStream, describe
from dst.security.tls import TlsConfig, client_context, peer_role, server_context

log = logging.getLogger("dst.net")

# A peer gets this long to finish TCP+TLS; a slowloris that opens sockets and stalls cannot
# hold connection slots for longer.
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT``; ConfigError names a bad value."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"address {text!r}: port {port} out of range 0..65535")
    return Address(host or default_host, port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def connect(address: Address, tls: TlsConfig | None) -> tuple[FramedStream, str | None]:
    """Open a framed stream to ``address``; with TLS, returns the server's role too."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
    if tls is None:
        return FramedStream(stream), None
    ssl_stream = trio.SSLStream(stream, client_context(tls), server_hostname=address.host)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await ssl_stream.do_handshake()
        role = peer_role(ssl_stream)
    except BaseException:
        await trio.aclose_forcefully(ssl_stream)
        raise
    return FramedStream(ssl_stream), role


Handler = Callable[[FramedStream, str | None, str], Awaitable[None]]


async def serve(
    address: Address,
    tls: TlsConfig | None,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections forever; call ``handler(framed, peer_role, peer_name)`` for each
    authenticated one.  ``task_status.started`` gets the listeners (their real ports)."""
    context = server_context(tls) if tls is not None else None

    async def on_connection(stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        role: str | None = None
        wrapped: trio.abc.Stream = stream
        if context is not None:
            ssl_stream = trio.SSLStream(stream, context, server_side=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    await ssl_stream.do_handshake()
                role = peer_role(ssl_stream)
            except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                log.warning("peer=%s event=tls_refused reason=%r", peer, describe(exc))
                await trio.aclose_forcefully(ssl_stream)
                return
            except ProtocolError as exc:
                log.warning("peer=%s event=tls_refused reason=%r", peer, str(exc))
                await trio.aclose_forcefully(ssl_stream)
                return
            wrapped = ssl_stream
        framed = FramedStream(wrapped)
        try:
            await handler(framed, role, peer)
        finally:
            await trio.aclose_forcefully(wrapped)

    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started(listeners)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return str(Address(str(host), int(port)))


def listener_address(listeners: list[trio.SocketListener]) -> Address:
    host, port = listeners[0].socket.getsockname()[:2]
    return Address(str(host), int(port))
