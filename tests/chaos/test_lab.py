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
from pathlib import Path

import pytest
from lab import Lab, lab_namespaces, pid_alive

from tests.integration.harness import same_files

LAB_PY = Path(__file__).resolve().parents[2] / "deploy" / "lab" / "lab.py"
MiB = 1 << 20

# Random 64 KiB writes in the first 16 MiB for SECONDS, a flush every 16; prints the bytes
# and the slowest write (with its flush).
LOAD = """
import os, random, sys, time
rng = random.Random(int(sys.argv[2]))
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
end, total, n, worst = time.monotonic() + float(sys.argv[3]), 0, 0, 0.0
while time.monotonic() < end:
    t = time.monotonic()
    h.pwrite(os.urandom(65536), rng.randrange(256) * 65536)
    total, n = total + 65536, n + 1
    if n % 16 == 0:
        h.flush()
    worst = max(worst, time.monotonic() - t)
h.flush()
print(total, worst)
"""


def load_argv(lab: Lab, seed: int, seconds: float) -> list[str]:
    return [
        "nbdsh",
        "-c",
        "import sys",
        "-c",
        LOAD.replace("sys.argv[1]", repr(lab.nbd_uri()))
        .replace("int(sys.argv[2])", str(seed))
        .replace("float(sys.argv[3])", str(seconds)),
    ]


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
        lab.partition("b")
        # longer than the peer request timeout (10 s): the primary must degrade, not stall
        out = lab.exec("bridge", load_argv(lab, 1, 15), timeout_s=60).stdout.split()
        written, stall = int(out[0]), float(out[1])
        assert stall < 14  # one stall of about the peer timeout, then degraded writes
        vol = lab.status("a")["volumes"]["vol0"]
        assert vol["connection"] != "connected"
        dirty = vol["out_of_sync_bytes"]
        assert 0 < dirty <= 16 * MiB  # only the extents written while degraded
        healed = time.monotonic()
        lab.heal("b")
        after = lab.wait_in_sync("a", timeout_s=50)["volumes"]["vol0"]
        resumed = time.monotonic() - healed
        print(
            f"lab partition: written {written} B, longest write {stall:.1f} s, "
            f"out of sync {dirty} B, "
            f"resync total {after['resync']['total_bytes']} B, in sync {resumed:.1f} s "
            f"after heal"
        )
        lab.kill("bridge")
        assert same_files(lab.data_file("a"), lab.data_file("b"))
    no_lab_left(lab)


def test_flapping_secondary_link_under_load(tmp_path: Path) -> None:
    rng = random.Random(7)
    with Lab(tmp_path) as lab:
        start_all(lab)
        argv = ["ip", "netns", "exec", lab.ns("bridge"), *load_argv(lab, 2, 20)]
        env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
        load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            for _ in range(5):
                time.sleep(rng.uniform(0.5, 2))
                lab.partition("b")
                time.sleep(rng.uniform(0.5, 3))
                lab.heal("b")
            out, err = load.communicate(timeout=60)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        assert load.returncode == 0, err.decode(errors="replace")
        written, stall = int(out.split()[0]), float(out.split()[1])
        assert written > 0
        healed = time.monotonic()
        lab.wait_in_sync("a", timeout_s=50)
        print(
            f"lab flapping: written {written} B, longest write {stall:.1f} s, "
            f"in sync {time.monotonic() - healed:.1f} s "
            "after the last heal"
        )
        lab.kill("bridge")
        assert same_files(lab.data_file("a"), lab.data_file("b"))
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
