"""Prometheus metrics for servers and bridges: ``--metrics HOST:PORT`` serves ``/metrics``.

Nothing here sits in the data path.  Collectors read, at scrape time, the statistics the code
keeps anyway: ``Server.stats`` and ``Server.sessions``, ``Replicated.statistics()``, the
volumes' epochs, the page pool, ``RemoteVolume.stats``, and the per-request
:class:`~dst.iostats.IoStats` (the one structure the session handler and the bridge's request
task write once per request).  The HTTP endpoint is a small Trio server in the service's own
event loop, so a scrape sees a consistent snapshot and needs no thread or lock.

Every name starts ``dst_`` and carries its unit; labels are ``role`` (a server's role —
primary, secondary, standalone — or ``bridge``), ``node``, ``volume``, ``op``.

- ``dst_io_requests_total``, ``dst_io_bytes_total``, ``dst_io_errors_total``,
  ``dst_io_request_duration_seconds`` (histogram), ``dst_io_inflight_requests``: per request,
  on servers and bridges alike (``role`` tells which).
- Servers: ``dst_server_info`` (1, labelled with the role and peer), ``dst_server_sessions``,
  ``dst_server_connections_total``,
  ``dst_server_protocol_errors_total``, ``dst_server_bad_requests_total``,
  ``dst_server_pool_pages`` / ``_free_pages``, ``dst_volume_size_bytes``, ``dst_volume_epoch``,
  ``dst_replication_peer_connected``, ``dst_replication_out_of_sync_bytes``,
  ``dst_replication_resync_{total,done}_bytes``, ``dst_replication_resync_rate_bytes_per_second``,
  ``dst_replication_resynced_bytes_total``, ``dst_replication_degraded_{writes,bytes}_total``,
  ``dst_store_syncs_total`` and ``dst_store_errors_total`` (the data file's fdatasync calls
  and errors), ``dst_fence_rejected_writes_total`` (writes refused for a stale epoch: the
  server's ``stale_writes`` counter, which the Fence layer's refusals feed).
- Bridges: ``dst_remote_connected``, ``dst_remote_reconnects_total``,
  ``dst_remote_resent_commands_total``, ``dst_remote_failed_transactions_total``, and
  ``dst_mirror_failfast_events_total`` — the failfast trips of the mirror legs' links (each
  drops a leg at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dst.block import StoreStatistics
from dst.iostats import LATENCY_BUCKETS_S, IoStats
from dst.net.endpoints import Address

if TYPE_CHECKING:
    from dst.block import BlockLayer
    from dst.server.server import Server

log = logging.getLogger("dst.metrics")

#: A scraper must send its request within this time, in at most this many bytes.
REQUEST_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 8192


def io_families(io: IoStats, role: str, node: str) -> Iterator[Metric]:
    labels = ["role", "node", "volume", "op"]
    requests = CounterMetricFamily(
        "dst_io_requests", "Requests answered, by volume and op", labels=labels
    )
    moved = CounterMetricFamily(
        "dst_io_bytes", "Bytes of requests answered without error", labels=labels
    )
    errors = CounterMetricFamily("dst_io_errors", "Requests answered with an error", labels=labels)
    latency = HistogramMetricFamily(
        "dst_io_request_duration_seconds",
        "Time from a request's start to its answer",
        labels=labels,
    )
    for (volume, op), s in sorted(io.ops.items()):
        values = [role, node, volume, op]
        requests.add_metric(values, s.requests)
        moved.add_metric(values, s.bytes)
        errors.add_metric(values, s.errors)
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), s.buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency.add_metric(values, buckets, s.latency_sum_s)
    inflight = GaugeMetricFamily(
        "dst_io_inflight_requests", "Requests started and not yet answered", labels=labels[:2]
    )
    inflight.add_metric([role, node], io.inflight)
    yield from (requests, moved, errors, latency, inflight)


class ServerCollector(Collector):
    """A ``dst serve`` process (or one server of ``dst up``)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        srv, node = self.server, self.server.node_id
        info = GaugeMetricFamily(
            "dst_server_info",
            "Always 1: the server's role and peer",
            labels=["node", "role", "peer"],
        )
        info.add_metric([node, srv.role, str(srv.config.peer or "")], 1)
        yield info
        yield from io_families(srv.io, srv.role, node)
        sessions = GaugeMetricFamily(
            "dst_server_sessions", "Live sessions by peer role", labels=["node", "peer_role"]
        )
        for peer_role in ("client", "bridge", "replica"):
            sessions.add_metric([node, peer_role], srv.sessions.get(peer_role, 0))
        yield sessions
        yield from self._server_counters(node)
        pool = srv.pool.statistics()
        yield _gauge("dst_server_pool_pages", "Pages in the request pool", node, pool.pages_total)
        yield _gauge("dst_server_pool_free_pages", "Free pages in the pool", node, pool.pages_free)
        yield from self._volumes(node)

    def _server_counters(self, node: str) -> Iterator[Metric]:
        stats = self.server.stats
        for key, name, doc in (
            ("connections", "dst_server_connections", "Connections accepted"),
            ("protocol_errors", "dst_server_protocol_errors", "Connections closed for bad frames"),
            ("bad_requests", "dst_server_bad_requests", "Requests refused by the codec"),
            (
                "completed_inline",
                "dst_server_requests_completed_inline",
                "Requests the store completed at once (cached reads, small writes), no task",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["node"])
            family.add_metric([node], stats.get(key, 0))
            yield family

    def _volumes(self, node: str) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def add(name: str, kind: str, doc: str, volume: str, value: float) -> None:
            if name not in families:
                cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                families[name] = cls(name, doc, labels=["node", "volume"])
            families[name].add_metric([node, volume], value)  # type: ignore[attr-defined]

        fenced = self.server.stats.get("stale_writes", 0)
        for name, volume in sorted(self.server.volumes.items()):
            add("dst_volume_size_bytes", "gauge", "Volume size", name, volume.size)
            add("dst_volume_epoch", "gauge", "Volume epoch", name, volume.epoch)
            store = _store_statistics(volume.layer)
            if store is not None:
                add("dst_store_syncs", "counter", "fdatasync calls on the data file", name,
                    store.syncs)  # fmt: skip
                add("dst_store_errors", "counter", "Errors from the data file", name,
                    store.errors)  # fmt: skip
            if volume.replicated is not None:
                stats = volume.replicated.statistics()
                for metric, kind, doc, field in REPLICATION_METRICS:
                    add(metric, kind, doc, name, float(getattr(stats, field)))
        family = CounterMetricFamily(
            "dst_fence_rejected_writes",
            "Writes refused because their epoch is older than the volume's",
            labels=["node"],
        )
        family.add_metric([node], fenced)
        yield family
        yield from families.values()


#: Replicated.statistics() fields as metrics: (name, kind, help, field).
REPLICATION_METRICS = (
    ("dst_replication_peer_connected", "gauge", "1 if the link to the peer is up",
     "peer_connected"),
    ("dst_replication_out_of_sync_bytes", "gauge", "Bytes the peer lacks (dirty bitmap)",
     "out_of_sync_bytes"),
    ("dst_replication_resync_total_bytes", "gauge", "Bytes the current resync copies",
     "resync_total_bytes"),
    ("dst_replication_resync_done_bytes", "gauge", "Bytes of it copied so far",
     "resync_done_bytes"),
    ("dst_replication_resync_rate_bytes_per_second", "gauge", "Current resync rate",
     "resync_rate_bytes_s"),
    ("dst_replication_resynced_bytes", "counter", "Bytes resynced since start",
     "resynced_bytes"),
    ("dst_replication_degraded_writes", "counter", "Writes taken with the peer away",
     "degraded_writes"),
    ("dst_replication_degraded_bytes", "counter", "Bytes written with the peer away",
     "degraded_bytes"),
)  # fmt: skip


def _store_statistics(layer: Any) -> StoreStatistics | None:
    """The FileStore's statistics at the bottom of a server volume's stack."""
    for _ in range(8):  # the stack is shallow; a bound, not a loop forever
        statistics = getattr(layer, "statistics", None)
        stats = statistics() if callable(statistics) else None
        if isinstance(stats, StoreStatistics):
            return stats
        layer = getattr(layer, "local", None) or getattr(layer, "below", None)
        if layer is None:
            return None
    return None


def _gauge(name: str, doc: str, node: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=["node"])
    family.add_metric([node], value)
    return family


class BridgeCollector(Collector):
    """A ``dst nbd`` bridge: its per-request IoStats and the client-side stack it serves."""

    def __init__(self, io: IoStats, node: str, layers: Callable[[], dict[str, BlockLayer]]):
        self.io, self.node, self.layers = io, node, layers

    def collect(self) -> Iterable[Metric]:
        yield from io_families(self.io, "bridge", self.node)
        labels = ["node", "volume", "server"]
        connected = GaugeMetricFamily(
            "dst_remote_connected", "1 if the link to the server is up", labels=labels
        )
        counters = {
            "reconnects": CounterMetricFamily(
                "dst_remote_reconnects", "Links re-established", labels=labels
            ),
            "resent": CounterMetricFamily(
                "dst_remote_resent_commands", "Commands resent after a reconnect", labels=labels
            ),
            "failed": CounterMetricFamily(
                "dst_remote_failed_transactions", "Transactions failed", labels=labels
            ),
        }
        failfast = CounterMetricFamily(
            "dst_mirror_failfast_events",
            "Mirror legs dropped by failfast",
            labels=["node", "volume"],
        )
        for volume, top in sorted(self.layers().items()):
            # A failfast trip is what drops a mirror leg: count them over the legs' links.
            trips = sum(remote.stats.failfast_trips for remote in _remotes(top))
            failfast.add_metric([self.node, volume], trips)
            for remote in _remotes(top):
                values = [self.node, volume, str(remote.config.address)]
                connected.add_metric(values, float(remote.connected))
                for key, family in counters.items():
                    family.add_metric(values, getattr(remote.stats, key))
        yield connected
        yield from counters.values()
        yield failfast


def _remotes(layer: Any, depth: int = 0) -> Iterator[Any]:
    """The RemoteVolumes in a client-side stack: the layer itself, its mirror legs, below."""
    from dst.client.remote import RemoteVolume

    if isinstance(layer, RemoteVolume):
        yield layer
    elif depth < 8:
        for child in [*getattr(layer, "legs", ()), getattr(layer, "below", None)]:
            if child is not None:
                yield from _remotes(getattr(child, "layer", child), depth + 1)


async def serve_metrics(
    listen: Address,
    registry: CollectorRegistry,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``listen`` until cancelled; ``task_status`` gets the bound
    address (port 0 allowed)."""
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    host, port = listeners[0].socket.getsockname()[:2]
    bound = Address(str(host), int(port))
    log.info("listen=%s event=metrics_listening", bound)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, partial(_handle, registry), listeners)
        task_status.started(bound)


async def _handle(registry: CollectorRegistry, stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            head = b""
            while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_BYTES:
                chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                if not chunk:
                    return
                head += chunk
            await stream.send_all(_answer(registry, head))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _answer(registry: CollectorRegistry, head: bytes) -> bytes:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response(400, "text/plain", b"bad request\n")
    method, path = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response(405, "text/plain", b"only GET\n")
    if path not in (b"/metrics", b"/"):
        return _response(404, "text/plain", b"try /metrics\n")
    try:
        body = generate_latest(registry)
    except Exception:
        log.exception("event=metrics_failed")
        return _response(500, "text/plain", b"collector failed\n")
    return _response(200, CONTENT_TYPE_LATEST, body, head_only=method == b"HEAD")


def _response(code: int, content_type: str, body: bytes, *, head_only: bool = False) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    head = (
        f"HTTP/1.1 {code} {reason.get(code, 'Internal Server Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)
