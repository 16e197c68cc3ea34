"""Mutual TLS 1.3 contexts for dst peers, and the role a peer proved.

A ``--tls DIR`` directory (made by ``dst certs issue``) holds ``ca.pem``, ``cert.pem`` and
``key.pem``. Both sides present a certificate and verify the other's chain against ``ca.pem``;
nothing older than TLS 1.3 is spoken. Host names are not checked: peers may be reached by any
address, and identity is "signed by our CA, with this role" -- so after the handshake the
accepting side asks :func:`peer_role` (or :func:`require_peer_role`) what the peer may do:
a server accepts client, bridge and replica peers; a replication link requires a replica.

Note on TLS 1.3: the client finishes its handshake before the server has judged the client's
certificate, so a refused client sees the server's alert on its first receive, not in
``do_handshake``. The server side fails in ``do_handshake``, before anything is allocated for
the peer.
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from dst.errors import ConfigError, ProtocolError
from dst.security.certs import (
    CA_CERT_FILE,
    CERT_FILE,
    KEY_FILE,
    certificate_role,
    role_from_names,
)

__all__ = [
    "PeerCertificateSource",
    "TlsConfig",
    "client_context",
    "own_role",
    "peer_role",
    "require_peer_role",
    "server_context",
]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """A ``--tls DIR`` directory: our certificate and key, and the CA we trust."""

    directory: Path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TlsConfig:
        """Check that ``path`` holds ca.pem, cert.pem and key.pem (ConfigError naming the
        first one missing)."""
        directory = Path(path)
        if not directory.is_dir():
            raise ConfigError(f"TLS directory {directory} does not exist or is not a directory")
        cfg = cls(directory)
        for file in (cfg.ca_path, cfg.cert_path, cfg.key_path):
            if not file.is_file():
                raise ConfigError(f"TLS file {file} is missing (make it with `dst certs issue`)")
        return cfg

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE


def _context(cfg: TlsConfig, *, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # RFC 5280 strictness: our CA makes conforming certificates, so anything else is suspect.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=cfg.ca_path)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load CA certificate {cfg.ca_path}: {e}") from e
    try:
        ctx.load_cert_chain(certfile=cfg.cert_path, keyfile=cfg.key_path)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"cannot load certificate {cfg.cert_path} with key {cfg.key_path}: {e}"
        ) from e
    return ctx


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """Context for the accepting side: TLS 1.3 only, a client certificate is required."""
    ctx = _context(cfg, server_side=True)
    # dst connections are long-lived and never resumed, so session tickets would only be
    # extra records sent after the handshake.
    ctx.num_tickets = 0
    return ctx


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """Context for the connecting side: TLS 1.3 only, the server chain verified against
    ca.pem, host names not checked (identity is the CA and the role)."""
    ctx = _context(cfg, server_side=False)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # setting check_hostname never lowers it, but be plain
    return ctx


class PeerCertificateSource(Protocol):
    """Anything with ``getpeercert()``: ssl.SSLObject, ssl.SSLSocket, trio.SSLStream."""

    def getpeercert(self) -> Any: ...


def _names(cert: dict[str, Any]) -> tuple[list[str], list[str]]:
    ous = [
        str(value)
        for rdn in cert.get("subject", ())
        for key, value in rdn
        if key == "organizationalUnitName"
    ]
    uris = [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    return ous, uris


def peer_role(ssl_object: PeerCertificateSource) -> str:
    """The role in the peer's verified certificate, after the handshake.

    ``getpeercert()`` gives a decoded certificate only when the chain was verified (it is
    ``{}`` otherwise, ``None`` when there is none), so an empty answer is refused too.
    Raises ProtocolError(errno=EPERM) when the role is absent or inconsistent.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        raise ProtocolError("peer presented no verified certificate", errno=errno.EPERM)
    if not isinstance(cert, dict):
        raise ProtocolError(f"peer certificate is not decoded: {type(cert).__name__}", errno.EPERM)
    ous, uris = _names(cert)
    try:
        return role_from_names(ous, uris)
    except ValueError as e:
        raise ProtocolError(f"peer {e}", errno=errno.EPERM) from e


def require_peer_role(ssl_object: PeerCertificateSource, allowed: Collection[str]) -> str:
    """:func:`peer_role`, refused with ProtocolError(EPERM) unless it is in ``allowed``."""
    role = peer_role(ssl_object)
    if role not in allowed:
        raise ProtocolError(
            f"peer role {role!r} is not allowed here (need {' or '.join(sorted(allowed))})",
            errno=errno.EPERM,
        )
    return role


def own_role(cfg: TlsConfig) -> str:
    """The role in our own cert.pem, so a process can check it was given the right directory
    (a bridge must present a bridge certificate, and so on). ConfigError if unreadable, not
    signed by ca.pem, or without a consistent role."""
    try:
        cert = x509.load_pem_x509_certificate(cfg.cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate(cfg.ca_path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read certificates in {cfg.directory}: {e}") from e
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as e:
        raise ConfigError(f"{cfg.cert_path} is not signed by {cfg.ca_path}: {e}") from e
    try:
        return certificate_role(cert)
    except ValueError as e:
        raise ConfigError(f"{cfg.cert_path}: {e}") from e
