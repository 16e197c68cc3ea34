"""The whole stack as users run it: `dst serve` and `dst nbd` as processes, and real NBD
clients — nbdinfo, nbdcopy, qemu-img, qemu-io, nbdfuse + losetup + ext4 — as independent
peers.  Data is checked through the bridge and in the server's data file."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from tests.integration.harness import bridge_process, free_port, pair_processes
from tests.integration.nbdtools import run, text

MiB = 1 << 20


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(primary's data dir, NBD URI) for a 128 MiB volume replicated between two `dst serve`
    processes, behind a `dst nbd` that lists both servers and follows the primary."""
    with pair_processes(tmp_path, "vol0=128M") as (primary, secondary):
        secondary.start()
        primary.start()
        with bridge_process(
            tmp_path, secondary.address, "vol0", "--server", str(primary.address)
        ) as bp:
            bp.start()
            yield primary.data_dir, f"nbd://{bp.address}/vol0"


async def test_nbdinfo_reports_size_block_sizes_and_flags(stack: tuple[Path, str]) -> None:
    _, uri = stack
    info = json.loads((await run(["nbdinfo", "--json", uri])).stdout)
    export = info["exports"][0]
    assert export["export-name"] == "vol0"
    assert export["export-size"] == 128 * MiB
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] >= 4096
    assert export["block_size_maximum"] >= MiB
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False


async def test_nbdcopy_64mib_in_and_out(stack: tuple[Path, str], tmp_path: Path) -> None:
    data_dir, uri = stack
    src = tmp_path / "in.img"
    src.write_bytes(random.Random(1).randbytes(64 * MiB))
    await run(["nbdcopy", str(src), uri])
    out = tmp_path / "out.img"
    await run(["nbdcopy", uri, str(out)])
    assert out.stat().st_size == 128 * MiB
    with open(out, "rb") as f:
        assert f.read(64 * MiB) == src.read_bytes()
        assert f.read() == bytes(64 * MiB)
    # each replica's data file is the volume, byte for byte
    await run(["cmp", "-n", str(64 * MiB), str(src), str(data_dir / "vol0.img")])
    await run(["cmp", str(data_dir / "vol0.img"), str(data_dir.parent / "secondary" / "vol0.img")])


async def test_qemu_img_convert_and_compare(stack: tuple[Path, str], tmp_path: Path) -> None:
    _, uri = stack
    src = tmp_path / "disk.img"
    src.write_bytes(random.Random(2).randbytes(32 * MiB) + bytes(96 * MiB))
    await run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    result = await run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
    assert "Images are identical" in text(result)


@pytest.mark.parametrize(
    ("offset", "runs"),
    [
        (63 * 512, [512, 512, 512]),  # sector 63, odd 512-byte runs
        (63 * 512 + 31 * 1024, [512, 1024, 1536, 512]),  # crosses the 32 KiB multiple at 64 KiB
        (3 * 32768 - 1536, [2048, 512, 4096]),  # straddles 96 KiB
        (7 * 512, [4096, 512, 4096, 512]),  # 9 KiB misaligned
    ],
)
async def test_qemu_io_writev_and_read_misaligned(
    stack: tuple[Path, str], offset: int, runs: list[int]
) -> None:
    _, uri = stack
    total = sum(runs)
    cmds = [
        f"writev -P 0x5a {offset} {' '.join(map(str, runs))}",
        f"read -P 0x5a {offset} {total}",
        f"read -P 0 {offset - 512} 512",
        f"read -P 0 {offset + total} 512",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = text(await run([*args, uri]))
    assert "fail" not in out.lower(), out
    assert f"wrote {total}/{total} bytes at offset {offset}" in out, out
    assert f"read {total}/{total} bytes at offset {offset}" in out, out


async def test_ext4_on_a_sector_63_partition_through_nbdfuse_and_loop(
    stack: tuple[Path, str], tmp_path: Path
) -> None:
    """Seed 000's shape end to end: a filesystem on a partition at sector 63, through the NBD
    bridge and the 32 KiB-segmenting replication layer, issues misaligned multi-segment I/O;
    it is split, never refused, and the filesystem checks clean and reads back."""
    data_dir, uri = stack
    fuse_dir = tmp_path / "fuse"
    fs_dir = tmp_path / "fs"
    fuse_dir.mkdir()
    fs_dir.mkdir()
    files = {
        f"f{i}.bin": random.Random(i).randbytes(size)
        for i, size in enumerate([3 * MiB, 4097, 1 << 16, 12345])
    }
    log: list[str] = []
    with ExitStack() as cleanup:
        fuse = subprocess.Popen(["nbdfuse", str(fuse_dir), uri], stderr=subprocess.PIPE)
        cleanup.callback(_stop_fuse, fuse, fuse_dir)
        with trio.fail_after(20):
            while not (fuse_dir / "nbd").exists():
                await trio.sleep(0.05)
        loop = (
            (
                await run(
                    ["losetup", "-f", "--show", "--offset", str(63 * 512), str(fuse_dir / "nbd")]
                )
            )
            .stdout.decode()
            .strip()
        )
        cleanup.callback(subprocess.run, ["losetup", "-d", loop], check=False)
        log.append(text(await run(["mkfs.ext4", "-q", "-F", loop])))
        for round_ in range(2):
            await run(["mount", loop, str(fs_dir)])
            try:
                if round_ == 0:
                    for name, data in files.items():
                        (fs_dir / name).write_bytes(data)
                    await run(["sync", "-f", str(fs_dir)])
                else:
                    for name, data in files.items():
                        assert (fs_dir / name).read_bytes() == data, name
            finally:
                await run(["umount", str(fs_dir)])
            fsck = await run(["e2fsck", "-fn", loop], check=False)
            log.append(text(fsck))
            assert fsck.returncode == 0, text(fsck)
    # both replicas hold the same filesystem, byte for byte
    await run(["cmp", str(data_dir / "vol0.img"), str(data_dir.parent / "secondary" / "vol0.img")])
    print("\n".join(log))


def _stop_fuse(fuse: subprocess.Popen[bytes], fuse_dir: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(fuse_dir)], check=False, capture_output=True)
    try:
        fuse.wait(10)
    except subprocess.TimeoutExpired:
        fuse.kill()
        fuse.wait()
    if fuse.stderr is not None:
        fuse.stderr.close()


async def test_dst_up_serves_nbd_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "dst",
        "up",
        "--data",
        str(tmp_path / "data"),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    src = tmp_path / "in.img"
    src.write_bytes(random.Random(3).randbytes(4 * MiB))
    for round_ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            m = re.search(r"nbd://\S+", line)
            assert m and m.group(0) == f"nbd://127.0.0.1:{port}/vol0", line
            uri = m.group(0)
            info = json.loads((await run(["nbdinfo", "--json", uri])).stdout)
            assert info["exports"][0]["export-size"] == 1 << 30
            if round_ == 0:
                await run(["nbdcopy", str(src), uri])
            script = f"import sys; sys.stdout.buffer.write(h.pread({4 * MiB}, 0))"
            got = await run(["nbdsh", "-u", uri, "-c", script], debian=True)
            assert got.stdout == src.read_bytes()
            proc.send_signal(signal.SIGINT)
            assert await trio.to_thread.run_sync(proc.wait, 15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    primary, secondary = tmp_path / "data" / "primary", tmp_path / "data" / "secondary"
    assert os.path.getsize(primary / "vol0.img") == 1 << 30
    # `dst up` is a replicated pair: both data files hold the volume
    await run(["cmp", str(primary / "vol0.img"), str(secondary / "vol0.img")])
