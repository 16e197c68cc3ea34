"""The primary's link to its secondary: a RemoteVolume in replica role that never waits.

Unlike a user's client, the replication link must not hold writes while it reconnects: a write
the peer cannot take *now* is recorded in the dirty bitmap and acknowledged on the local copy
alone (degraded mode), and the resync brings the peer up to date when it is back.  So the link
is made with ``resend=False`` (pending commands fail with ENOTCONN the moment the link breaks)
and a short keepalive, and it keeps reconnecting in the background forever.
"""

from __future__ import annotations

from dst.block import Limits
from dst.client.remote import RemoteConfig, RemoteVolume
from dst.net.endpoints import Address
from dst.security.tls import TlsConfig

#: DRBD's segmentation boundary: no request to the peer crosses a multiple of it (seed 000).
#: The link's own limits carry it, so the generic splitter cuts every bio sent to the peer —
#: one transaction of commands, pipelined — whatever its shape.
REPLICATION_BOUNDARY = 32 * 1024
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
        limits=Limits(boundary=REPLICATION_BOUNDARY),
    )
    return RemoteVolume(config)
