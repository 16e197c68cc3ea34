"""Microbenchmarks of the pieces every request passes through: the frame codec (encode and
decode of the common Read/Write/Reply shapes), the splitter, crc32c, and page runs.

    python3 -m bench.micro

Each line: operations per second and microseconds per operation, best of a few rounds (the
machine is shared: the best round is the least disturbed one).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import crc32c

from dst.block import Bio, Limits, Op, split
from dst.net.convert import page_runs
from dst.wire import HEADER_SIZE, ReadRequest, Reply, WriteRequest, encode_frame, parse_meta
from dst.wire import parse_prefix as _parse_prefix

ROUNDS = 5
#: Each round runs this long (at least one call).
ROUND_S = 0.2


def timeit(fn: Callable[[], object]) -> float:
    """Best seconds per call of ``fn`` over ROUNDS rounds."""
    best = float("inf")
    for _ in range(ROUNDS):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= ROUND_S:
                break
        best = min(best, elapsed / n)
    return best


def _decode(frame: bytes) -> Callable[[], object]:
    prefix = _parse_prefix(frame[:HEADER_SIZE])
    meta = frame[HEADER_SIZE:]

    def run() -> object:
        return parse_meta(_parse_prefix(frame[:HEADER_SIZE]), meta)

    assert run() is not None and prefix.meta_len == len(meta)
    return run


def cases() -> dict[str, Callable[[], object]]:
    page = 4096
    data4k, data1m = bytearray(4096), bytearray(1 << 20)
    bio4k = Bio.from_buffer(Op.WRITE, 8192, data4k, page_size=page)
    bio1m = Bio.from_buffer(Op.WRITE, 0, data1m, page_size=page)
    write = WriteRequest(1, 0, 1, 8192, 4096, 1, page_runs(bio4k, page))
    read = ReadRequest(1, 0, 1, 8192, 4096, page_runs(bio4k, page))
    ok = Reply(1, 0, 0, "")
    views = [memoryview(data4k)]
    replicated = Limits(page_size=page, max_bytes=1 << 20, boundary=32 * 1024).validate()
    return {
        "encode WriteRequest 4k": lambda: encode_frame(write, views),
        "encode ReadRequest 4k": lambda: encode_frame(read),
        "encode Reply": lambda: encode_frame(ok),
        "decode WriteRequest": _decode(encode_frame(write, views)),
        "decode ReadRequest": _decode(encode_frame(read)),
        "decode Reply": _decode(encode_frame(ok)),
        "page_runs 4k bio": lambda: page_runs(bio4k, page),
        "split 4k bio (fits)": lambda: split(bio4k, replicated),
        "split 1M bio at 32k": lambda: split(bio1m, replicated),
        "crc32c 4 KiB": lambda: crc32c.crc32c(data4k),
        "crc32c 1 MiB": lambda: crc32c.crc32c(data1m),
    }


def run() -> list[tuple[str, float]]:
    return [(name, timeit(fn)) for name, fn in cases().items()]


def table(rows: list[tuple[str, float]]) -> str:
    lines = [f"{'microbenchmark':<26}{'ops/s':>12}{'us/op':>10}"]
    lines += [f"{name:<26}{1 / s:>12.0f}{s * 1e6:>10.2f}" for name, s in rows]
    return "\n".join(lines)


def main() -> None:
    print(table(run()))


if __name__ == "__main__":
    main()
