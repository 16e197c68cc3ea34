"""The `dst` command as an operator runs it: help, and errors that name the flag and value.
(`dst up` end to end is in test_nbd_stack.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DST = [sys.executable, "-m", "dst"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["serve"],
        ["nbd"],
        ["up"],
        ["status"],
        ["promote"],
        ["verify"],
        ["certs"],
        ["certs", "issue"],
    ],
)
def test_help(args: list[str]) -> None:
    out = subprocess.run([*DST, *args, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


#: A serve command line that is valid so far.
SERVE = ["serve", "--listen", "127.0.0.1:0", "--data", "d", "--volume", "v=1M"]


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
        ([*SERVE, "--page-size", "3000", "--insecure"], "3000"),
        ([*SERVE, "--boundary", "1000", "--insecure"], "--boundary '1000'"),
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
