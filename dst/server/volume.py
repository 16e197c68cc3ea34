"""Volume: one exported block device on a server — its data file, its metadata, its epoch.

On disk, in the server's data directory:

- ``NAME.img`` — the data, one file of exactly the volume's size (sparse when created), so an
  operator can ``cmp``, ``qemu-img info`` or loop-mount it offline;
- ``NAME.bitmap`` — on a replicated volume, the persistent out-of-sync bitmap;
- ``NAME.al`` — on a replicated volume, the activity log (extents with writes in flight while
  primary);
- ``NAME.meta.json`` — small metadata (size, volume uuid, epoch, generation identifiers),
  replaced atomically
  (write a temporary file, fsync it, rename, fsync the directory).

The volume's stack on the server is built here: ``FileStore`` at the bottom, and on a
replication primary ``Replicated`` over it; fencing goes on top.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from dst.block import BlockLayer, FileStore, Limits
from dst.block.faults import store_from_env
from dst.client.remote import RemoteVolume
from dst.errors import ConfigError
from dst.fence import Fence, Ownership
from dst.replication.activity_log import DEFAULT_SLOTS, ActivityLog
from dst.replication.bitmap import DirtyBitmap
from dst.replication.generations import Generations
from dst.replication.layer import Replicated
from dst.replication.resync import DEFAULT_RESYNC_RATE
from dst.replication.sync import ReplicaState

log = logging.getLogger("dst.server")

NEW_VOLUME = Generations.created()
# Names become file names; keep them portable and unable to escape the data directory.
VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

if TYPE_CHECKING:
    import trio


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
    #: Replication's generation identifiers (``dst/replication/generations.py``).
    generations: Generations = NEW_VOLUME


class Volume:
    """A named volume: its block stack (``layer``) and its persisted metadata."""

    def __init__(self, data_dir: Path, meta: VolumeMeta, store: BlockLayer) -> None:
        self.data_dir = data_dir
        self.meta = meta
        self._meta_lock = threading.Lock()
        self.store = store
        #: The top of the stack: no write of an older epoch passes (dst/fence).
        self.fence = Fence(store, meta.epoch, self._persist_epoch, name=meta.name)
        self.ownership = Ownership(self.fence, meta.name)
        self.layer: BlockLayer = self.fence
        #: On either server of a replicated pair: generations, bitmap, handshake verdict.
        self.state: ReplicaState | None = None
        self.al: ActivityLog | None = None
        #: Set on a replication primary: the layer that also writes to the peer.
        self.replicated: Replicated | None = None
        #: On a secondary: the cancel scope of the primary's current replication link. A new
        #: link cancels the older one, whose socket may still deliver frames the primary's
        #: kernel retransmits after a partition heals (stale writes landing after a resync).
        self.replication_link: trio.CancelScope | None = None

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def size(self) -> int:
        return self.meta.size

    @property
    def epoch(self) -> int:
        return self.fence.epoch

    @property
    def limits(self) -> Limits:
        return self.layer.limits

    @property
    def meta_path(self) -> Path:
        return self.data_dir / f"{self.name}.meta.json"

    @classmethod
    def open(
        cls,
        data_dir: Path,
        name: str,
        size: int,
        *,
        limits: Limits,
        replica: bool = False,
        al_extents: int = DEFAULT_SLOTS,
    ) -> Volume:
        """Open (or create) ``name`` in ``data_dir``; a size that disagrees with the existing
        volume is a ConfigError rather than a silent resize.  A ``replica`` (either server of
        a pair) also opens ``NAME.bitmap`` and ``NAME.al``, recovering the activity log of a
        crashed primary into the bitmap; :meth:`become_primary` stacks Replicated on top."""
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
        # Chaos tests only: DST_STORE_FAULTS wraps the store in the storage shim.
        store = store_from_env(FileStore.open(image, size, create=True, limits=limits), image)
        if not meta_path.exists():
            write_meta_atomically(meta_path, meta)
        volume = cls(data_dir, meta, store)
        if replica:
            volume._open_replica(had_data, al_extents)
        return volume

    def _open_replica(self, had_data: bool, al_extents: int) -> None:
        name, size = self.name, self.size
        # An existing volume without a bitmap may hold writes its peer lacks: all dirty.
        bitmap_path = self.data_dir / f"{name}.bitmap"
        create_dirty = had_data and not bitmap_path.exists()
        bitmap = DirtyBitmap.open(bitmap_path, size, create_dirty=create_dirty)
        self.al = ActivityLog.open(self.data_dir / f"{name}.al", size, slots=al_extents)
        generations = self.meta.generations
        if not self.al.was_clean:
            # This node crashed as primary: writes in flight then may be on one side only.
            recovered = self.al.recovered_extents
            for offset, length in recovered:
                bitmap.mark(offset, length)
            bitmap.flush()
            generations = generations.mark_crashed_primary()
            self._persist_generations(generations)
            self.al.clear()
            log.warning(
                "volume=%s event=crash_recovery al_extents=%d bytes=%d (marked out of sync)",
                name,
                len(recovered),
                sum(length for _, length in recovered),
            )
        self.state = ReplicaState(generations, self._persist_generations, bitmap)
        self.state.epoch_hooks(lambda: self.fence.epoch, self.fence.advance)

    def become_primary(
        self, peer: RemoteVolume, protocol: str = "C", resync_rate: int = DEFAULT_RESYNC_RATE
    ) -> Replicated:
        """Stack Replicated(FileStore, peer) on this replica: it takes writes from now on."""
        assert self.state is not None and self.al is not None, "not opened as a replica"
        self.replicated = Replicated(
            self.store,
            peer,
            self.state,
            activity_log=self.al,
            protocol=protocol,
            resync_rate=resync_rate,
        )
        self.fence.below = self.replicated
        return self.replicated

    async def _persist_epoch(self, epoch: int) -> None:
        """A takeover's epoch: in the metadata here, then on the replication peer (which
        otherwise learns it at the next handshake)."""
        await trio.to_thread.run_sync(partial(self._update_meta, epoch=epoch))
        if self.replicated is not None:
            await self.replicated.share_epoch(epoch)

    def _persist_generations(self, generations: Generations) -> None:
        self._update_meta(generations=generations)

    def _update_meta(self, **changes: Any) -> None:
        """Replace fields of the metadata file, one writer at a time (threads persist the
        epoch and the generation ids concurrently)."""
        with self._meta_lock:
            meta = replace(self.meta, **changes)
            write_meta_atomically(self.meta_path, meta)
            self.meta = meta

    async def aclose(self) -> None:
        await self.layer.aclose()


def _read_meta(path: Path) -> VolumeMeta:
    try:
        raw = json.loads(path.read_text())
        gens = raw.get("generations")
        return VolumeMeta(
            name=str(raw["name"]),
            size=int(raw["size"]),
            uuid=str(raw["uuid"]),
            epoch=int(raw["epoch"]),
            # Written before generations existed: as new (the bitmaps carry the difference).
            generations=Generations.from_json(gens) if gens else Generations.created(),
        )
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"volume metadata {path}: unreadable ({exc})") from exc


def write_meta_atomically(path: Path, meta: VolumeMeta) -> None:
    tmp = path.with_name(path.name + ".tmp")
    body = json.dumps(
        {
            "name": meta.name,
            "size": meta.size,
            "uuid": meta.uuid,
            "epoch": meta.epoch,
            "generations": meta.generations.to_json(),
        },
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
