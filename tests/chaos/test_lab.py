"""The multi-host lab: servers a and b and the NBD bridge as separate processes in their own
network namespaces, started from deploy/examples/*.toml with mutual TLS. Partitions are
silent (the host's switch port down: no RST), as a cut cable or a dead switch port is."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from lab import Lab, lab_namespaces, pid_alive

from tests.chaos.checker import Result, check
from tests.chaos.history import load
from tests.integration.harness import same_files

LAB_PY = Path(__file__).resolve().parents[2] / "deploy" / "lab" / "lab.py"
MiB = 1 << 20

REGION = 16 * MiB  # the chaos workload's region: what partitions leave out of sync


class LabLoad:
    """Chaos workloads (tests/chaos/workload.py) on the bridge host, through its NBD export
    over STARTTLS; then the chaos checker over their histories, the primary's data and both
    replicas, with the run's figures printed in the chaos format."""

    def __init__(self, lab: Lab, seed: int, seconds: float, writers: int = 2) -> None:
        self.lab, self.seed = lab, seed
        self.faults: Counter[str] = Counter()
        self.heals: list[float] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.histories = [lab.dir / f"history-{w}.jsonl" for w in range(1, writers + 1)]
        env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
        env["PYTHONPATH"] = str(LAB_PY.parents[2])
        for w, hist in enumerate(self.histories, 1):
            argv = ["ip", "netns", "exec", lab.ns("bridge"), sys.executable, "-m"]
            argv += ["tests.chaos.workload", "--target", "nbd://127.0.0.1:10809/vol0"]
            argv += ["--tls", str(lab.pki / "app"), "--writer", str(w), "--seed", str(seed)]
            argv += ["--history", str(hist), "--duration", str(seconds), "--region", str(REGION)]
            with open(lab.dir / f"workload-{w}.log", "ab") as log:
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env=env))

    def __enter__(self) -> LabLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    def wait(self, timeout_s: float = 90) -> None:
        for proc in self.procs:
            assert proc.wait(timeout_s) == 0, (self.lab.dir / "workload-1.log").read_text()

    def partition(self, host: str) -> None:
        self.lab.partition(host)
        self.faults[f"silent partition {host}"] += 1

    def heal(self, host: str) -> None:
        self.lab.heal(host)
        self.heals.append(time.monotonic())

    def check(
        self, in_sync_s: float, dirty_bytes: int | None = None, resync_bytes: int | None = None
    ) -> Result:
        """Every TESTING.md invariant over what the workloads saw and what the pair holds."""
        ops = load(self.histories)
        with open(self.lab.data_file("a"), "rb") as img:
            image = img.read(REGION)
        replicas = [self.lab.data_file("a"), self.lab.data_file("b")]
        result = check(
            ops, image, replicas=replicas, dirty_bytes=dirty_bytes, resync_bytes=resync_bytes
        )
        acks = sorted(op.completed for op in ops if op.op == "write" and op.ok and op.completed)
        resume = [next((a - h for a in acks if a > h), None) for h in self.heals]
        slowest = max(op.completed - op.invoked for op in ops if op.ok and op.completed)
        print(f"\nseed: {self.seed}\nfaults injected: {dict(self.faults)}")
        for key, value in result.figures().items():
            print(f"{key}: {value}")
        print(f"slowest acknowledged operation: {slowest:.2f}s")
        print(
            "time to resume after heal: "
            + ", ".join("-" if r is None else f"{r:.2f}s" for r in resume)
            + f"; in sync {in_sync_s:.1f}s after the last heal"
        )
        print(f"verdict: {'OK' if result.ok else 'VIOLATIONS'}")
        assert result.ok, result.violations[:10]
        self.slowest = slowest
        return result


def start_all(lab: Lab) -> None:
    lab.start("b")
    lab.start("a")
    lab.wait_in_sync("a")
    lab.start("bridge")  # it exits when no server answers at start (systemd restarts it)
    lab.wait_nbd()


def no_lab_left(lab: Lab) -> None:
    assert not [ns for ns in lab_namespaces() if ns.startswith(lab.prefix + "-")]


def test_lab_comes_up_from_the_example_configs(tmp_path: Path) -> None:
    with Lab(tmp_path) as lab:
        start_all(lab)
        doc = lab.status("a")
        assert doc["role"] == "primary"
        assert doc["volumes"]["vol0"]["peer_disk"] == "up-to-date"
        src, back = tmp_path / "src.bin", tmp_path / "back.bin"
        src.write_bytes(os.urandom(8 * MiB))
        lab.exec("bridge", ["nbdcopy", str(src), lab.nbd_uri()])
        lab.exec("bridge", ["nbdcopy", lab.nbd_uri(), str(back)])
        assert back.read_bytes()[: 8 * MiB] == src.read_bytes()
        lab.wait_in_sync("a")
        assert same_files(lab.data_file("a"), lab.data_file("b"))
    no_lab_left(lab)


def test_silent_partition_of_the_secondary_under_write_load(tmp_path: Path) -> None:
    with Lab(tmp_path) as lab:
        start_all(lab)
        with LabLoad(lab, seed=1, seconds=15) as work:
            work.partition("b")
            # longer than the peer request timeout (10 s): the primary must degrade, not stall
            work.wait()
            vol = lab.status("a")["volumes"]["vol0"]
            assert vol["connection"] != "connected"
            dirty = vol["out_of_sync_bytes"]
            assert 0 < dirty <= REGION  # only the extents written while degraded
            work.heal("b")
            after = lab.wait_in_sync("a", timeout_s=50)["volumes"]["vol0"]
            lab.kill("bridge")
            resync = after["resync"]["total_bytes"]
            work.check(time.monotonic() - work.heals[-1], dirty_bytes=dirty, resync_bytes=resync)
            assert work.slowest < 14  # one stall of about the peer timeout, then degraded
    no_lab_left(lab)


def test_flapping_secondary_link_under_load(tmp_path: Path) -> None:
    rng = random.Random(7)
    with Lab(tmp_path) as lab:
        start_all(lab)
        with LabLoad(lab, seed=2, seconds=20) as work:
            for _ in range(5):
                time.sleep(rng.uniform(0.5, 2))
                work.partition("b")
                time.sleep(rng.uniform(0.5, 3))
                work.heal("b")
            work.wait()
            lab.wait_in_sync("a", timeout_s=50)
            lab.kill("bridge")
            result = work.check(time.monotonic() - work.heals[-1])
            assert result.writes_acked > 0
    no_lab_left(lab)


def test_teardown_after_a_failure_inside_the_lab(tmp_path: Path) -> None:
    pids = []
    with pytest.raises(RuntimeError, match="boom"), Lab(tmp_path) as lab:
        pids = [lab.start("b").pid, lab.start("a").pid]
        raise RuntimeError("boom")
    assert pids
    no_lab_left(lab)
    assert not [pid for pid in pids if pid_alive(pid)]


def test_clean_removes_the_namespaces_of_dead_runs_only() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    leftover, mine = f"dstlab{int(dead.stdout)}-a", f"dstlab{os.getpid()}-keep"
    for ns in (leftover, mine):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run([sys.executable, str(LAB_PY), "clean"], check=True, capture_output=True)
        left = lab_namespaces()
        assert leftover not in left
        assert mine in left
    finally:
        for ns in (leftover, mine):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    assert signal.SIGKILL  # the lab kills by pid; nothing here to kill
