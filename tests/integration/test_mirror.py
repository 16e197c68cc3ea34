"""The failfast mirror with real `dst serve` processes, the `dst nbd --mirror` bridge and a real
NBD client (nbdsh): one leg frozen (SIGSTOP) under a write load is dropped and no write fails;
then the last good leg frozen for seconds makes a write wait, and it succeeds; then the frozen
leg resumes and gets back exactly its dirty extents, after which the legs' files are identical.
Also a leg behind a black-holed relay (the connection stays open, nothing gets through), and
RemoteVolume's FAILFAST against a frozen server: one expiry fails every pending request."""

from __future__ import annotations

import errno
import filecmp
import json
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from dst.block import Bio, BioFlags, Op, Plug
from dst.client import RemoteVolume, open_remote
from dst.errors import BlockError
from dst.mirror import LegState, open_mirror
from dst.net.endpoints import Address
from tests.integration.harness import ServerProcess, bridge_process, free_port, running_server
from tests.integration.nbdtools import run
from tests.integration.test_metrics import scrape, value

MiB = 1 << 20
SIZE = 64 * MiB
#: Only keeps a broken test from hanging; nothing is asserted about time.
GUARD_S = 90

LOAD = """
import os, sys, time
stop, i, worst = STOP, 0, 0.0
while not os.path.exists(stop) or i < 20:
    data = bytes([i % 251 + 1]) * 65536
    t = time.monotonic()
    h.pwrite(data, (i * 37 % 256) * 262144)
    worst = max(worst, time.monotonic() - t)
    i += 1
h.flush()
print("writes", i, "worst", round(worst, 3))
"""


def servers(tmp_path: Path) -> tuple[ServerProcess, ServerProcess]:
    return tuple(  # type: ignore[return-value]
        ServerProcess(tmp_path / n, free_port(), "vol0=64M", tmp_path / f"{n}.log") for n in "ab"
    )


