"""Carry out a chaos schedule against a real replicated pair and check what came out.

The runner starts a pair of ``dst serve`` processes (harness.pair_processes), workload
processes (tests/chaos/workload.py) writing through the client to whichever side is
primary, applies the schedule's kills, heals (restart, or promote the secondary and bring the
old primary back as its secondary), waits for resync (harness.wait_in_sync), and runs the
checker over every history, the primary's final data and both replica files.  Every process
it starts is killed by pid in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dst.admin import fetch_status, promote, resolve
from dst.block.faults import FAULTS_ENV, power_loss, write_spec
from dst.errors import BlockError
from dst.net.endpoints import Address
from tests.chaos.checker import Discard, Fence, Result, check
from tests.chaos.history import Op, load
from tests.chaos.proxy import FaultProxy
from tests.chaos.schedules import Fault, Schedule
from tests.integration.harness import (
    DstProcess,
    ServerProcess,
    bridge_process,
    free_port,
    pair_processes,
    wait_in_sync,
)


@dataclass
class Report:
    schedule: Schedule
    result: Result = field(default_factory=Result)
    faults: Counter[str] = field(default_factory=Counter)
    straddled: int = 0
    resume_s: list[float] = field(default_factory=list)
    resync_bytes: int = 0
    elapsed_s: float = 0.0
    #: writes the servers refused as fenced (ESTALE; an NBD client only sees EIO)
    stale_refused: int = 0
    slowest_write_s: float = 0.0

    def figures(self) -> str:
        r = self.result
        lines = [
            f"seed: {self.schedule.seed}",
            f"schedule: {self.schedule.describe()}",
            f"faults injected: {dict(self.faults) or 'none'}",
            f"kills that straddled in-flight writes: {self.straddled}",
            *(f"{k}: {v}" for k, v in r.figures().items()),
            f"fenced writes refused by the servers: {self.stale_refused}",
            f"slowest acknowledged write: {self.slowest_write_s:.2f}s",
            f"resync bytes after heal: {self.resync_bytes}",
            "time to resume after heal: "
            + (f"max {max(self.resume_s):.2f}s" if self.resume_s else "-"),
            f"run time: {self.elapsed_s:.1f}s",
            f"verdict: {'OK' if r.ok else 'VIOLATIONS'}",
        ]
        lines += [f"  invariant {v.invariant}: {v.what}" for v in r.violations[:20]]
        return "\n".join(lines)


class Run:
    def __init__(self, schedule: Schedule, workdir: Path) -> None:
        self.s = schedule
        self.dir = workdir
        self.report = Report(schedule)
        self.fences: list[Fence] = []
        self.servers: list[ServerProcess] = []
        self.workloads: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
        self.histories: list[Path] = []
        self.next_writer = 1
        self.t0 = 0.0
        self.bridge: DstProcess | None = None
        self.others: list[DstProcess] = []  # bridges started by a takeover
        self.proxy: FaultProxy | None = None  # on the replication link (proxy-replication)
        self.power_cuts: list[float] = []  # when every replica lost power at once
        self.discards: list[Discard] = []  # what split-brain resolutions threw away
        self.back_proxy: FaultProxy | None = None  # secondary -> primary (split-brain)
        #: the epoch the bridge in use writes at, for the workloads' histories (migration)
        self.epoch: int | None = None
        self.primary: ServerProcess
        self.secondary: ServerProcess

    # -- workloads -----------------------------------------------------------------------

    def start_workload(self, duration: float, servers: str | None = None) -> None:
        """A workload process writing for ``duration`` through the bridge, or as a dst client
        of ``servers`` (default: both; it follows the primary)."""
        w = self.next_writer
        self.next_writer += 1
        hist = self.dir / f"history-{w}.jsonl"
        servers = servers or f"{self.primary.address},{self.secondary.address}"
        target = f"dst://{servers}/vol0"
        if self.bridge is not None:
            target = f"nbd://{self.bridge.address}/vol0"
        argv = [sys.executable, "-m", "tests.chaos.workload", "--target", target]
        argv += ["--writer", str(w), "--seed", str(self.s.seed), "--history", str(hist)]
        argv += ["--duration", f"{max(duration, 0.5):.2f}", "--region", str(self.s.region)]
        if self.epoch is not None:
            argv += ["--epoch", str(self.epoch)]
        with open(self.dir / f"workload-{w}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log)
        self.workloads[w] = (proc, hist)
        self.histories.append(hist)

    def in_flight_writes(self) -> int:
        live = [h for p, h in self.workloads.values() if p.poll() is None and h.exists()]
        return sum(1 for op in load(live) if op.op == "write" and op.ok is None)

    def first_ack_after(self, t: float) -> float | None:
        acks = [
            op.completed
            for op in load(h for h in self.histories if h.exists())
            if op.op == "write" and op.ok
        ]
        later = [a for a in acks if a is not None and a > t]
        return min(later) - t if later else None

    # -- servers ---------------------------------------------------------------------------

    async def start(self, sp: ServerProcess) -> None:
        if self.s.broken:
            sp.env["DST_BROKEN"] = self.s.broken
        await trio.to_thread.run_sync(sp.start)

    async def wait_death(self, sp: ServerProcess, timeout_s: float) -> bool:
        assert sp.proc is not None
        with trio.move_on_after(timeout_s):
            while sp.proc.poll() is None:
                await trio.sleep(0.02)
            return True
        return False

    async def fail_over(self) -> None:
        """The primary is dead: promote the secondary, the old primary rejoins as secondary."""
        with trio.fail_after(20):
            while True:
                try:
                    await promote(self.secondary.address, "vol0", None, force=False)
                    break
                except (BlockError, OSError):
                    await trio.sleep(0.1)  # EBUSY until it notices the primary is gone
        doc = await fetch_status(self.secondary.address, None)
        self.fences.append(Fence(time.monotonic(), int(doc["volumes"]["vol0"].get("epoch", 0))))
        old = self.primary
        back = ServerProcess(
            old.data_dir, old.address.port, "vol0=64M",
            self.dir / f"rejoin-{len(self.servers)}.log",
            "--peer", str(self.secondary.address), "--role", "secondary",
        )  # fmt: skip
        self.servers.append(back)
        self.primary, self.secondary = self.secondary, back

    async def volume_epoch(self) -> int:
        doc = await fetch_status(self.primary.address, None)
        return int(doc["volumes"]["vol0"]["epoch"])

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
        await trio.to_thread.run_sync(b.start)  # it listens once it holds the volume
        self.epoch = await self.volume_epoch()
        self.fences.append(Fence(time.monotonic(), self.epoch))
        self.report.faults["takeover by bridge B"] += 1
        self.bridge = b
        self.start_workload(self.s.window_s - (time.monotonic() - self.t0))
        await trio.sleep(fault.down_s + 0.5)
        a.kill(signal.SIGCONT)
        return time.monotonic()

    def cut_power(self, victim: ServerProcess, kind: str) -> None:
        """``victim`` (killed) loses every write its store had not synced (dst/block/faults.py)."""
        if FAULTS_ENV not in victim.env:
            return  # a process started without the storage shim (rejoined after a failover)
        journal = victim.data_dir.parent / f"{victim.data_dir.name}.journal"
        lost = power_loss(victim.data_dir / "vol0.img", journal, torn_seed=self.s.seed)
        self.report.faults[f"power loss {kind}"] += 1
        self.report.faults["unsynced writes rolled back"] += lost.writes_rolled_back

    async def fault(self, fault: Fault, crash: bool) -> None:
        kind = self.s.target
        if kind not in ("disk", "bridge-takeover", "link", "leg", "split"):
            self.report.faults[f"{'crash-point' if crash else 'SIGKILL'} {kind}"] += 1
        if kind == "bridge-takeover":
            heal = await self.take_over(fault)
        elif kind == "link":
            heal = await self.frame_faults(fault)
        elif kind == "split":
            heal = await self.split_brain(fault)
        elif kind == "leg":
            heal = await self.freeze_leg(fault)
        elif kind == "disk":
            # bad blocks under the first quarter of the region on the primary, then healed
            spec = self.dir / "faults.json"
            write_spec(spec, eio_read=[[0, self.s.region // 4]])
            self.report.faults["EIO read range primary"] += 1
            await trio.sleep(fault.down_s + 1.0)
            write_spec(spec)
            heal = time.monotonic()
        elif kind == "bridge":
            assert self.bridge is not None
            self.report.straddled += self.in_flight_writes() > 0
            self.bridge.kill(signal.SIGKILL)
            await trio.sleep(fault.down_s)
            await trio.to_thread.run_sync(self.bridge.start)
            heal = time.monotonic()
        elif kind == "workload":
            w = max(k for k, (p, _) in self.workloads.items() if p.poll() is None)
            proc, _ = self.workloads[w]
            self.report.straddled += self.in_flight_writes() > 0
            proc.kill()
            proc.wait(10)
            await trio.sleep(fault.down_s)
            heal = time.monotonic()
            self.start_workload(self.s.window_s - (heal - self.t0))
        elif kind == "both":
            await wait_in_sync(self.primary.address, timeout_s=30)
            self.report.straddled += self.in_flight_writes() > 0
            # the primary first: once it is dead no acknowledgement can leave it, so every
            # acknowledged write must already be on the secondary when that dies too
            self.primary.kill(signal.SIGKILL)
            self.secondary.kill(signal.SIGKILL)
            if self.s.power_loss:  # both lose what they had not synced; both come back
                self.power_cuts.append(time.monotonic())
                self.cut_power(self.primary, "primary")
                self.cut_power(self.secondary, "secondary")
                await trio.sleep(fault.down_s)
                await self.start(self.secondary)
                await self.start(self.primary)
                heal = time.monotonic()
            else:
                await trio.sleep(fault.down_s)
                await self.start(self.secondary)
                await self.fail_over()
                heal = time.monotonic()
                await self.start(self.secondary)
        else:
            victim = self.primary if kind == "primary" else self.secondary
            if kind == "primary" and self.s.name.endswith("-promote"):
                # only an in-sync secondary may be promoted (dst refuses one mid-resync)
                await wait_in_sync(self.primary.address, timeout_s=30)
            if crash:
                if not await self.wait_death(victim, self.s.window_s):
                    self.report.faults[f"crash point not reached {kind}"] += 1
                    return
            else:
                self.report.straddled += self.in_flight_writes() > 0
                victim.kill(signal.SIGKILL)
            if self.s.power_loss:
                self.cut_power(victim, kind)
            if crash:
                self.report.straddled += self.in_flight_writes() > 0
            victim.env.pop("DST_CRASH_AT", None)
            await trio.sleep(fault.down_s)
            if kind == "primary" and self.s.name.endswith("-promote"):
                await self.fail_over()
                heal = time.monotonic()
                await self.start(self.secondary)
            else:
                await self.start(victim)
                heal = time.monotonic()
            if self.s.resync_interrupted and "DST_CRASH_AT" in self.primary.env:
                heal = await self.resync_source_dies()
        # time to resume: the first write acknowledged after the heal (a client backing off
        # between reconnects may take a while; give up when the workloads have ended)
        with trio.move_on_after(15):
            while True:
                await trio.sleep(0.25)
                resume = self.first_ack_after(heal)
                if resume is not None:
                    self.report.resume_s.append(resume)
                    break
                if all(p.poll() is not None for p, _ in self.workloads.values()):
                    break

    async def resync_source_dies(self) -> float:
        """The secondary is back and being resynced; the primary, armed at resync.mid,
        dies after copying some extents; it restarts (still primary) and the resync goes
        on from what its bitmap still says.  Returns when it was restarted."""
        if not await self.wait_death(self.primary, 20):
            self.report.faults["crash point not reached primary"] += 1
            return time.monotonic()
        self.report.faults["crash-point primary resync.mid"] += 1
        self.report.straddled += self.in_flight_writes() > 0
        self.primary.env.pop("DST_CRASH_AT")
        await trio.sleep(0.2)
        await self.start(self.primary)
        return time.monotonic()

    async def run(self) -> Report:
        if self.s.target == "leg":
            return await self.run_mirror()
        began = time.monotonic()
        with pair_processes(self.dir) as (primary, secondary):
            self.primary, self.secondary = primary, secondary
            self.servers = [primary, secondary]
            try:
                if self.s.name in ("kill-bridge", "migration"):
                    with bridge_process(
                        self.dir, primary.address, "vol0", "--server", str(secondary.address)
                    ) as self.bridge:
                        await self._run()
                elif self.s.target in ("link", "split"):
                    await self._run_behind_proxy()
                else:
                    await self._run()
            finally:
                self.stop_all()
        self.report.elapsed_s = time.monotonic() - began
        return self.report

    async def load_with_faults(self, faults: list[Fault]) -> None:
        """Start the workloads, apply ``faults`` at their planned times (a crash point's when
        the code reaches it), and wait for the workloads to end."""
        crash = self.s.crash_point is not None
        self.t0 = time.monotonic()
        for _ in range(self.s.workloads):
            self.start_workload(self.s.window_s)
        for f in faults:
            if not crash:
                await trio.sleep(max(0.0, self.t0 + f.at - time.monotonic()))
            await self.fault(f, crash=crash)
        with trio.fail_after(self.s.window_s + 90):
            for proc, _ in list(self.workloads.values()):
                await trio.to_thread.run_sync(proc.wait)

    def stop_all(self) -> None:
        """Kill by pid every process this run started (also when it failed)."""
        for bridge in self.others:
            bridge.stop()
        for proc, _ in self.workloads.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for sp in self.servers:
            sp.stop()

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
            ServerProcess(self.dir / n, free_port(), "vol0=64M", self.dir / f"{n}.log")
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
        """Damage the replication link's frames for a while, reset it, heal; returns when
        healed.  Every flipped bit must be caught by a crc and break the link, every copy
        be refused; the primary degrades, relinks and resyncs what the peer may lack."""
        assert self.proxy is not None
        self.report.straddled += self.in_flight_writes() > 0
        for d in (self.proxy.upstream, self.proxy.downstream):
            d.bitflip_p, d.duplicate_p, d.replay_p = 0.002, 0.02, 0.02
        await trio.sleep(fault.down_s * 3)
        self.proxy.reset()
        for d in (self.proxy.upstream, self.proxy.downstream):
            d.bitflip_p = d.duplicate_p = d.replay_p = 0.0
        return time.monotonic()

    async def _run(self) -> None:
        await self.start(self.secondary)
        await self.start(self.primary)
        await wait_in_sync(self.primary.address)
        if self.bridge is not None:
            await trio.to_thread.run_sync(self.bridge.start)
            if self.s.target == "bridge-takeover":
                self.epoch = await self.volume_epoch()
        cp = self.s.crash_point
        if self.s.power_loss or self.s.target == "disk":
            sides = [self.secondary if self.s.target == "secondary" else self.primary]
            if self.s.target == "both":
                sides = [self.primary, self.secondary]
            for side in sides:
                spec = self.dir / "faults.json"
                if len(sides) > 1:
                    spec = self.dir / f"faults-{side.data_dir.name}.json"
                journal = side.data_dir.parent / f"{side.data_dir.name}.journal"
                write_spec(spec, journal=str(journal)) if self.s.power_loss else write_spec(spec)
                side.env[FAULTS_ENV] = str(spec)
                await trio.to_thread.run_sync(side.stop)
                await self.start(side)
            await wait_in_sync(self.primary.address)
        if self.s.slow_secondary_s:
            spec = self.dir / "slow-secondary.json"
            write_spec(spec, slow_write_s=self.s.slow_secondary_s)
            self.secondary.env[FAULTS_ENV] = str(spec)
            await trio.to_thread.run_sync(self.secondary.stop)
            await self.start(self.secondary)
            await wait_in_sync(self.primary.address)
            self.report.faults["slow disk secondary"] += 1
        if cp is not None:
            side = self.primary if self.s.target == "primary" else self.secondary
            side.env["DST_CRASH_AT"] = f"{cp}:{self.s.crash_hit}"
            await trio.to_thread.run_sync(side.stop)
            await self.start(side)
            await wait_in_sync(self.primary.address)
        if self.s.resync_interrupted:
            self.primary.env["DST_CRASH_AT"] = f"resync.mid:{self.s.crash_hit}"
            await trio.to_thread.run_sync(self.primary.stop)
            await self.start(self.primary)
            await wait_in_sync(self.primary.address)
        one = cp or self.s.resync_interrupted or self.s.target in ("bridge-takeover", "split")
        await self.load_with_faults(self.s.faults[:1] if one else self.s.faults)
        for sp in (self.primary, self.secondary):
            if sp.proc is None or sp.proc.poll() is not None:
                await self.start(sp)
        doc = await wait_in_sync(self.primary.address, timeout_s=90)
        self.report.stale_refused = int(doc["requests"].get("stale_writes", 0))
        resync = doc["volumes"]["vol0"].get("resync") or {}
        self.report.resync_bytes = int(resync.get("total_bytes", 0))
        self.check()

    def check(self) -> None:
        with open(self.primary.data_dir / "vol0.img", "rb") as img:
            image = img.read(self.s.region)
        ops: list[Op] = load(h for h in self.histories if h.exists())
        self.report.slowest_write_s = max(
            (
                op.completed - op.invoked
                for op in ops
                if op.op == "write" and op.ok and op.completed
            ),
            default=0.0,
        )
        self.report.result = check(
            ops,
            image,
            fences=self.fences,
            replicas=[self.primary.data_dir / "vol0.img", self.secondary.data_dir / "vol0.img"],
            power_cuts=self.power_cuts,
            discards=self.discards,
        )


async def run_schedule(schedule: Schedule, workdir: Path) -> Report:
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    return await Run(schedule, workdir).run()
