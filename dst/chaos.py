"""Fault hooks in the code: named crash points and deliberately broken builds (tests only).

The chaos suite (``../shared/TESTING.md``) must kill a server *mid-transaction* — after the
primary wrote locally but before the peer has the write, say — not merely between requests,
and must prove its checker has teeth by running builds with a known bug.  Both are selected
by environment variables read once, at import, so a production process (neither variable
set) pays one module-global bool check per hook:

``DST_CRASH_AT="NAME"`` or ``"NAME:N"``
    SIGKILL this process the Nth time (1-based, default 1) the code reaches crash point NAME,
    after writing ``dst: crash point NAME hit`` to stderr.  SIGKILL, not an exception: nothing
    unwinds, nothing flushes, exactly as when the power or the OOM killer strikes.

``DST_BROKEN="NAME[,NAME...]"``
    Turn on the listed bugs (:data:`BROKEN_BUILDS`).

An unknown name in either variable raises :class:`~dst.errors.ConfigError` at import, naming
the variable and the value: a typo must not quietly test nothing.

Call sites keep the disabled cost to one attribute load and a branch::

    if chaos.ARMED:
        chaos.crash_point("primary.after-local-write")
    if chaos.BROKEN and chaos.broken("skip-fsync"):
        ...

(``crash_point`` and ``broken`` check the flags themselves too, so a bare call is correct,
just a function call dearer.)  Sans-IO: no trio here.
"""

from __future__ import annotations

import os
import signal
import sys

from dst.errors import ConfigError

__all__ = [
    "ARMED",
    "BROKEN",
    "BROKEN_BUILDS",
    "CRASH_POINTS",
    "armed",
    "broken",
    "crash_point",
    "parse_broken",
    "parse_crash_at",
]

CRASH_AT_ENV = "DST_CRASH_AT"
BROKEN_ENV = "DST_BROKEN"

#: Every crash point placed in the code, with where it sits (for the error message and docs).
CRASH_POINTS: dict[str, str] = {
    "primary.after-local-write": "replication/layer.py Replicated._both: local write done, "
    "peer not sent",
    "secondary.after-write-before-fsync": "block/file.py FileStore._dispatch: a replica's "
    "write applied, before its FUA fdatasync or the next FLUSH",
    "primary.after-peer-ack": "replication/layer.py Replicated._both: both sides done, "
    "client not answered",
    "resync.mid": "replication/resync.py copy_dirty_extents: an extent copied, pass unfinished",
    "takeover.mid": "fence/claims.py Ownership.claim: new epoch fenced, drained and persisted, "
    "claim not answered",
}

#: Every deliberately broken build, with the bug it plants.
BROKEN_BUILDS: dict[str, str] = {
    "ack-before-sync": "Replicated acknowledges a write once local, without waiting for the peer",
    "skip-fsync": "FileStore FLUSH/FUA/PREFLUSH return without fdatasync",
    "no-epoch-check": "Fence admits writes from an older epoch",
    "resync-wrong-side": "resync copies peer -> local (stale side onto the up-to-date one)",
    "no-replay-check": "ReplayWindow admits a replayed (tid, sub)",
    "eio-as-zeros": "a READ failing with EIO is answered as success, filled with zeros",
}


def parse_crash_at(value: str | None) -> tuple[str, int] | None:
    """``NAME`` or ``NAME:N`` → (NAME, N); None for unset/empty; ConfigError otherwise."""
    if not value:
        return None
    name, sep, count = value.strip().partition(":")
    nth = 1
    if sep:
        try:
            nth = int(count)
        except ValueError:
            nth = 0
        if nth < 1:
            raise ConfigError(f"{CRASH_AT_ENV}={value!r}: the hit count after ':' must be >= 1")
    if name not in CRASH_POINTS:
        known = ", ".join(sorted(CRASH_POINTS))
        raise ConfigError(
            f"{CRASH_AT_ENV}={value!r}: unknown crash point {name!r} (known: {known})"
        )
    return name, nth


def parse_broken(value: str | None) -> frozenset[str]:
    """A comma list of broken-build names; ConfigError names an unknown one."""
    names = frozenset(n.strip() for n in (value or "").split(",") if n.strip())
    unknown = sorted(names - BROKEN_BUILDS.keys())
    if unknown:
        known = ", ".join(sorted(BROKEN_BUILDS))
        raise ConfigError(
            f"{BROKEN_ENV}={value!r}: unknown broken build {unknown} (known: {known})"
        )
    return names


_TARGET = parse_crash_at(os.environ.get(CRASH_AT_ENV))
_BROKEN = parse_broken(os.environ.get(BROKEN_ENV))

#: True when this process has a crash point armed: the fast-path check of every call site.
ARMED: bool = _TARGET is not None
#: True when any broken build is on.
BROKEN: bool = bool(_BROKEN)

_hits = 0

if _BROKEN:
    # Loud on purpose: a broken build must never pass for a real one in a log.
    sys.stderr.write(f"dst: BROKEN BUILD: {', '.join(sorted(_BROKEN))}\n")
    sys.stderr.flush()


def armed(name: str) -> bool:
    """True when ``name`` is the crash point this process will die at (call sites that must
    order things so the point lands where its name says, only when it is armed)."""
    return _TARGET is not None and _TARGET[0] == name


def crash_point(name: str) -> None:
    """Die here (SIGKILL) if ``name`` is armed and this is its Nth hit; else nothing."""
    global _hits
    if _TARGET is None:
        return
    if name not in CRASH_POINTS:
        raise ValueError(f"crash point {name!r} is not in chaos.CRASH_POINTS")
    if name != _TARGET[0]:
        return
    _hits += 1
    if _hits < _TARGET[1]:
        return
    try:
        sys.stderr.write(f"dst: crash point {name} hit\n")
        sys.stderr.flush()
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def broken(name: str) -> bool:
    """True when the broken build ``name`` is on in this process."""
    if not _BROKEN:
        return False
    if name not in BROKEN_BUILDS:
        raise ValueError(f"broken build {name!r} is not in chaos.BROKEN_BUILDS")
    return name in _BROKEN
