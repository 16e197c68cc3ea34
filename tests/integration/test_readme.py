"""README.md cannot drift from the CLI: every command in it is exercised here.

- The command synopsis (the ```text block of ``dst`` lines) lists exactly the flags each
  subcommand's parser has: a flag added without documenting it fails here, and so does a
  documented flag that is gone.
- Every ``dst`` command in a ```sh block parses with the real parser, and every other program
  named there exists on this machine — except those listed in NOT_HERE, with the reason
  (the README says so too).
- The ```sh blocks marked ``<!-- test: run session=NAME -->`` run for real, in order, one bash
  script per session in a temporary directory: loopback ports are swapped for free ones, and
  after a background line (``&``) the script waits for its ``--listen`` port (or, for
  nbdfuse, its disk file).  ``set -e``: a failing command fails the test.
- The ```python library example runs against a server on loopback.
- The first block's ``make up`` / ``make test`` are checked against the Makefile (running them
  here would recurse into this very suite).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dst.config import subparsers
from dst.options import build_parser
from dst.security.certs import _parser as certs_parser
from tests.integration.harness import free_port, running_server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: Programs the README shows that this machine cannot run (TESTING.md), and why.
NOT_HERE = {
    "nbd-client": "the kernel NBD client: no /dev/nbd* on this machine",
    "qemu-system-x86_64": "no full-system QEMU here (qemu-utils only: qemu-img, qemu-io)",
}
SHELL_WORDS = {"until", "do", "done", "while", "then", "fi", "if", "kill", "echo", "cd"}
MARK = re.compile(r"<!-- test: run session=(\w+) -->")


@dataclass(frozen=True)
class Block:
    info: str
    session: str | None
    text: str


def blocks() -> list[Block]:
    out, lines, i = [], README.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info = lines[i][3:].strip()
            prev = next((x for x in reversed(lines[:i]) if x.strip()), "")
            mark = MARK.fullmatch(prev.strip())
            end = lines.index("```", i + 1)
            out.append(Block(info, mark.group(1) if mark else None, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return out


def logical_lines(text: str) -> list[str]:
    return [line for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def commands(text: str) -> list[list[str]]:
    """Simple commands in a shell block: split at ; && || | &, with $(...) as its own."""
    out: list[list[str]] = []
    for line in logical_lines(text):
        line = re.sub(r"(^|\s)#.*$", "", line)  # a comment (the README quotes no '#')
        inner = re.findall(r"\$\(([^)]*)\)", line)
        line = re.sub(r"\$\([^)]*\)", "SUBST", line)
        for part in [*re.split(r"&&|\|\||[;|&]", line), *inner]:
            words = shlex.split(part, comments=True)
            # leading shell keywords and variable assignments are not the command
            while words and (
                words[0] in SHELL_WORDS - {"kill", "echo", "cd"} or re.match(r"\w+=", words[0])
            ):
                words = words[1:]
            if words and not words[0].startswith(">"):
                out.append(words)
    return out


SH = [b for b in blocks() if b.info == "sh"]
DST_COMMANDS = [argv for b in SH for argv in commands(b.text) if argv[0] == "dst"]


def test_the_readme_has_what_the_tests_rely_on() -> None:
    assert len(SH) >= 5 and len(DST_COMMANDS) >= 10
    assert {b.session for b in SH if b.session} == {"quick", "repl", "tls"}


@pytest.mark.parametrize("argv", DST_COMMANDS, ids=" ".join)
def test_every_dst_command_parses(argv: list[str]) -> None:
    if argv[1] == "certs":
        certs_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv[1:])
        assert args.command == argv[1]


def test_every_other_program_exists_here_or_is_named_as_absent() -> None:
    missing = {
        argv[0]
        for b in SH
        for argv in commands(b.text)
        if argv[0] != "dst" and argv[0] not in SHELL_WORDS and shutil.which(argv[0]) is None
    }
    assert missing <= set(NOT_HERE), missing - set(NOT_HERE)
    text = README.read_text()
    for program in NOT_HERE:
        assert program in text and shutil.which(program) is None, program


def synopsis() -> dict[str, set[str]]:
    block = next(b for b in blocks() if b.info == "text" and b.text.startswith("dst up"))
    flags: dict[str, set[str]] = {}
    command = ""
    common: set[str] = set()
    for line in block.text.splitlines():
        if line.startswith("every command but certs:"):
            common = set(re.findall(r"--[a-z-]+", line))
            continue
        if line.startswith("dst "):
            command = line.split()[1]
        flags.setdefault(command, set()).update(re.findall(r"--[a-z-]+", line))
    for command in flags:
        if command != "certs":
            flags[command] |= common
    return flags


def test_the_synopsis_lists_every_flag_and_only_real_ones() -> None:
    documented = synopsis()
    commands_ = subparsers(build_parser())
    assert set(documented) == set(commands_), "a command is missing from the synopsis"
    for name, parser in commands_.items():
        if name == "certs":
            parser = certs_parser()
            real = {
                o
                for sub in subparsers(parser).values()
                for a in sub._actions
                for o in a.option_strings
            }
        else:
            real = {o for a in parser._actions for o in a.option_strings}
        real = {o for o in real if o.startswith("--") and o != "--help"}
        assert documented[name] == real, f"dst {name}: README {documented[name]} vs CLI {real}"


def test_make_up_and_make_test_do_what_the_first_lines_say() -> None:
    first = blocks()[0].text
    assert first.startswith("make up ") and "\nmake test " in first
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^up: setup\n\tdst up$", makefile, re.M)
    assert re.search(r"^test: setup lint\n\tpython3 -m pytest -q$", makefile, re.M)


# --- running the marked blocks ----------------------------------------------------------------

PRELUDE = """set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
_wait_port() { python3 - "$1" "$2" <<'EOF'
import socket, sys, time
for _ in range(600):
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), 0.2).close()
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit(f"nothing listens on {sys.argv[1]}:{sys.argv[2]}")
EOF
}
_wait_file() { for _ in $(seq 600); do [ -e "$1" ] && return 0; sleep 0.05; done; return 1; }
"""


def session_script(name: str) -> str:
    text = "\n".join(b.text for b in SH if b.session == name)
    ports: dict[str, int] = {}

    def swap(m: re.Match[str]) -> str:
        return f"127.0.0.1:{ports.setdefault(m.group(1), free_port())}"

    lines = [PRELUDE]
    for line in logical_lines(re.sub(r"127\.0\.0\.1:(\d+)", swap, text)):
        lines.append(line)
        code = line.split(" #")[0].rstrip()
        if code.endswith("&"):
            if m := re.search(r"--listen 127\.0\.0\.1:(\d+)", code):
                lines.append(f"_wait_port 127.0.0.1 {m.group(1)}")
            elif m := re.search(r"nbdfuse (\S+) ", code):
                lines.append(f"_wait_file {m.group(1)}/nbd")
    return "\n".join(lines) + "\n"


def cleanup(cwd: Path) -> None:
    """What a failed mount block may leave behind: the mount, the loop device, the FUSE."""
    subprocess.run(["umount", str(cwd / "fs")], capture_output=True, check=False)
    if (cwd / "mnt" / "nbd").exists():
        out = subprocess.run(
            ["losetup", "-j", str(cwd / "mnt" / "nbd")], capture_output=True, text=True
        )
        for line in out.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
    subprocess.run(["fusermount3", "-u", str(cwd / "mnt")], capture_output=True, check=False)


@pytest.mark.parametrize("session", ["quick", "repl", "tls"])
def test_the_marked_blocks_run(session: str, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "dst"  # this checkout's dst, whatever `dst` on PATH is
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m dst "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "script.sh").write_text(session_script(session))
    proc = subprocess.Popen(
        ["bash", str(tmp_path / "script.sh")],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so every job it started can be killed
    )
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cleanup(work)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"README session {session!r} failed:\n{text[-4000:]}"
    if session == "repl":
        assert "0 differ" in text and "role primary" in text and "dst_io_bytes_total{" in text
        assert "verify: [####################] 100%" in text  # the progress bar's last state
    if session == "tls":
        assert "role standalone" in text


async def test_the_library_example_runs(tmp_path: Path) -> None:
    code = next(b.text for b in blocks() if b.info == "python")
    async with running_server(tmp_path) as server:
        code = code.replace("127.0.0.1:7410", str(server.listen_address))
        body = "\n".join("    " + line for line in code.splitlines())
        namespace: dict[str, object] = {}
        exec(f"async def example():\n{body}\n", namespace)
        await namespace["example"]()  # type: ignore[operator]
    assert (tmp_path / "vol0.img").read_bytes()[:4097] == b"\x01" * 4096 + b"\x00"
