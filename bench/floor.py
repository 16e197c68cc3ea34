"""The Trio floor: what one wakeup costs on this machine, with nothing of dst in it.

Two processes ping-pong over a socket pair under ``trio.run``: a 4 KiB request one way, a
16-byte answer back, each side waiting for the other with ``recv_into`` (one epoll wait per
message).  Prints the round trip and the CPU the requesting side spends per round trip, user
and system apart — the share of a dst hop's CPU per request that is the scheduler's and the
kernel's, not dst's (``python3 -m bench.profile`` gives the whole)::

    python3 -m bench.floor [--count N]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence

import trio

REQUEST = 4096 + 64  # a 4 KiB WRITE and its header
ANSWER = 16


async def _recv_exactly(sock: trio.socket.SocketType, buf: bytearray) -> None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = await sock.recv_into(view[got:])
        if not n:
            raise EOFError("the other side closed")
        got += n


async def _answer(raw: socket.socket, count: int) -> None:
    sock, buf = trio.socket.from_stdlib_socket(raw), bytearray(REQUEST)
    for _ in range(count):
        await _recv_exactly(sock, buf)
        await sock.send(b"a" * ANSWER)


async def _ask(raw: socket.socket, count: int) -> tuple[float, float, float]:
    sock, buf, request = trio.socket.from_stdlib_socket(raw), bytearray(ANSWER), b"r" * REQUEST
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(count):
        await sock.send(request)
        await _recv_exactly(sock, buf)
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return elapsed, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.floor", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=20000, help="round trips (20000)")
    args = p.parse_args(argv)
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the answering side
        mine.close()
        trio.run(_answer, theirs, args.count)
        os._exit(0)
    theirs.close()
    elapsed, user, system = trio.run(_ask, mine, args.count)
    os.waitpid(pid, 0)
    per = 1e6 / args.count
    print(
        f"trio ping-pong, {REQUEST}-byte request, {ANSWER}-byte answer: round trip "
        f"{elapsed * per:.1f} us; CPU per round trip of the asking side {(user + system) * per:.1f}"
        f" us (user {user * per:.1f}, sys {system * per:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
