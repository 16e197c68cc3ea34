"""The `dst` command as an operator runs it: help, errors that name the flag, `dst up` serving,
stopping on Ctrl-C with exit 0, and serving the same bytes when started again."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from dst.block import Bio, Op
from dst.client import open_remote
from tests.integration.harness import free_port

DST = [sys.executable, "-m", "dst"]


@pytest.mark.parametrize("args", [[], ["serve"], ["up"], ["certs"], ["certs", "issue"]])
def test_help(args: list[str]) -> None:
    out = subprocess.run([*DST, *args, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve", "--listen", "127.0.0.1:0", "--data", "d", "--volume", "v"], "NAME=SIZE"),
        (
            ["serve", "--listen", "nope", "--data", "d", "--volume", "v=1M", "--insecure"],
            "HOST:PORT",
        ),
        (["serve", "--listen", "127.0.0.1:0", "--data", "d", "--volume", "v=1M"], "--tls"),
        (
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                "d",
                "--volume",
                "../x=1M",
                "--insecure",
            ],
            "'../x'",
        ),
        (
            ["serve", "--listen", "127.0.0.1:0", "--data", "d", "--volume", "v=1X", "--insecure"],
            "'1X'",
        ),
        (
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                "d",
                "--volume",
                "v=1M",
                "--page-size",
                "3000",
                "--insecure",
            ],
            "3000",
        ),
    ],
)
def test_bad_flags_exit_2_naming_the_value(tmp_path: Path, args: list[str], needle: str) -> None:
    out = subprocess.run([*DST, *args], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2
    assert needle in out.stderr, out.stderr


def test_port_in_use_and_size_mismatch_are_one_line_errors(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["serve", "--listen", f"127.0.0.1:{port}", "--data", "d", "--volume", "v=1M"]
        out = subprocess.run(
            [*DST, *args, "--insecure"], capture_output=True, text=True, timeout=30, cwd=tmp_path
        )
        assert out.returncode == 1 and "Address already in use" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    args = ["serve", "--listen", "127.0.0.1:0", "--data", "d", "--volume", "v=2M", "--insecure"]
    out = subprocess.run([*DST, *args], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2 and "exists with size 1048576" in out.stderr, out.stderr


async def test_up_serves_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    port = free_port()
    cmd = [*DST, "up", "--data", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}"]
    for round_ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert f"dst://127.0.0.1:{port}/vol0" in line, line
            async with open_remote(f"127.0.0.1:{port}", "vol0") as vol:
                assert vol.size == 1 << 30
                if round_ == 0:
                    await vol.submit(Bio.from_buffer(Op.WRITE, 4096, b"persist!" * 512))
                    await vol.submit(Bio(Op.FLUSH, 0, 0))
                out = bytearray(4096)
                await vol.submit(Bio.from_buffer(Op.READ, 4096, out))
                assert out == b"persist!" * 512
            proc.send_signal(signal.SIGINT)
            assert await trio.to_thread.run_sync(proc.wait, 15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    assert (tmp_path / "data" / "vol0.img").stat().st_size == 1 << 30
