"""The state and plumbing every chaos run shares: the processes it started, the workloads
and their histories, starting and awaiting servers, failing over, the run's figures
(:class:`Report`) and the final check.  runner.py drives the faults; hazards.py holds the
runs that need more than a kill (migration, the mirror, proxied links, split brain).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dst.admin import fetch_status, promote
from dst.errors import BlockError
from tests.chaos.checker import Discard, Fence, Result, check
from tests.chaos.history import Op, load
from tests.chaos.proxy import FaultProxy
from tests.chaos.schedules import Fault, Schedule
from tests.integration.harness import DstProcess, ServerProcess

#: Every chaos server's store declares older DRBD's 32 KiB boundary, so a write that straddles
#: it is a transaction of several commands on every link (client -> primary -> secondary, and
#: the mirror bridge's legs): a kill or a fault can land between them.
SERVER_ARGS = ("--boundary", "32K")


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
    #: bridges that logged event=fenced: their claim or writes refused as of an old epoch
    bridges_fenced: int = 0
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
            f"bridges fenced: {self.bridges_fenced}",
            f"slowest acknowledged write: {self.slowest_write_s:.2f}s",
            f"resync bytes after heal: {self.resync_bytes}",
            "time to resume after heal: "
            + (f"max {max(self.resume_s):.2f}s" if self.resume_s else "-"),
            f"run time: {self.elapsed_s:.1f}s",
            f"verdict: {'OK' if r.ok else 'VIOLATIONS'}",
        ]
        lines += [f"  invariant {v.invariant}: {v.what}" for v in r.violations[:20]]
        return "\n".join(lines)


class RunCore:
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

    async def primary_died_at(self, point: str) -> bool:
        """Wait (20 s at most) for the primary, armed at crash point ``point``, to die there:
        counted as a fault (or as not reached), the kill's straddle noted, and the arming
        cleared so that it restarts clean."""
        if not await self.wait_death(self.primary, 20):
            self.report.faults["crash point not reached primary"] += 1
            return False
        self.report.faults[f"crash-point primary {point}"] += 1
        self.report.straddled += self.in_flight_writes() > 0
        self.primary.env.pop("DST_CRASH_AT")
        return True

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
            "--peer", str(self.secondary.address), "--role", "secondary", *SERVER_ARGS,
        )  # fmt: skip
        self.servers.append(back)
        self.primary, self.secondary = self.secondary, back

    async def volume_epoch(self) -> int:
        doc = await fetch_status(self.primary.address, None)
        return int(doc["volumes"]["vol0"]["epoch"])

    async def load_with_faults(self, faults: list[Fault]) -> None:
        """Start the workloads, apply ``faults`` at their planned times (a crash point's when
        the code reaches it), and wait for the workloads to end."""
        crash = self.s.crash_point is not None
        self.t0 = time.monotonic()
        for _ in range(self.s.workloads):
            self.start_workload(self.s.window_s)
        for f in faults:
            if not crash or self.s.migration:  # takeover.mid is reached in the takeover
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

    async def fault(self, fault: Fault, crash: bool) -> None:
        raise NotImplementedError  # runner.Run

    async def _run(self) -> None:
        raise NotImplementedError  # runner.Run
