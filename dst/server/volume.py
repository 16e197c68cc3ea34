"""Volume: one exported block device on a server — its data file, its metadata, its epoch.

On disk, in the server's data directory:

- ``NAME.img`` — the data, one file of exactly the volume's size (sparse when created), so an
  operator can ``cmp``, ``qemu-img info`` or loop-mount it offline;
- ``NAME.bitmap`` — on a replication primary, the persistent out-of-sync bitmap;
- ``NAME.al`` — on a replication primary, the activity log (extents with writes in flight);
- ``NAME.meta.json`` — small metadata (size, volume uuid, epoch), replaced atomically
  (write a temporary file, fsync it, rename, fsync the directory).

The volume's stack on the server is built here: ``FileStore`` at the bottom, and on a
replication primary ``Replicated`` over it; fencing goes on top.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from dst.block import BlockLayer, FileStore, Limits
from dst.client.remote import RemoteVolume
from dst.errors import ConfigError
from dst.replication.activity_log import ActivityLog
from dst.replication.bitmap import DirtyBitmap
from dst.replication.layer import Replicated

log = logging.getLogger("dst.server")

# Names become file names; keep them portable and unable to escape the data directory.
VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096`` → bytes; ConfigError names a bad value."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ConfigError(f"size {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(m.group(1)) * SUFFIXES[m.group(2).lower()]


def parse_volume_spec(text: str) -> tuple[str, int]:
    """``NAME=SIZE`` from the command line."""
    name, sep, size_text = text.partition("=")
    if not sep:
        raise ConfigError(f"volume {text!r}: expected NAME=SIZE, e.g. vol0=1G")
    check_volume_name(name)
    size = parse_size(size_text)
    if size <= 0 or size % 512:
        raise ConfigError(f"volume {name!r}: size {size} must be a positive multiple of 512")
    return name, size


def check_volume_name(name: str) -> None:
    if not VOLUME_NAME_RE.match(name):
        raise ConfigError(
            f"volume name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


@dataclass(frozen=True, slots=True)
class VolumeMeta:
    name: str
    size: int
    uuid: str
    epoch: int


class Volume:
    """A named volume: its block stack (``layer``) and its persisted metadata."""

    def __init__(
        self,
        data_dir: Path,
        meta: VolumeMeta,
        layer: BlockLayer,
        replicated: Replicated | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.meta = meta
        self.layer = layer
        #: Set on a replication primary: the layer that also writes to the peer.
        self.replicated = replicated

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def size(self) -> int:
        return self.meta.size

    @property
    def epoch(self) -> int:
        return self.meta.epoch

    @property
    def limits(self) -> Limits:
        return self.layer.limits

    @classmethod
    def open(
        cls,
        data_dir: Path,
        name: str,
        size: int,
        *,
        limits: Limits,
        peer: RemoteVolume | None = None,
        store: BlockLayer | None = None,
    ) -> Volume:
        """Open (or create) ``name`` in ``data_dir``; a size that disagrees with the existing
        volume is a ConfigError rather than a silent resize.  With ``peer`` (a replication
        primary) the stack is Replicated(FileStore, peer) with ``NAME.bitmap`` beside it."""
        check_volume_name(name)
        data_dir.mkdir(parents=True, exist_ok=True)
        meta_path = data_dir / f"{name}.meta.json"
        if meta_path.exists():
            meta = _read_meta(meta_path)
            if meta.size != size:
                raise ConfigError(
                    f"volume {name!r}: exists with size {meta.size}, asked for {size}; "
                    "dst does not resize volumes"
                )
        else:
            meta = VolumeMeta(name=name, size=size, uuid=str(uuid.uuid4()), epoch=1)
        image = data_dir / f"{name}.img"
        had_data = image.exists()
        if store is None:  # (promotion passes the store it already has open)
            store = FileStore.open(image, size, create=True, limits=limits)
        if not meta_path.exists():
            write_meta_atomically(meta_path, meta)
        if peer is None:
            return cls(data_dir, meta, store)
        # An existing volume without a bitmap may hold writes its peer lacks: all dirty.
        bitmap_path = data_dir / f"{name}.bitmap"
        create_dirty = had_data and not bitmap_path.exists()
        bitmap = DirtyBitmap.open(bitmap_path, size, create_dirty=create_dirty)
        al = ActivityLog.open(data_dir / f"{name}.al", size)
        if not al.was_clean:
            # This primary crashed: writes in flight then may be on one side only.
            recovered = al.recovered_extents
            for offset, length in recovered:
                bitmap.mark(offset, length)
            bitmap.flush()
            log.warning(
                "volume=%s event=crash_recovery al_extents=%d bytes=%d (marked out of sync)",
                name,
                len(recovered),
                sum(length for _, length in recovered),
            )
        replicated = Replicated(store, peer, bitmap, activity_log=al)
        return cls(data_dir, meta, replicated, replicated)

    async def aclose(self) -> None:
        await self.layer.aclose()


def _read_meta(path: Path) -> VolumeMeta:
    try:
        raw = json.loads(path.read_text())
        return VolumeMeta(
            name=str(raw["name"]),
            size=int(raw["size"]),
            uuid=str(raw["uuid"]),
            epoch=int(raw["epoch"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"volume metadata {path}: unreadable ({exc})") from exc


def write_meta_atomically(path: Path, meta: VolumeMeta) -> None:
    tmp = path.with_name(path.name + ".tmp")
    body = json.dumps(
        {"name": meta.name, "size": meta.size, "uuid": meta.uuid, "epoch": meta.epoch},
        indent=2,
    )
    with open(tmp, "w") as f:
        f.write(body + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
