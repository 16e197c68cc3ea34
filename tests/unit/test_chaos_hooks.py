"""dst.chaos: env parsing, unknown names refused at import, a crash point really kills."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import timeit

import pytest

from dst import chaos
from dst.block import Bio, MemoryStore, Op
from dst.errors import ConfigError, FencedError
from dst.fence import Fence
from dst.fence.replay import ReplayWindow


def run_child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python3 -c code`` with ``env`` added; the child imports its own dst.chaos."""
    full = {k: v for k, v in os.environ.items() if k not in ("DST_CRASH_AT", "DST_BROKEN")}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_parse_crash_at() -> None:
    assert chaos.parse_crash_at(None) is None
    assert chaos.parse_crash_at("") is None
    assert chaos.parse_crash_at("resync.mid") == ("resync.mid", 1)
    assert chaos.parse_crash_at("primary.after-peer-ack:3") == ("primary.after-peer-ack", 3)
    with pytest.raises(ConfigError, match=r"DST_CRASH_AT='resync\.midd'.*unknown crash point"):
        chaos.parse_crash_at("resync.midd")
    for bad in ("resync.mid:0", "resync.mid:x", "resync.mid:-2"):
        with pytest.raises(ConfigError, match="hit count"):
            chaos.parse_crash_at(bad)


def test_parse_broken() -> None:
    assert chaos.parse_broken(None) == frozenset()
    assert chaos.parse_broken(" skip-fsync , no-epoch-check,") == {"skip-fsync", "no-epoch-check"}
    with pytest.raises(ConfigError, match=r"DST_BROKEN='skip-fsync,skip-fsnyc'.*skip-fsnyc"):
        chaos.parse_broken("skip-fsync,skip-fsnyc")


def test_every_named_hook_is_placed_in_the_code() -> None:
    # A crash point or broken build that no code reaches would test nothing.
    root = os.path.dirname(os.path.dirname(chaos.__file__))
    sources = []
    for folder, _, files in os.walk(os.path.join(root, "dst")):
        for name in files:
            if name.endswith(".py") and name != "chaos.py":
                with open(os.path.join(folder, name)) as f:
                    sources.append(f.read())
    text = "\n".join(sources)
    for name in [*chaos.CRASH_POINTS, *chaos.BROKEN_BUILDS]:
        assert f'"{name}"' in text, name


def test_off_by_default_and_cheap() -> None:
    # The test process runs without the variables (the child tests set their own).
    assert "DST_CRASH_AT" not in os.environ and "DST_BROKEN" not in os.environ
    assert not chaos.ARMED and not chaos.BROKEN
    assert not any(chaos.broken(name) for name in chaos.BROKEN_BUILDS)
    assert not chaos.armed("resync.mid")
    chaos.crash_point("resync.mid")  # not armed: returns
    n = 200_000
    guard = min(timeit.repeat("chaos.ARMED", globals={"chaos": chaos}, number=n, repeat=5)) / n
    call = (
        min(timeit.repeat("crash_point('resync.mid')", globals=vars(chaos), number=n, repeat=5)) / n
    )
    print(f"disabled hook: guard {guard * 1e9:.0f} ns, bare call {call * 1e9:.0f} ns")
    assert guard < 1e-6 and call < 5e-6  # loose: a shared CI core, not a benchmark


def test_unknown_names_fail_the_import() -> None:
    out = run_child("import dst.chaos", DST_CRASH_AT="primary.after-local-wrte")
    assert out.returncode != 0
    assert "DST_CRASH_AT='primary.after-local-wrte'" in out.stderr
    out = run_child("import dst.chaos", DST_BROKEN="eio-as-zero")
    assert out.returncode != 0
    assert "DST_BROKEN='eio-as-zero'" in out.stderr


def test_crash_point_kills_at_the_nth_hit() -> None:
    code = (
        "from dst import chaos\n"
        "for i in range(5):\n"
        "    print('before', i, flush=True)\n"
        "    chaos.crash_point('primary.after-peer-ack')\n"
        "    chaos.crash_point('resync.mid')\n"
        "print('survived', flush=True)\n"
    )
    out = run_child(code, DST_CRASH_AT="resync.mid:3")
    assert out.returncode == -signal.SIGKILL
    assert out.stdout.split("\n")[:-1] == ["before 0", "before 1", "before 2"]
    assert out.stderr.strip().endswith("dst: crash point resync.mid hit")
    out = run_child(code, DST_CRASH_AT="takeover.mid")
    assert out.returncode == 0 and "survived" in out.stdout


def test_broken_build_is_on_only_when_listed_and_says_so() -> None:
    code = (
        "from dst import chaos\n"
        "print(chaos.BROKEN, chaos.broken('skip-fsync'), chaos.broken('eio-as-zeros'))\n"
    )
    out = run_child(code, DST_BROKEN="skip-fsync")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True True False"
    assert "BROKEN BUILD: skip-fsync" in out.stderr


def break_build(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Turn one broken build on in this process, as DST_BROKEN would at import."""
    monkeypatch.setattr(chaos, "BROKEN", True)
    monkeypatch.setattr(chaos, "_BROKEN", frozenset({name}))


async def test_broken_fence_and_replay_window_let_the_bad_write_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def persist(epoch: int) -> None:
        pass

    store = MemoryStore(1 << 20)
    fence = Fence(store, 1, persist)
    await fence.advance(2)
    stale = dataclasses.replace(Bio.from_buffer(Op.WRITE, 0, b"x" * 512), epoch=1)
    with pytest.raises(FencedError):
        await fence.submit(stale)
    window = ReplayWindow()
    assert window.admit(5, 0) and not window.admit(5, 0)
    break_build(monkeypatch, "no-epoch-check")
    await fence.submit(stale)  # the bug: an older epoch lands
    break_build(monkeypatch, "no-replay-check")
    assert window.admit(5, 0)  # the bug: a replay is admitted
