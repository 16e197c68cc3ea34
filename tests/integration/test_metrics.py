"""``--metrics``: real `dst serve` and `dst nbd` processes, I/O from nbdcopy and nbdsh, the
endpoint scraped with urllib and parsed with prometheus_client's own parser; the counters
must move by exactly the bytes the clients moved."""

from __future__ import annotations

import errno
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dst.cli import main
from dst.metrics import ServerCollector
from dst.net.endpoints import Address
from dst.services import run_up
from tests.integration.harness import (
    bridge_process,
    free_port,
    pair_processes,
    running_server,
    server_process,
)
from tests.integration.nbdtools import run
from tests.integration.test_bad_input import raw, read

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: Address) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert hits, f"no sample {name}{labels}"
    return sum(hits)


async def wait_for(address: Address, name: str, target: float, **labels: str) -> Samples:
    """Scrape until ``name`` reaches ``target`` (replication settles asynchronously)."""
    with trio.fail_after(60):
        while True:
            samples = await trio.to_thread.run_sync(scrape, address)
            if value(samples, name, **labels) == target:
                return samples
            await trio.sleep(0.2)


async def test_counters_move_by_what_the_nbd_clients_moved(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    (tmp_path / "in.img").write_bytes(data)
    pmetrics, bmetrics = Address("127.0.0.1", free_port()), Address("127.0.0.1", free_port())
    with pair_processes(tmp_path, "vol0=16M") as (primary, secondary):
        primary.argv += ["--metrics", str(pmetrics)]
        secondary.start()
        primary.start()
        await wait_for(pmetrics, "dst_replication_peer_connected", 1, volume="vol0")
        with bridge_process(tmp_path, primary.address, "vol0", "--metrics", str(bmetrics)) as bp:
            bp.start()
            uri = f"nbd://{bp.address}/vol0"
            await run(["nbdcopy", "--synchronous", str(tmp_path / "in.img"), uri])
            source = str(tmp_path / "in.img")
            script = (
                f"assert h.pread(65536, 4096) == open({source!r}, 'rb').read()[4096:69632]; "
                "h.flush()"
            )
            await run(["nbdsh", "-u", uri, "-c", script], debian=True)

            bridge = scrape(bmetrics)
            assert value(bridge, "dst_io_bytes_total", role="bridge", op="write") == 1 << 20
            assert value(bridge, "dst_io_bytes_total", role="bridge", op="read") == 65536
            assert value(bridge, "dst_io_errors_total", role="bridge") == 0
            writes = value(bridge, "dst_io_requests_total", role="bridge", op="write")
            assert writes >= 1
            assert value(bridge, "dst_io_request_duration_seconds_count", op="write") == writes
            inf = value(bridge, "dst_io_request_duration_seconds_bucket", op="write", le="+Inf")
            assert inf == writes
            assert value(bridge, "dst_io_inflight_requests", role="bridge") == 0
            assert value(bridge, "dst_remote_connected", server=str(primary.address)) == 1
            assert value(bridge, "dst_remote_reconnects_total") == 0
            assert value(bridge, "dst_mirror_failfast_events_total", volume="vol0") == 0

            server = scrape(pmetrics)
            assert value(server, "dst_io_bytes_total", role="primary", op="write") == 1 << 20
            assert value(server, "dst_io_bytes_total", role="primary", op="read") == 65536
            assert value(server, "dst_server_sessions", peer_role="bridge") == 1
            assert value(server, "dst_server_info", role="primary", peer=str(secondary.address))
            assert value(server, "dst_volume_size_bytes", volume="vol0") == 16 << 20
            assert value(server, "dst_replication_out_of_sync_bytes", volume="vol0") == 0
            assert value(server, "dst_fence_rejected_writes_total") == 0
            assert value(server, "dst_store_syncs_total", volume="vol0") >= 1  # the flush
            assert value(server, "dst_store_errors_total", volume="vol0") == 0
            # the READ found its bytes in the page cache: answered by the session's reader
            assert value(server, "dst_server_requests_completed_inline_total") >= 1

            # The secondary goes away: what the primary writes now is out of sync, counted.
            secondary.stop()
            await wait_for(pmetrics, "dst_replication_peer_connected", 0, volume="vol0")
            await run(["nbdsh", "-u", uri, "-c", "h.pwrite(b'x' * 65536, 1 << 20)"], debian=True)
            server = scrape(pmetrics)
            assert value(server, "dst_replication_out_of_sync_bytes", volume="vol0") >= 65536
            assert value(server, "dst_replication_degraded_writes_total", volume="vol0") >= 1
            assert value(server, "dst_replication_degraded_bytes_total", volume="vol0") == 65536

            # Back: the resync copies it and the gauge returns to zero.
            secondary.start()
            server = await wait_for(pmetrics, "dst_replication_out_of_sync_bytes", 0, volume="vol0")
            assert value(server, "dst_replication_resynced_bytes_total", volume="vol0") >= 65536


@pytest.mark.parametrize(
    ("path", "method", "code"), [("/nope", "GET", 404), ("/metrics", "POST", 405)]
)
async def test_endpoint_refuses_what_it_does_not_serve(
    tmp_path: Path, path: str, method: str, code: int
) -> None:
    metrics = Address("127.0.0.1", free_port())
    with server_process(tmp_path) as sp:
        sp.argv += ["--metrics", str(metrics)]
        sp.start()
        await trio.to_thread.run_sync(scrape, metrics)  # up before the bad requests

        def ask() -> int:
            req = urllib.request.Request(f"http://{metrics}{path}", method=method, data=None)
            try:
                with urllib.request.urlopen(req, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert await trio.to_thread.run_sync(ask) == code
        assert value(await trio.to_thread.run_sync(scrape, metrics), "dst_volume_epoch") == 1


async def test_dst_up_serves_one_endpoint_for_both_servers_and_the_bridge(tmp_path: Path) -> None:
    metrics = Address("127.0.0.1", free_port())
    async with trio.open_nursery() as nursery:
        start = partial(run_up, tmp_path, Address("127.0.0.1", 0), metrics=metrics, size=8 << 20)
        nbd = await nursery.start(start)
        await run(
            ["nbdsh", "-u", f"nbd://{nbd}/vol0", "-c", "h.pwrite(b'u' * 8192, 0)"], debian=True
        )
        samples = await trio.to_thread.run_sync(scrape, metrics)
        nursery.cancel_scope.cancel()
    for role in ("primary", "secondary", "bridge"):
        assert value(samples, "dst_io_inflight_requests", role=role) == 0
    assert value(samples, "dst_io_bytes_total", role="bridge", op="write") == 8192
    assert value(samples, "dst_io_bytes_total", role="primary", op="write") == 8192
    assert value(samples, "dst_io_bytes_total", role="secondary", op="write") == 8192  # replica
    assert value(samples, "dst_volume_size_bytes", node="up-secondary") == 8 << 20


async def test_a_failed_request_is_one_log_line_and_one_error_sample(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dst")
    async with running_server(tmp_path) as server:
        assert server.listen_address is not None
        async with raw(server.listen_address) as peer:
            handle = await peer.handshake()
            await peer.send(read(77, handle, 64 << 20, 4096))  # one block past the end
            reply = await peer.reply()
            assert (reply.tid, reply.errno) == (77, errno.EINVAL)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(server))
        text = generate_latest(registry).decode()
    lines = [r.getMessage() for r in caplog.records if "event=request_failed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "volume=vol0" in lines[0] and "tid=77" in lines[0] and "op=read" in lines[0]
    assert "peer=127.0.0.1:" in lines[0] and f"errno={errno.EINVAL}" in lines[0]
    errors = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert [s.value for s in errors if s.name == "dst_io_errors_total"] == [1.0]


@pytest.fixture
def root_logging() -> Iterator[None]:
    """main() sets up dst's logging on the root logger; put the test session's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--listen", "127.0.0.1:0", "--data", "d", "--volume", "v=1M", "--insecure"],
        ["nbd", "--server", "127.0.0.1:1", "--volume", "v", "--insecure"],
        ["up", "--data", "d"],
    ],
)
def test_a_bad_metrics_address_is_named(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a if a != "d" else str(tmp_path / "d") for a in argv]
    assert main([*argv, "--metrics", "nope"]) == 2
    assert "address 'nope': expected HOST:PORT" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything was created
