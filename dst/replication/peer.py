"""The primary's link to its secondary: a RemoteVolume in replica role that never waits.

Unlike a user's client, the replication link must not hold writes while it reconnects: a write
the peer cannot take *now* is recorded in the dirty bitmap and acknowledged on the local copy
alone (degraded mode), and the resync brings the peer up to date when it is back.  So the link
is made with ``resend=False`` (pending commands fail with ENOTCONN the moment the link breaks)
and a short keepalive, and it keeps reconnecting in the background forever.

What one request to the peer may be is what the secondary's volume advertises when the link
attaches (its limits in Attached: max bytes, a boundary if its store has one), stacked as
Linux stacks limits — DRBD 8.4 and later agree a maximum request size with the peer the same
way (``DRBD_MAX_BIO_SIZE``, 1 MiB), where older DRBD cut every request at 32 KiB (the most
its old packet header could carry).
"""

from __future__ import annotations

from dst.client.remote import RemoteConfig, RemoteVolume
from dst.net.endpoints import Address
from dst.security.tls import TlsConfig

#: A silent peer is declared gone after this long; writes meanwhile wait, so keep it short.
PEER_DEAD_AFTER_S = 3.0
PEER_KEEPALIVE_S = 0.5
#: A replicated write the peer leaves unanswered this long (a lost frame, a stuck disk) breaks
#: the link: the write degrades into the bitmap instead of stalling the primary.
PEER_REQUEST_TIMEOUT_S = 10.0
#: Ends the node id a replication link says Hello with: a primary refuses to be replicated
#: into by another primary (two primaries = split brain), while other replica-role readers
#: (``dst verify``) may still attach.
REPLICATION_NODE_SUFFIX = "/replication"


def open_peer(address: Address, volume: str, tls: TlsConfig | None, node_id: str) -> RemoteVolume:
    """A replication link to ``volume`` on ``address``; start it with
    ``nursery.start(peer.run, None)``."""
    config = RemoteConfig(
        address,
        volume,
        tls=tls,
        role="replica",
        node_id=node_id + REPLICATION_NODE_SUFFIX,
        keepalive_s=PEER_KEEPALIVE_S,
        dead_after_s=PEER_DEAD_AFTER_S,
        resend=False,
        request_timeout_s=PEER_REQUEST_TIMEOUT_S,
    )
    return RemoteVolume(config)
