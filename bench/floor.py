"""The Trio floor: what one wakeup costs on this machine, with nothing of dst in it.

Two processes ping-pong over a socket pair under ``trio.run``: a 4 KiB request one way, a
16-byte answer back, each side waiting for the other with ``recv_into`` (one epoll wait per
message).  Prints the round trip and the CPU the requesting side spends per round trip, user
and system apart — the share of a dst hop's CPU per request that is the scheduler's and the
kernel's, not dst's (``python3 -m bench.profile`` gives the whole) — and the same ping-pong
over plain blocking sockets beside it: what the event loop itself adds per wakeup::

    python3 -m bench.floor [--count N]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Sequence

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


def _recv_exactly_blocking(sock: socket.socket, buf: bytearray) -> None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("the other side closed")
        got += n


def _answer_blocking(sock: socket.socket, count: int) -> None:
    buf = bytearray(REQUEST)
    for _ in range(count):
        _recv_exactly_blocking(sock, buf)
        sock.sendall(b"a" * ANSWER)


def _ask_blocking(sock: socket.socket, count: int) -> tuple[float, float, float]:
    buf, request = bytearray(ANSWER), b"r" * REQUEST
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(count):
        sock.sendall(request)
        _recv_exactly_blocking(sock, buf)
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return elapsed, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def _ping_pong(
    ask: Callable[[socket.socket, int], tuple[float, float, float]],
    answer: Callable[[socket.socket, int], object],
    count: int,
) -> tuple[float, float, float]:
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the answering side
        mine.close()
        answer(theirs, count)
        os._exit(0)
    theirs.close()
    try:
        return ask(mine, count)
    finally:
        mine.close()
        os.waitpid(pid, 0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.floor", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=20000, help="round trips (20000)")
    args = p.parse_args(argv)
    Ask = Callable[[socket.socket, int], tuple[float, float, float]]
    runs: dict[str, tuple[Ask, Callable[[socket.socket, int], object]]] = {
        "trio": (
            lambda sock, n: trio.run(_ask, sock, n),
            lambda sock, n: trio.run(_answer, sock, n),
        ),
        "blocking sockets, no event loop": (_ask_blocking, _answer_blocking),
    }
    per = 1e6 / args.count
    for name, (ask, answer) in runs.items():
        elapsed, user, system = _ping_pong(ask, answer, args.count)
        print(
            f"{name} ping-pong, {REQUEST}-byte request, {ANSWER}-byte answer: round trip "
            f"{elapsed * per:.1f} us; CPU per round trip of the asking side "
            f"{(user + system) * per:.1f} us (user {user * per:.1f}, sys {system * per:.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
