"""Carry out a chaos schedule against a real replicated pair and check what came out.

The runner starts a pair of ``dst serve`` processes (harness.pair_processes), workload
processes (tests/chaos/workload.py) writing through the client to whichever side is
primary, applies the schedule's kills, heals (restart, or promote the secondary and bring the
old primary back as its secondary), waits for resync (harness.wait_in_sync), and runs the
checker over every history, the primary's final data and both replica files.  Every process
it starts is killed by pid in a ``finally``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import trio

from dst.block.faults import FAULTS_ENV, power_loss, write_spec
from tests.chaos.core import SERVER_ARGS, Report
from tests.chaos.hazards import Hazards
from tests.chaos.schedules import CRASH_SIDE, Fault, Schedule
from tests.integration.harness import ServerProcess, bridge_process, pair_processes, wait_in_sync

__all__ = ["Report", "Run", "run_schedule"]


class Run(Hazards):
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
        if not await self.primary_died_at("resync.mid"):
            return time.monotonic()
        await trio.sleep(0.2)
        await self.start(self.primary)
        return time.monotonic()

    async def run(self) -> Report:
        if self.s.target == "leg":
            return await self.run_mirror()
        began = time.monotonic()
        with pair_processes(self.dir, "vol0=64M", *SERVER_ARGS) as (primary, secondary):
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
            side = self.primary if CRASH_SIDE[cp] == "primary" else self.secondary
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
        logs = self.dir.glob("bridge*.log")
        self.report.bridges_fenced = sum(
            "event=fenced" in f.read_text(errors="replace") for f in logs
        )
        resync = doc["volumes"]["vol0"].get("resync") or {}
        self.report.resync_bytes = int(resync.get("total_bytes", 0))
        self.check()


async def run_schedule(schedule: Schedule, workdir: Path) -> Report:
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    return await Run(schedule, workdir).run()
