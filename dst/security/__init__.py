"""Security for dst peers: a small CA (``dst certs``) and mutual TLS 1.3 with roles.

:mod:`dst.security.certs` makes the CA and node certificates, each carrying one of
:data:`ROLES`; :mod:`dst.security.tls` builds the ssl contexts from a ``--tls DIR`` directory
and reads the role a peer proved in its handshake.
"""

from __future__ import annotations

from dst.security.certs import ROLES, certs_main, init_ca, issue
from dst.security.tls import (
    TlsConfig,
    client_context,
    own_role,
    peer_role,
    require_peer_role,
    server_context,
)

__all__ = [
    "ROLES",
    "TlsConfig",
    "certs_main",
    "client_context",
    "init_ca",
    "issue",
    "own_role",
    "peer_role",
    "require_peer_role",
    "server_context",
]
