"""The Python peer: a file served by nbdkit's Python plugin (Debian ``nbdkit-plugin-python``).

    nbdkit python bench/nbdkit_file_plugin.py file=IMAGE

nbdkit (C) owns the sockets, the NBD protocol and the threads; each request calls one of these
functions in the embedded interpreter — the fairest "same language, one hop" peer for dst.
The parallel thread model lets nbdkit run requests on its worker threads (the GIL still
serialises the Python parts, as it does in dst).  Loaded by nbdkit, not imported by dst.
"""

from __future__ import annotations

import os
from typing import Any

import nbdkit  # provided by nbdkit at load time

API_VERSION = 2
_path = ""


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}={value}")
    _path = os.path.abspath(value)


def config_complete() -> None:
    if not _path:
        raise RuntimeError("file=IMAGE is required")


def open(readonly: bool) -> int:
    return os.open(_path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd: int) -> None:
    os.close(fd)


def get_size(fd: int) -> int:
    return os.fstat(fd).st_size


def can_multi_conn(fd: int) -> bool:
    return True


def pread(fd: int, buf: Any, offset: int, flags: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise RuntimeError(f"short read at {offset + done}")
        done += n


def pwrite(fd: int, buf: Any, offset: int, flags: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def flush(fd: int, flags: int) -> None:
    os.fdatasync(fd)
