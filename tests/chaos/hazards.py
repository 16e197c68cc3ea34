"""Chaos runs that need more than a kill: the migration hazard (seed 002, with or without
the primary dying mid-takeover), the failfast mirror's frozen leg (seed 004), frame faults
on the replication link, and a split brain behind two fault proxies.
"""

from __future__ import annotations

import json
import signal
import time

import trio

from dst.admin import promote, resolve
from dst.errors import BlockError
from dst.net.endpoints import Address
from tests.chaos.checker import Discard, Fence
from tests.chaos.core import SERVER_ARGS, Report, RunCore
from tests.chaos.proxy import FaultProxy
from tests.chaos.schedules import Fault
from tests.integration.harness import DstProcess, ServerProcess, bridge_process, free_port


class Hazards(RunCore):
    async def take_over(self, fault: Fault) -> float:
        """Seed 002: bridge A frozen with writes in flight; B claims the volume with
        --takeover (the fence: epoch persisted on both replicas, older writes drained) and a
        workload writes through B; A resumed, its late writes must bounce.  Returns when A
        was resumed."""
        a = self.bridge
        assert a is not None
        self.report.straddled += self.in_flight_writes() > 0
        a.kill(signal.SIGSTOP)
        self.report.faults["SIGSTOP bridge A"] += 1
        address = Address("127.0.0.1", free_port())
        name = f"bridge-{len(self.others) + 2}"
        b = DstProcess(
            ["nbd", "--listen", str(address), "--server", str(self.primary.address),
             "--server", str(self.secondary.address), "--volume", "vol0", "--insecure",
             "--takeover", "--node-id", name],
            address,
            self.dir / f"{name}.log",
        )  # fmt: skip
        self.others.append(b)
        if self.s.crash_point:  # takeover.mid: the primary dies inside B's claim
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.start_bridge, b)
                await self.takeover_source_dies()
        else:
            await trio.to_thread.run_sync(b.start)  # it listens once it holds the volume
        self.epoch = await self.volume_epoch()
        self.fences.append(Fence(time.monotonic(), self.epoch))
        self.report.faults["takeover by bridge B"] += 1
        self.bridge = b
        self.start_workload(self.s.window_s - (time.monotonic() - self.t0))
        await trio.sleep(fault.down_s + 0.5)
        a.kill(signal.SIGCONT)
        return time.monotonic()

    async def start_bridge(self, bridge: DstProcess) -> None:
        """Start ``bridge``, again after it gave up (as systemd's Restart= would): a
        bridge whose servers all fail at start exits."""
        with trio.fail_after(60):
            while True:
                try:
                    return await trio.to_thread.run_sync(bridge.start)
                except RuntimeError:
                    bridge.stop()
                    await trio.sleep(0.5)

    async def takeover_source_dies(self) -> None:
        """The primary, armed at takeover.mid, dies once B's new epoch is fenced, drained and
        persisted on both replicas but before B hears so; the secondary is promoted, and B's
        claim, retried there, must still find A's epoch fenced."""
        if not await self.primary_died_at("takeover.mid"):
            return
        await self.fail_over()
        await self.start(self.secondary)

    # -- the failfast mirror (seed 004) ------------------------------------------------------

    def legs(self) -> list[dict[str, object]]:
        try:
            doc = json.loads((self.dir / "mirror-state" / "vol0.mirror.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        legs: list[dict[str, object]] = doc["legs"]
        return legs

    async def wait_leg_in_sync(self, timeout_s: float) -> dict[str, object]:
        with trio.fail_after(timeout_s):
            while True:
                legs = self.legs()
                if len(legs) == 2 and all(leg["state"] == "in_sync" for leg in legs):
                    return legs[1]
                await trio.sleep(0.1)

    async def run_mirror(self) -> Report:
        """Two plain servers (legs A and B, as ``primary`` and ``secondary``) behind a
        ``dst nbd --mirror`` bridge; the workloads write through the bridge; leg B is frozen
        past the failfast deadline and resumed; the checker reads leg A's file and compares
        both legs' files once B is back in sync."""
        began = time.monotonic()
        self.primary, self.secondary = (
            ServerProcess(
                self.dir / n, free_port(), "vol0=64M", self.dir / f"{n}.log", *SERVER_ARGS
            )
            for n in ("leg-a", "leg-b")
        )
        self.servers = [self.primary, self.secondary]
        extra = ["--server", str(self.secondary.address), "--mirror"]
        extra += ["--state-dir", str(self.dir / "mirror-state")]
        try:
            with bridge_process(self.dir, self.primary.address, "vol0", *extra) as self.bridge:
                for sp in self.servers:
                    await self.start(sp)
                await trio.to_thread.run_sync(self.bridge.start)
                await self.wait_leg_in_sync(30)
                await self.load_with_faults(self.s.faults[:1])
                leg = await self.wait_leg_in_sync(90)
                self.report.resync_bytes = int(leg["resynced_bytes"])  # type: ignore[call-overload]
        finally:
            self.stop_all()
        self.check()
        self.report.elapsed_s = time.monotonic() - began
        return self.report

    async def freeze_leg(self, fault: Fault) -> float:
        """Leg B frozen (SIGSTOP: its connection stays open, nothing answers) for longer than
        the failfast deadline (1 s), then resumed; returns when it was resumed."""
        self.report.straddled += self.in_flight_writes() > 0
        self.secondary.kill(signal.SIGSTOP)
        self.report.faults["SIGSTOP mirror leg"] += 1
        await trio.sleep(fault.down_s + 1.5)
        self.secondary.kill(signal.SIGCONT)
        return time.monotonic()

    async def _run_behind_proxy(self) -> None:
        """The primary replicates through a FaultProxy in front of the secondary (and, for a
        split brain, the secondary's peer address is a second one in front of the primary)."""
        self.proxy = FaultProxy(self.secondary.address, seed=self.s.seed)
        async with trio.open_nursery() as nursery:
            via = await nursery.start(self.proxy.serve)
            argv = self.primary.argv
            argv[argv.index("--peer") + 1] = str(via)
            if self.s.target == "split":
                self.back_proxy = FaultProxy(self.primary.address, seed=self.s.seed)
                back = await nursery.start(self.back_proxy.serve)
                argv = self.secondary.argv
                argv[argv.index("--peer") + 1] = str(back)
            await self._run()
            nursery.cancel_scope.cancel()
        for what, n in self.proxy.counts.items():
            self.report.faults[f"proxy {what}"] += n

    def partition(self, apart: bool) -> None:
        """Cut (or heal) both directions between the pair: every frame vanishes, handshakes
        too.  Either way the open connections are reset: cutting ends the links at once,
        healing ends the attempts stuck in a swallowed handshake."""
        for proxy in (self.proxy, self.back_proxy):
            assert proxy is not None
            for d in (proxy.upstream, proxy.downstream):
                d.spare_handshake = not apart
                d.blackhole = apart
            proxy.reset()

    async def split_brain(self, fault: Fault) -> float:
        """The pair is cut apart with the primary alive.  An unforced promote of the
        secondary must be refused (invariant 9); the operator forces it anyway and a client
        writes there while the old primary's clients write on it.  Healed, the sides must
        detect the split brain; the operator keeps the promoted side (``dst resolve``) and
        restarts the other as its secondary, which throws away what that side acknowledged
        while apart (told to the checker as a Discard).  Returns when resolved."""
        old, new = self.primary, self.secondary
        self.report.straddled += self.in_flight_writes() > 0
        losers = frozenset(w for w, (p, _) in self.workloads.items() if p.poll() is None)
        self.partition(True)
        apart = time.monotonic()
        self.report.faults["partition"] += 1
        with trio.fail_after(20):
            while True:
                try:
                    await promote(new.address, "vol0", None, force=False)
                    self.report.faults["unforced promote ALLOWED while the primary lives"] += 1
                    break
                except BlockError as exc:
                    if "may be alive" in str(exc) or "accepts connections" in str(exc):
                        self.report.faults["unforced promote refused"] += 1
                        break
                    await trio.sleep(0.1)  # still connected: the reset not seen yet
        await promote(new.address, "vol0", None, force=True)
        self.report.faults["forced promote"] += 1
        apart_s = fault.down_s * 2 + 1.0
        self.start_workload(apart_s, servers=str(new.address))
        await trio.sleep(apart_s)
        self.partition(False)
        with trio.move_on_after(20):
            while "split_brain_suspected" not in new.log_path.read_text():
                await trio.sleep(0.1)
            self.report.faults["split brain detected"] += 1
        await resolve(new.address, "vol0", None)
        old.kill(signal.SIGTERM)  # a clean stop: what it had under way finishes first
        await self.wait_death(old, 20)
        self.discards.append(Discard(losers, apart, time.monotonic()))
        old.argv[old.argv.index("--role") + 1] = "secondary"
        await self.start(old)
        self.primary, self.secondary = new, old
        return time.monotonic()

    async def frame_faults(self, fault: Fault) -> float:
        """Damage the replication link's frames for a while, then black-hole it, reset it,
        heal; returns when healed.  Every flipped bit must be caught by a crc and break the
        link, every copy be refused, a late frame only slow; a dropped or swallowed frame
        stalls its write until the link is declared dead (here: the reset); the primary
        degrades, relinks and resyncs what the peer may lack."""
        assert self.proxy is not None
        self.report.straddled += self.in_flight_writes() > 0
        both = (self.proxy.upstream, self.proxy.downstream)
        for d in both:
            d.bitflip_p, d.duplicate_p, d.replay_p = 0.002, 0.02, 0.02
            d.delay_s, d.drop_p = 0.005, 0.002
        await trio.sleep(fault.down_s * 3)
        for d in both:
            d.bitflip_p = d.duplicate_p = d.replay_p = d.delay_s = d.drop_p = 0.0
        self.proxy.upstream.blackhole = True  # silent: frames vanish, the connection stays
        await trio.sleep(fault.down_s)
        self.proxy.upstream.blackhole = False
        self.proxy.reset()  # only once every fault is off: the next handshake goes through
        return time.monotonic()