def status(path: Path) -> list[dict[str, Any]]:
    try:
        legs: list[dict[str, Any]] = json.loads(path.read_text())["legs"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return legs


async def wait_state(path: Path, leg: int, state: str) -> dict[str, Any]:
    with trio.fail_after(GUARD_S):
        while True:
            legs = status(path)
            if legs and legs[leg]["state"] == state:
                return legs[leg]
            await trio.sleep(0.1)


async def test_failfast_mirror_through_the_nbd_bridge(tmp_path: Path) -> None:
    a, b = servers(tmp_path)
    state_dir = tmp_path / "state"
    status_file = state_dir / "vol0.mirror.json"
    stop_file = tmp_path / "stop"
    try:
        a.start()
        b.start()
        metrics = Address("127.0.0.1", free_port())
        extra = ("--server", str(b.address), "--mirror", "--state-dir", str(state_dir))
        with bridge_process(
            tmp_path, a.address, "vol0", *extra, "--metrics", str(metrics)
        ) as bridge:
            bridge.start()
            uri = f"nbd://{bridge.address}/vol0"
            await wait_state(status_file, 1, "in_sync")
            assert value(scrape(metrics), "dst_mirror_failfast_events_total") == 0

            # 1. Leg B freezes under a write load: it is dropped, and no write fails.
            async with trio.open_nursery() as nursery:
                result: list[str] = []

                async def load() -> None:
                    argv = ["nbdsh", "-u", uri, "-c", LOAD.replace("STOP", repr(str(stop_file)))]
                    out = await run(argv, debian=True, timeout_s=GUARD_S)
                    result.append(out.stdout.decode())

                nursery.start_soon(load)
                await trio.sleep(0.5)
                b.kill(signal.SIGSTOP)
                erred = await wait_state(status_file, 1, "erred")
                await trio.sleep(0.5)  # the load goes on over leg A alone
                stop_file.touch()
            assert "failfast" in erred["reason"], erred
            shown = await run(
                [sys.executable, "-m", "dst", "status", "--mirror-state", str(state_dir)]
            )
            row = next(r for r in shown.stdout.decode().splitlines() if str(b.address) in r)
            assert "erred" in row and "failfast" in row, row
            assert value(scrape(metrics), "dst_mirror_failfast_events_total") >= 1
            writes = int(re.search(r"writes (\d+)", result[0]).group(1))  # type: ignore[union-attr]
            assert writes > 20, result

            # 2. The last good leg freezes for seconds: a write waits for it and succeeds.
            async with trio.open_nursery() as nursery:
                script = "h.pwrite(b'\\xaa' * 65536, 0); h.flush()"
                nursery.start_soon(partial(run, ["nbdsh", "-u", uri, "-c", script], debian=True))
                await trio.sleep(0.3)
                a.kill(signal.SIGSTOP)
                await trio.sleep(3)
                a.kill(signal.SIGCONT)
            legs = status(status_file)
            assert legs[0]["state"] == "in_sync", "the last good leg was dropped"
            log = (tmp_path / "bridge.log").read_text()
            assert f"event=leg_erred leg={a.address}" not in log

            # 3. B resumes: only its dirty extents are resynced, and the legs end identical.
            dirty = legs[1]["dirty_bytes"]
            assert 0 < dirty < SIZE // 2, legs
            b.kill(signal.SIGCONT)
            back = await wait_state(status_file, 1, "in_sync")
            log = (tmp_path / "bridge.log").read_text()
            copied = re.findall(rf"event=leg_resync_finished leg={b.address} bytes=(\d+)", log)
            assert [int(c) for c in copied] == [dirty], log[-3000:]
            assert back["dirty_bytes"] == 0 and back["resynced_bytes"] == dirty
        assert filecmp.cmp(a.data_dir / "vol0.img", b.data_dir / "vol0.img", shallow=False)
    finally:
        a.stop()
        b.stop()


async def test_a_bridge_restart_remembers_what_a_dead_leg_missed(tmp_path: Path) -> None:
    a, b = servers(tmp_path)
    state_dir = tmp_path / "state"
    status_file = state_dir / "vol0.mirror.json"
    try:
        a.start()
        b.start()
        extra = ("--server", str(b.address), "--mirror", "--state-dir", str(state_dir))
        with bridge_process(tmp_path, a.address, "vol0", *extra) as bridge:
            bridge.start()
            uri = f"nbd://{bridge.address}/vol0"
            await wait_state(status_file, 1, "in_sync")
            fill = "for i in range(64): h.pwrite(bytes([i + 1]) * 65536, i * 1048576)\nh.flush()"
            await run(["nbdsh", "-u", uri, "-c", fill], debian=True)
            b.kill()  # leg B dies; the bridge drops it and writes go on to A alone
            later = "for i in range(8): h.pwrite(b'\\xee' * 4096, i * 8 * 1048576 + 4096)"
            await run(["nbdsh", "-u", uri, "-c", later + "\nh.flush()"], debian=True)
            await wait_state(status_file, 1, "erred")
            bridge.kill()  # and the bridge crashes
            status_file.unlink()
            bridge.start()  # B is still down: the bridge starts on A, B erred from its bitmap
            restarted = await wait_state(status_file, 1, "erred")
            # The 8 extents B missed, and (the bridge was killed) the activity log's extents.
            assert restarted["dirty_bytes"] >= 8 * 65536, restarted
            b.start()
            back = await wait_state(status_file, 1, "in_sync")
            assert back["resynced_bytes"] == restarted["dirty_bytes"], back
        assert filecmp.cmp(a.data_dir / "vol0.img", b.data_dir / "vol0.img", shallow=False)
    finally:
        a.stop()
        b.stop()


async def test_a_bridge_killed_mid_load_resyncs_its_in_flight_extents(tmp_path: Path) -> None:
    a, b = servers(tmp_path)
    state_dir = tmp_path / "state"
    status_file = state_dir / "vol0.mirror.json"
    try:
        a.start()
        b.start()
        extra = ("--server", str(b.address), "--mirror", "--state-dir", str(state_dir))
        with bridge_process(tmp_path, a.address, "vol0", *extra) as bridge:
            bridge.start()
            uri = f"nbd://{bridge.address}/vol0"
            await wait_state(status_file, 1, "in_sync")
            async with trio.open_nursery() as nursery:
                argv = ["nbdsh", "-u", uri, "-c", LOAD.replace("STOP", repr(str(tmp_path / "x")))]
                nursery.start_soon(partial(run, argv, debian=True, check=False))
                await trio.sleep(1.5)
                bridge.kill()  # mid-write: some writes reached one leg only
            status_file.unlink()
            bridge.start()
            await wait_state(status_file, 1, "in_sync")
            log = (tmp_path / "bridge.log").read_text()
            assert "event=crash_recovery" in log, log[-2000:]
            assert "event=leg_resync_finished" in log, log[-2000:]
        assert filecmp.cmp(a.data_dir / "vol0.img", b.data_dir / "vol0.img", shallow=False)
    finally:
        a.stop()
        b.stop()


async def failfast_io(vol: RemoteVolume, bio: Bio, via: str) -> None:
    """``bio`` on ``vol`` by submit (a task waits in the deadline's scope), or by start (the
    mirror's started path: the volume's deadline watcher fails it back)."""
    if via == "submit":
        await vol.submit(bio)
    else:
        await (await vol.start(bio)).wait()


@pytest.mark.parametrize("via", ["submit", "start"])
async def test_one_expired_failfast_request_fails_all_pending_at_once(
    tmp_path: Path, via: str
) -> None:
    (server,) = servers(tmp_path)[:1]
    server.start()
    try:
        async with open_remote(server.address, "vol0", failfast_timeout_s=1.0) as vol:
            await failfast_io(
                vol, Bio.from_buffer(Op.WRITE, 0, b"\x01" * 4096, flags=BioFlags.FAILFAST), via
            )
            server.kill(signal.SIGSTOP)
            errors: list[BlockError] = []

            async def write(i: int, delay_s: float) -> None:
                await trio.sleep(delay_s)
                data = bytes([i]) * 4096
                bio = Bio.from_buffer(Op.WRITE, (i + 1) * 4096, data, flags=BioFlags.FAILFAST)
                try:
                    await failfast_io(vol, bio, via)
                except BlockError as exc:
                    errors.append(exc)

            with trio.fail_after(GUARD_S):
                async with trio.open_nursery() as nursery:
                    for i in range(16):
                        # Staggered: later ones would expire later on their own deadlines.
                        nursery.start_soon(write, i, 0.05 * i)
            assert len(errors) == 16
            assert len({str(e) for e in errors}) == 1, "all failed back with the first error"
            assert errors[0].errno == errno.ETIMEDOUT and "failfast" in str(errors[0])
            assert vol.stats.failfast_trips == 1
            # Tripped: a new FAILFAST request fails at once, without reaching the server.
            try:
                await failfast_io(
                    vol, Bio.from_buffer(Op.READ, 0, bytearray(4096), flags=BioFlags.FAILFAST), via
                )
            except BlockError as exc:
                assert str(exc) == str(errors[0])
            else:
                raise AssertionError("a tripped volume took a FAILFAST request")
            server.kill(signal.SIGCONT)
            with trio.fail_after(GUARD_S):
                # Without the flag: full retries; it is answered once the server runs again.
                buf = bytearray(4096)
                await vol.submit(Bio.from_buffer(Op.READ, 0, buf))
                await vol.wait_orphans_settled()
            assert buf == b"\x01" * 4096
            # The failed-back writes were on the wire: the server did them once it ran again.
            assert vol.stats.orphans == 16
            await failfast_io(
                vol, Bio.from_buffer(Op.WRITE, 0, b"\x02" * 4096, flags=BioFlags.FAILFAST), via
            )
            assert not vol.failfast_tripped
    finally:
        server.stop()


class BlackHole:
    """A TCP relay to ``target`` that can stop passing bytes while keeping both connections
    open (a black-holed network), then pass what it held (hold-then-release)."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.held = False
        self._released = trio.Event()

    def hold(self) -> None:
        self.held, self._released = True, trio.Event()

    def release(self) -> None:
        self.held = False
        self._released.set()

    async def serve(self, *, task_status: trio.TaskStatus[Address]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        task_status.started(Address("127.0.0.1", port))
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(self.target.host, self.target.port) as up:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, up, nursery.cancel_scope)
                nursery.start_soon(self._pump, up, client, nursery.cancel_scope)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(65536):
                while self.held:
                    await self._released.wait()
                await dst.send_all(data)
        except trio.BrokenResourceError:
            pass
        scope.cancel()


async def test_a_black_holed_leg_is_dropped_and_resynced_after_its_held_writes(
    tmp_path: Path,
) -> None:
    async with (
        running_server(tmp_path / "a", node_id="a") as a,
        running_server(tmp_path / "b", node_id="b") as b,
        trio.open_nursery() as nursery,
    ):
        assert a.listen_address is not None and b.listen_address is not None
        hole = BlackHole(b.listen_address)
        relay = await nursery.start(hole.serve)
        legs = (a.listen_address, relay)
        async with open_mirror(legs, "vol0", state_dir=tmp_path / "state") as mirror:
            for i in range(16):
                data = bytes([i + 1]) * 65536
                await mirror.submit(Bio.from_buffer(Op.WRITE, i * MiB, data))
            hole.hold()

            async def overwrite(i: int) -> None:
                data = bytes([0x80 + i]) * 8192
                await mirror.submit(Bio.from_buffer(Op.WRITE, i * MiB + 4096, data))

            with trio.fail_after(GUARD_S):
                async with trio.open_nursery() as writers:  # no write may fail
                    for i in range(16):
                        writers.start_soon(overwrite, i)
            assert mirror.state(1) is LegState.ERRED and "failfast" in mirror.legs[1].reason
            for i in range(16):  # newer data over what B still holds undelivered
                data = bytes([0xC0 + i]) * 8192
                await mirror.submit(Bio.from_buffer(Op.WRITE, i * MiB + 4096, data))
            dirty = mirror.legs[1].bitmap.dirty_bytes
            assert dirty == 16 * 64 * 1024
            # The held (older) writes reach B now; B must be resynced only after they landed,
            # or they would undo the copy of the newer data.
            hole.release()
            with trio.fail_after(GUARD_S):
                while mirror.state(1) is not LegState.IN_SYNC:
                    await mirror.wait_changed()
            assert mirror.legs[1].resynced_bytes == dirty
            await mirror.submit(Bio(Op.FLUSH, 0, 0))
        nursery.cancel_scope.cancel()
    assert filecmp.cmp(tmp_path / "a" / "vol0.img", tmp_path / "b" / "vol0.img", shallow=False)


async def test_a_held_failfast_send_that_stalls_breaks_its_link_at_the_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Started FAILFAST writes wait in the caller's plug; the flush that sends them must not
    # outlive their deadline when the socket stops draining (a black-holed network), or the
    # caller — the bridge's reader, serving every leg — would hang with it.  Keepalive is
    # off the table here (dead_after_s of an hour): only the deadline can end the send.
    async with (
        running_server(tmp_path / "a", node_id="a") as a,
        trio.open_nursery() as nursery,
    ):
        assert a.listen_address is not None
        hole = BlackHole(a.listen_address)
        relay = await nursery.start(hole.serve)
        async with open_remote(
            relay, "vol0", failfast_timeout_s=1.0, keepalive_s=3600, dead_after_s=3600
        ) as vol:
            hole.hold()
            plug, data = Plug(), bytes(MiB)
            txns = [  # 48 MiB: more than the sockets on the way can buffer
                await vol.start(
                    Bio.from_buffer(Op.WRITE, i * MiB, data, flags=BioFlags.FAILFAST), plug
                )
                for i in range(48)
            ]
            errors = []
            with trio.fail_after(GUARD_S):
                await plug.flush()
                for txn in txns:
                    with pytest.raises(BlockError) as caught:
                        await txn.wait()
                    errors.append(caught.value.errno)
                while "event=disconnected" not in caplog.text:
                    await trio.sleep(0.05)
            assert set(errors) <= {errno.ETIMEDOUT, errno.ENOTCONN}
            assert "event=disconnected reason='send cancelled'" in caplog.text
            hole.release()
        nursery.cancel_scope.cancel()


def test_bad_mirror_flags_and_no_reachable_leg_are_one_line_errors(tmp_path: Path) -> None:
    dst = [sys.executable, "-m", "dst", "nbd", "--listen", f"127.0.0.1:{free_port()}"]
    dst += ["--volume", "vol0", "--insecure", "--mirror", "--state-dir", str(tmp_path)]
    dead = ["--server", f"127.0.0.1:{free_port()}", "--server", f"127.0.0.1:{free_port()}"]
    for bad in ("-1", "soon", "inf"):
        out = subprocess.run(
            [*dst, *dead, "--failfast-timeout", bad], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 2 and f"--failfast-timeout {bad!r}" in out.stderr, out.stderr
    out = subprocess.run(dst + dead, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no mirror leg is reachable" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
