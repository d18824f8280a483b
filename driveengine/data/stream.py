"""``FrameStream``: a streaming ``torch.utils.data.IterableDataset`` over a collected split (DESIGN §3–§4).

The split is opened through the dataset handle (:func:`driveengine.store.dataset.open_split`: the
manifest once, no directory walks; each log's frame rows and labels checked against it where they are
read). Then, per DataLoader worker, only the files its samples need are read: the requested columns of
``meta/<log>.parquet`` (once per log and worker), the requested arrays of ``occ/<log>.zarr`` (opened
once per log and worker, one whole chunk per frame, decoded into preallocated arrays, consecutive
frames of a log in one read), point clouds and camera images. ``root`` may be a local folder or an
fsspec URL (``s3://bucket/prefix`` with s3fs; pass ``storage_options``, e.g. ``{"endpoint_url": ...}``).

**Remote data** (a URL ``root`` or ``blob_root``) is read through a local cache of whole files
(:mod:`driveengine.store.cache`: ``cache_dir``, ``cache_limit_bytes``; LRU by bytes, every read
checksummed, shared safely by all processes of a machine), keyed by each log's manifest entry so that a
re-collected log is fetched again; each process fetches the files of its next ``prefetch`` batch windows
ahead on a few threads. From the second epoch on, reads are local.

**With DataLoader workers** :meth:`FrameStream.loader` decodes straight into a ring of preallocated
shared-memory batch slots and hands out batches that are views of them (:mod:`driveengine.data.ring`:
no allocation or copy per batch; a batch stays valid while you hold it). ``image_dtype="uint8"`` sends
images as bytes; :func:`driveengine.data.collate.images_to_float` makes the float images on the device.

What a sample can hold is the field registry's business (:mod:`driveengine.data.fields`: label arrays,
``points``, ``images``, metadata columns, and any registered field); which frames are streamed can be
narrowed by filters (:mod:`driveengine.data.filters`: logs, scenario tags, map locations, any pyarrow
expression over the metadata columns), applied before the sampling plan. Which sample each rank and
worker reads is decided by :mod:`driveengine.data.plan` (global order first, then dealt out; padding of
uneven splits, resume); see there.

Two ways to read:

* **iteration** (the DataLoader way): the epoch's samples of this rank and worker, in plan order;
  ``len(stream)`` is the number of samples this rank yields in the current epoch from the resume point
  (what a ``DataLoader`` over an ``IterableDataset`` needs), so it depends on ranks, padding and resume;
* **map-style**: ``stream[i]`` for ``0 <= i < stream.num_frames`` is the ``i``-th selected frame in stored
  order (logs in name order, then rows: the unshuffled global numbering, whatever the rank), and
  ``stream.get(token)`` the frame with that token; both return exactly what iteration yields for that
  frame, with ``sample_index`` -1.

A sample is a dict:

============================ ===================================================================
key                          value
============================ ===================================================================
``token``, ``log_name``      the key frame's token and log (str)
``row``                      row of the frame in ``meta/<log>.parquet`` (int)
``sample_index``             position in the epoch's padded global order (int; -1 from ``get``, ``[i]``)
``dataset``                  the split's dataset (``nuplan``, ``nuscenes``, ...; str)
``semantics``                (nx, ny, nz) uint8 class ids (:attr:`FrameStream.classes`), its free id
                             where nothing was seen
``flow``                     (nx, ny, nz, 2) float16 (vx, vy) m/s, ego frame of the frame
``mask_lidar``               (nx, ny, nz) bool, observed by LiDAR
any other label array        registered in ``driveengine.schemas.occ`` and held by the split's labels
``points``                   (N, 4) float32 x, y, z (m, ego frame of the key frame), intensity;
                             with ``point_sweeps=s`` (N, 5): the previous ``s`` key frames of the
                             scene are added, moved into the key frame's ego frame, and the fifth
                             column is the time lag in seconds (0 for the key frame)
``images``                   (C, 3, H, W) float32 in [0, 1] (uint8 0..255 with ``image_dtype="uint8"``),
                             the dataset's C cameras in its order,
                             resized to ``image_size``; with ``intrinsics`` (C, 3, 3) float64 scaled
                             to the resize and ``ego_from_camera`` (C, 4, 4) float64
any metadata column          its value: numpy arrays for fixed-size lists (``ego2global`` (4, 4)),
                             Python objects for strings, lists and structs
``history_*`` (history=k)    ``history_tokens`` (k,) str, ``history_valid`` (k,) bool,
                             ``ego_from_history`` (k, 4, 4) float64 = ``ego_t_from_ego_{t-j}`` for
                             j = 1..k, ``history_<array>`` (k, ...) for every label array field, and
                             with ``images`` ``history_images`` (k, C, 3, H, W),
                             ``history_intrinsics`` (k, C, 3, 3), ``history_ego_from_camera`` (k, C, 4, 4).
                             Entry ``j-1`` is the frame ``j`` key frames earlier in the same scene
                             (selected by the filters or not); before the scene start the earliest
                             frame of the scene is repeated and ``history_valid`` is False.
============================ ===================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from driveengine.data.fields import Field, SplitFields, field_columns, resolve_fields
from driveengine.data.filters import CACHE_FOLDER, ColumnCache, FrameFilter, Selection, select_frames
from driveengine.data.plan import plan_epoch
from driveengine.data.reader import (
    BlobFiles,
    LogReader,
    ReadOptions,
    StreamError,
    arrow_column_to_numpy,
    join_path,
)
from driveengine.data.ring import BatchRing, RingLoader, SlotClaim, is_spawning, ring_size
from driveengine.errors import DriveEngineError
from driveengine.geometry import relative_transform
from driveengine.schemas.classes import ClassTable
from driveengine.schemas.grid import VoxelGrid
from driveengine.schemas.occ import REQUIRED_ARRAYS
from driveengine.store.cache import (
    DEFAULT_LIMIT_BYTES,
    CacheStats,
    Prefetcher,
    Version,
    cached_url,
    default_cache_dir,
    file_cache,
    read_json,
    register_versions,
)
from driveengine.store.dataset import CommittedLog, open_split

__all__ = ["OCC_FIELDS", "FrameStream", "StreamError", "arrow_column_to_numpy"]

logger = logging.getLogger(__name__)

#: The label arrays every split with labels holds (the default fields).
OCC_FIELDS: tuple[str, ...] = REQUIRED_ARRAYS


def _resolve_distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's DDP rank and world size: explicit, else torch.distributed, else env, else 0/1."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (r if rank is None else int(rank)), (w if world_size is None else int(world_size))


def _alloc_block(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> np.ndarray:
    """An uninitialised array to decode frames into.

    In a DataLoader worker it is the numpy view of a torch tensor in shared memory: collate then hands
    that tensor on (see :func:`~driveengine.data.collate.collate_frames`) and the DataLoader passes it to
    the main process without the copy into shared memory it makes of ordinary tensors.
    """
    if not shared:
        return np.empty(shape, dtype=dtype)
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).share_memory_().numpy()


def _is_remote(url: str) -> bool:
    """Whether ``url`` names remote data (an fsspec URL other than ``file://``)."""
    return "://" in url and not url.startswith("file://")


def _runs(keys: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of the maximal runs of equal consecutive ``keys`` (a batch window: Python ints)."""
    values = keys.tolist()
    out, a = [], 0
    for b in range(1, len(values) + 1):
        if b == len(values) or values[b] != values[b - 1]:
            out.append((a, b))
            a = b
    return out


class EpochCursor:
    """Where an epoch-based stream stands: the epoch, the samples of its global order consumed before this
    run (``_start``, set by a resume) and the samples this process yielded since (``_yielded``, in-process
    loading). Shared by :class:`FrameStream` and :class:`~driveengine.data.mix.MixedStream`; a subclass
    sets ``global_batch_size`` and ``world_size``.
    """

    global_batch_size: int | None
    world_size: int
    _epoch: int = 0
    _start: int = 0
    _yielded: int = 0

    @property
    def device_batch_size(self) -> int:
        """Samples per batch on this rank: ``global_batch_size / world_size`` (1 without a global batch)."""
        return 1 if self.global_batch_size is None else self.global_batch_size // self.world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle); a different epoch than a resumed one starts from its beginning."""
        if int(epoch) != self._epoch:
            self._start = 0
            self._yielded = 0
        self._epoch = int(epoch)


class FrameStream(EpochCursor, IterableDataset):
    """Streams the key frames of a collected split, sharded over DDP ranks and DataLoader workers.

    Args:
        root: the collect output folder ``OUT`` (local path or fsspec URL); the split is ``OUT/<split>``.
        split: split folder name.
        fields: what each sample holds (:mod:`driveengine.data.fields`): the split's label arrays
            (``semantics``, ``flow``, ``mask_lidar``, ...), ``points``, ``images``, any registered field
            and any column of ``meta/<log>.parquet``. Only these are read; unknown names are refused here.
        history: number of previous key frames of the same scene to add (see the module docstring).
        shuffle, seed, block_size: the epoch order (:func:`driveengine.data.plan.global_order`).
        global_batch_size: samples per optimiser step over all ranks; makes the batch sequence the same
            for any number of ranks and workers, and sets the DataLoader batch size per rank.
        drop_last: drop the epoch's tail that does not fill a global batch instead of padding it by
            repeating samples from the start of the epoch's order (the default).
        rank, world_size: override the DDP rank / world size (default: torch.distributed when
            initialised, else the ``RANK`` / ``WORLD_SIZE`` environment variables, else 0 / 1).
        storage_options: fsspec options for a URL ``root`` (e.g. ``{"endpoint_url": ..., "key": ...}``).
        blob_root: folder or URL the frame rows' sensor paths start from, for ``points`` / ``images``;
            default: the one each log was collected with (its manifest entry). ``sensor_root`` is its
            old name.
        sensor_storage_options: fsspec options for ``blob_root`` (default: ``storage_options``).
        image_size: (width, height) in pixels of the resized camera images.
        image_dtype: ``"float32"`` (RGB in [0, 1], the default) or ``"uint8"`` (RGB 0..255: a quarter of the
            bytes through the loader; make the floats on the device with
            :func:`driveengine.data.collate.images_to_float`, which gives exactly the float32 values).
        point_sweeps: previous key frames of the scene merged into ``points``.
        logs: stream only these logs (default: every committed log).
        where: stream only the frames for which this boolean pyarrow compute expression over the metadata
            columns holds, e.g. ``pc.field("map_location") == "las_vegas"`` (:mod:`driveengine.data.filters`).
        scenario_tags: stream only frames with at least one of these scenario tags.
        map_locations: stream only frames of these map locations.
        fast_reads: read whole frames of the label shards directly (:mod:`driveengine.store.shards`)
            instead of through ``zarr`` (same bytes, less overhead); off for debugging.
        max_open_logs: logs whose opened label groups and metadata columns a worker keeps (least
            recently used dropped); with a full shuffle over many logs, ``block_size`` keeps a worker's
            reads within few logs at a time.
        cache_dir: for a URL ``root`` or ``blob_root`` (``s3://``, any fsspec URL): the local folder that
            caches the remote files (:mod:`driveengine.store.cache`; default ``$DRIVEENGINE_CACHE_DIR``,
            else ``~/.cache/driveengine/remote``). Shared safely by workers, ranks and runs on a machine.
            A filter over many logs also keeps the columns it read there (:class:`~driveengine.data.filters.ColumnCache`).
        cache_limit_bytes: the cache folder's size limit (least recently used files evicted); 0 reads
            remote files directly, without a cache.
        prefetch: batch windows of its plan each process fetches into the cache ahead of reading them
            (on a few threads; 0: none). Only for remote data with a cache.

    Raises:
        ManifestError: no manifest, or a manifest of a newer format version.
        StreamError: an unknown field, a bad filter or one that selects nothing, inconsistent options.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        fields: Sequence[str] = OCC_FIELDS,
        history: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        global_batch_size: int | None = None,
        *,
        drop_last: bool = False,
        block_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
        blob_root: str | os.PathLike[str] | None = None,
        sensor_root: str | os.PathLike[str] | None = None,
        sensor_storage_options: dict[str, Any] | None = None,
        image_size: tuple[int, int] = (384, 216),
        image_dtype: str = "float32",
        point_sweeps: int = 0,
        logs: Sequence[str] | None = None,
        where: pc.Expression | None = None,
        scenario_tags: Sequence[str] | None = None,
        map_locations: Sequence[str] | None = None,
        fast_reads: bool = True,
        max_open_logs: int = 64,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        prefetch: int = 2,
    ) -> None:
        super().__init__()
        self.root = os.fspath(root)
        self.split = split
        self.fields = tuple(fields)
        self.history = int(history)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self.drop_last = bool(drop_last)
        self.block_size = block_size
        self.storage_options = dict(storage_options or {})
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.image_dtype = str(image_dtype)
        self.point_sweeps = int(point_sweeps)
        self.fast_reads = bool(fast_reads)
        self.max_open_logs = max(int(max_open_logs), 1)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else str(default_cache_dir())
        self.cache_limit_bytes = int(cache_limit_bytes)
        self.prefetch = int(prefetch)
        self.rank, self.world_size = _resolve_distributed(rank, world_size)
        if self.cache_limit_bytes < 0 or self.prefetch < 0:
            raise StreamError(
                f"cache_limit_bytes ({cache_limit_bytes}) and prefetch ({prefetch}) must be >= 0"
            )
        if self.history < 0 or self.point_sweeps < 0:
            raise StreamError(f"history ({history}) and point_sweeps ({point_sweeps}) must be >= 0")
        if len(set(self.fields)) != len(self.fields) or not self.fields:
            raise StreamError(f"fields must be a non-empty list of distinct names, got {list(fields)}")
        if self.global_batch_size is not None and self.global_batch_size % self.world_size:
            raise StreamError(
                f"global batch size {self.global_batch_size} is not a multiple of the world size {self.world_size}"
            )

        root_of_blobs = blob_root if blob_root is not None else sensor_root
        self.split_url = join_path(self.root, split)
        # Remote data is read through the local cache (the dataset handle and zarr see ``drivecache::``).
        self._cache_options = (
            {"cache_dir": self.cache_dir, "cache_limit_bytes": self.cache_limit_bytes}
            if self.cache_limit_bytes > 0
            else {}
        )
        remote = _is_remote(self.split_url) and bool(self._cache_options)
        self.dataset = open_split(
            cached_url(self.split_url) if remote else self.split_url,
            {**self.storage_options, **self._cache_options} if remote else self.storage_options,
            root_of_blobs,
        )
        self.manifest = self.dataset.manifest
        self.blob_root = self.dataset.blob_root
        self.sensor_storage_options = dict(
            sensor_storage_options if sensor_storage_options is not None else self.storage_options
        )
        self._cache_versions = self._versions() if self._cache_options else {}
        self._register_versions()
        candidates = self.dataset.logs
        if logs is not None:
            unknown = sorted(set(logs) - {log.name for log in candidates})
            if unknown:
                raise StreamError(f"{self.split_url}: logs {unknown} are not in the manifest")
            candidates = [log for log in candidates if log.name in set(logs)]
        self._options = ReadOptions(
            image_size=self.image_size,
            point_sweeps=self.point_sweeps,
            cameras=self.manifest.dataset.cameras,
            fast_reads=self.fast_reads,
            sensor_storage_options=self.sensor_storage_options,
            image_dtype=self.image_dtype,
        )
        catalog = SplitFields(self.dataset, [log for log in candidates if log.entry.frames > 0])
        self._fields: tuple[Field, ...] = resolve_fields(self.fields, catalog, self._options)

        self.filter = FrameFilter(
            where=where, scenario_tags=tuple(scenario_tags or ()), map_locations=tuple(map_locations or ())
        )
        schema = catalog.schema if not self.filter.is_empty else None
        # the filter's columns of many logs are kept in the cache folder (``cache_limit_bytes=0``: not)
        columns_cache = ColumnCache(Path(self.cache_dir) / CACHE_FOLDER) if self._cache_options else None
        self.selection: Selection = select_frames(
            candidates, self.filter, schema, self.split_url, columns_cache
        )
        if self.selection.total == 0:
            raise StreamError(f"{self.split_url}: the manifest lists no frames; collect some logs first")
        if self.selection.num_frames == 0:
            raise StreamError(
                f"{self.split_url}: the filter ({self.filter.describe()}) selects none of the "
                f"{self.selection.total} frames of {len(catalog.logs)} logs; loosen it (`driveengine stats "
                f"{self.split_url}` lists the split's scenario tags)"
            )
        if not self.filter.is_empty:
            logger.info(
                "%s: filter %s selects %s", self.split_url, self.filter.describe(), self.selection.describe()
            )
        self.log_names: list[str] = self.selection.log_names
        self.frame_counts = self.selection.counts
        self.offsets = self.selection.offsets

        # Metadata columns each reader loads together (one Parquet read per log and worker).
        meta = list(field_columns(self._fields, self._options))
        if self.history:
            meta += ["scene_token", "ego2global", "token"]
        self._meta_columns = tuple(dict.fromkeys([*meta, "token"]))
        self._readers: OrderedDict[int, LogReader] = OrderedDict()
        self._readers_pid = os.getpid()
        self._blobs = BlobFiles(self.sensor_storage_options, self._cache_options)
        self._token_index: dict[str, int] | None = None
        self._prefetch_state: _PrefetchState | None = None
        # The zero-copy loader (driveengine.data.ring): the stream's ring, kept across epochs and loaders;
        # the ring attached while a loader starts its workers (they decode into it), its generation, and
        # the loader's batch size (the workers' read window).
        self._own_ring: BatchRing | None = None
        self._ring: BatchRing | None = None
        self._ring_generation = 0
        self._window: int | None = None

    # -- what the split is -------------------------------------------------------------------------
    @property
    def dataset_name(self) -> str:
        """The dataset the split holds (``nuplan``, ``nuscenes``, ...): every sample's ``dataset``."""
        return self.dataset.dataset_name

    @property
    def grid(self) -> VoxelGrid:
        """The voxel grid of the split's labels."""
        return self.dataset.grid

    @property
    def classes(self) -> ClassTable:
        """The class table of the split's labels (``semantics`` ids)."""
        return self.dataset.classes

    @property
    def cameras(self) -> tuple[str, ...]:
        """The dataset's camera channels in order (the order of ``images``), read from the data."""
        return self.dataset.cameras

    # -- set-up ------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # open files stay in the process that opened them
        state["_own_ring"] = None  # the main process's; a spawned worker gets the attached ring only
        state["_prefetch_state"] = None  # threads stay in their process
        if not is_spawning():
            state["_ring"], state["_window"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register_versions()  # a spawned worker: its own cache registry

    # -- the cache of remote files -------------------------------------------------------------------
    def _versions(self) -> dict[str, Version]:
        """The version of every remote file or folder of the split the cache may hold: a log's frame shard
        and label group are keyed by a digest of its manifest entry (re-collected: fetched again), the shard
        also checked against its recorded sha256; sensor files under a remote blob root by their URL."""
        out: dict[str, Version] = {}
        roots = {self.blob_root} if self.blob_root else set()
        remote = _is_remote(self.split_url)
        for entry in self.manifest.logs.values():
            if remote:
                record = json.dumps(entry.to_json(), sort_keys=True, default=str)
                digest = hashlib.sha256(record.encode()).hexdigest()
                recorded = entry.checksums.get(entry.meta, "")
                sha = recorded if recorded.startswith("sha256:") else None
                out[join_path(self.split_url, entry.meta)] = Version(f"log:{digest}", sha)
                if entry.occ:
                    out[join_path(self.split_url, entry.occ)] = Version(f"log:{digest}")
            if not self.blob_root and entry.source.blob_root:
                roots.add(entry.source.blob_root)
        for root in roots:
            if _is_remote(root):
                out[root] = Version("blobs")  # released sensor files do not change: keyed by URL
        return out

    def _register_versions(self) -> None:
        if self._cache_versions:
            register_versions(self.cache_dir, self.cache_limit_bytes, self._cache_versions)

    def cache_stats(self) -> CacheStats | None:
        """This process's counters of the cache of remote files (None: not reading through one)."""
        if not self._cache_versions:
            return None
        return file_cache(self.cache_dir, self.cache_limit_bytes).stats()

    def _prefetcher(self) -> _PrefetchState | None:
        """The process's prefetch state (None without a cache or with ``prefetch=0``)."""
        if not self._cache_versions or not self.prefetch:
            return None
        self._check_process()
        if self._prefetch_state is None:
            self._prefetch_state = _PrefetchState(self)
        return self._prefetch_state

    # -- the zero-copy loader ----------------------------------------------------------------------
    @property
    def attached_ring(self) -> BatchRing | None:
        """The batch ring DataLoader workers decode into (set while a :class:`RingLoader` starts them)."""
        return self._ring

    def attach_ring(self, ring: BatchRing | None, generation: int, window: int | None) -> None:
        """Attach the ring that the workers about to start decode into (:class:`RingLoader`), the generation
        they claim slots under and the loader's batch size (their read window); ``None`` detaches."""
        self._ring, self._ring_generation, self._window = ring, int(generation), window

    def batch_layout(self, batch_size: int) -> int:
        """Bytes one batch of ``batch_size`` samples needs in a ring slot: every fixed-size array field
        (and its history), plus room for the batch's small tensors (ragged ``points`` and anything
        bigger make a ring grow once they are seen: :attr:`RingStats.wanted_bytes`)."""
        from driveengine.data.ring import SLOT_ALIGN

        total = 0
        reader = self._reader(int(self.selection.locate(np.zeros(1, dtype=np.int64))[0][0]))
        for field in self._fields:
            layout = field.frame_layout(reader)
            if layout is None:
                continue
            frame = int(np.prod(layout[0], dtype=np.int64)) * np.dtype(layout[1]).itemsize
            copies = 1 + (self.history if field.history else 0)
            total += copies * (-(-batch_size * frame // SLOT_ALIGN) * SLOT_ALIGN)
        return total + 64 * 1024 + batch_size * 16 * 1024

    def _ring_for(
        self, num_workers: int, prefetch_factor: int, held_batches: int, batch_size: int
    ) -> BatchRing:
        """The stream's ring for a loader: the current one when it is large enough, else a new one (sized
        for ``batch_size`` and for the largest batch a previous ring saw)."""
        slots = ring_size(num_workers, prefetch_factor, held_batches)
        ring = self._own_ring
        wanted = self.batch_layout(batch_size)
        if ring is not None:
            wanted = max(wanted, ring.stats().wanted_bytes)
            if ring.slots >= slots and ring.slot_bytes >= wanted:
                return ring
            wanted = max(wanted, int(ring.slot_bytes))
        self._own_ring = BatchRing(slots, wanted + wanted // 8 if ring is not None else wanted)
        return self._own_ring

    def _check_process(self) -> None:
        """In a forked DataLoader worker: open its own files (readers, blob file systems, prefetch threads)."""
        if self._readers_pid != os.getpid():
            self._readers, self._readers_pid = OrderedDict(), os.getpid()
            self._blobs = BlobFiles(self.sensor_storage_options, self._cache_options)
            self._prefetch_state = None

    def _reader(self, log_index: int) -> LogReader:
        """The reader of a log in this process; the least recently used beyond ``max_open_logs`` are dropped."""
        self._check_process()
        reader = self._readers.get(log_index)
        if reader is None:
            log = self.selection.logs[log_index]
            fresh = CommittedLog(log.name, log.entry, self.dataset)  # labels opened in this process only
            reader = self._readers[log_index] = LogReader(
                fresh, self._meta_columns, self._options, self._blobs
            )
            while len(self._readers) > self.max_open_logs:
                self._readers.popitem(last=False)
        else:
            self._readers.move_to_end(log_index)
        return reader

    # -- epochs and resume -------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        """Frames the stream serves (of the selected logs, after the filters): the range of ``stream[i]``."""
        return self.selection.num_frames

    def _plan(self, worker: int = 0, num_workers: int = 1):
        return plan_epoch(
            self.frame_counts,
            seed=self.seed,
            epoch=self._epoch,
            shuffle=self.shuffle,
            block_size=self.block_size,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            global_batch_size=self.global_batch_size,
            start=self._start,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        """Samples this rank yields in the current epoch from the resume point (padding included): what a
        ``DataLoader`` over this ``IterableDataset`` counts. Map-style indices range over :attr:`num_frames`."""
        return len(self._plan().frames)

    def state_dict(self, num_samples: int | None = None) -> dict[str, Any]:
        """The resume state: epoch and global samples consumed in it.

        Args:
            num_samples: samples of the epoch consumed by all ranks together, counted from the start
                of the epoch (a training loop passes ``steps_in_epoch * global_batch_size``). Default:
                counted by this object, which only sees samples when loading in-process
                (``num_workers=0``).

        Returns:
            ``epoch``, ``num_samples``, ``seed``, ``shuffle``, ``global_batch_size``, ``num_frames`` and,
            for a filtered stream, ``subset`` (a fingerprint of the selected frames: a state resumes only
            over the same subset).
        """
        if num_samples is None:
            num_samples = self._start + self._yielded * self.world_size
        state: dict[str, Any] = {
            "epoch": self._epoch,
            "num_samples": int(num_samples),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "num_frames": self.num_frames,
        }
        if self.selection.digest:
            state["subset"] = self.selection.digest
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues epoch ``state["epoch"]`` after its consumed samples.

        Raises:
            StreamError: the state belongs to another seed, shuffle, batch size, dataset size or subset,
                or stops inside a global batch.
        """
        mine = self.state_dict()
        for key in ("seed", "shuffle", "global_batch_size", "num_frames"):
            if key in state and state[key] != mine[key]:
                raise StreamError(
                    f"{self.split_url}: cannot resume, the saved loader state has {key}={state[key]!r} but "
                    f"this FrameStream has {mine[key]!r}"
                )
        if state.get("subset", "") != mine.get("subset", ""):
            raise StreamError(
                f"{self.split_url}: cannot resume, the saved loader state is of another selection of frames "
                f"(subset {state.get('subset') or 'all'!r}, this FrameStream {mine.get('subset') or 'all'!r}); "
                "resume with the filters of the run that saved it"
            )
        batch = self.global_batch_size or self.world_size
        if int(state["num_samples"]) % batch or int(state["num_samples"]) < 0:
            raise StreamError(
                f"{self.split_url}: cannot resume after {state['num_samples']} samples: not a whole number of "
                f"global batches of {batch} (save the state at an optimiser-step boundary)"
            )
        self._epoch = int(state["epoch"])
        self._start = int(state["num_samples"])
        self._yielded = 0

    # -- reading -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self._plan(worker, num_workers)
        logs, rows = self.selection.locate(plan.frames)
        window = max(self._window or plan.device_batch_size, 1)
        in_process = info is None
        if in_process:
            self._yielded = 0
        ring = None if in_process else self._ring
        starts = list(range(0, len(rows), window))
        prefetcher = self._prefetcher()
        queued = 0
        try:
            for i, s in enumerate(starts):
                while prefetcher is not None and queued < len(starts) and queued <= i + self.prefetch:
                    q = starts[queued]
                    prefetcher.window(logs[q : q + window], rows[q : q + window])
                    queued += 1
                yield from self._window_samples(logs, rows, plan.positions, s, window, ring, in_process)
        finally:
            if prefetcher is not None:
                prefetcher.close()

    def _window_samples(
        self,
        logs: np.ndarray,
        rows: np.ndarray,
        positions: np.ndarray,
        s: int,
        window: int,
        ring: BatchRing | None,
        in_process: bool,
    ) -> Iterator[dict[str, Any]]:
        """The samples of the window starting at plan entry ``s`` (in a ring slot when a ring is given)."""
        claim = None if ring is None else ring.claim(self._ring_generation)
        try:
            samples = self._read_window(
                logs[s : s + window], rows[s : s + window], positions[s : s + window], claim
            )
        except BaseException:
            if claim is not None and ring is not None:
                ring.abandon(claim)
            raise
        for sample in samples:
            if in_process:
                self._yielded += 1
            yield sample

    def _read_window(
        self, logs: np.ndarray, rows: np.ndarray, positions: np.ndarray, claim: SlotClaim | None = None
    ) -> list[dict[str, Any]]:
        """Samples of consecutive plan entries; fixed-size arrays decoded into one preallocated block per
        field (in the ring slot of ``claim`` when given and while it has room), each run of the same log
        read by each field as one block of rows."""
        n = len(rows)
        runs = _runs(logs)
        samples: list[dict[str, Any]] = []
        for a, b in runs:
            reader = self._reader(int(logs[a]))
            tokens = reader.column("token")
            for i in range(a, b):
                samples.append(
                    {
                        "token": tokens[rows[i]],
                        "log_name": reader.name,
                        "row": int(rows[i]),
                        "sample_index": int(positions[i]),
                        "dataset": self.dataset_name,
                    }
                )
        in_worker = get_worker_info() is not None
        for field in self._fields:
            layout = field.frame_layout(self._reader(int(logs[0])))
            block = None
            if layout is not None:
                shape = (n, *layout[0])
                if claim is not None and self._ring is not None:
                    block = self._ring.alloc(claim, shape, layout[1])
                if block is None:
                    block = _alloc_block(shape, layout[1], shared=in_worker)
            for a, b in runs:
                reader = self._reader(int(logs[a]))
                values = field.read(reader, rows[a:b], None if block is None else block[a:b])
                for key, value in values.items():
                    if block is not None and key == field.name:
                        continue
                    for i in range(a, b):
                        samples[i][key] = value[i - a]
            if block is not None:
                for i in range(n):
                    samples[i][field.name] = block[i]  # views of one block: collate stacks without a copy
        if self.history:
            for i in range(n):
                self._add_history(self._reader(int(logs[i])), int(rows[i]), samples[i])
        return samples

    def _add_history(self, reader: LogReader, row: int, sample: dict[str, Any]) -> None:
        """The ``history_*`` entries of one sample (see the module docstring)."""
        hist_rows, valid = reader.history_rows(row, self.history)
        poses = reader.column("ego2global")
        tokens = reader.column("token")
        sample["history_tokens"] = [tokens[r] for r in hist_rows]
        sample["history_valid"] = valid
        sample["ego_from_history"] = relative_transform(poses[row], poses[hist_rows])
        for field in self._fields:
            if field.history:
                for key, value in field.read_history(reader, hist_rows).items():
                    sample[f"history_{key}"] = value

    # -- random access -----------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, Any]:
        """The ``index``-th frame of the stream in stored order (see the module docstring), as iteration
        yields it, ``sample_index`` -1. Negative indices count from the end.

        Raises:
            IndexError: ``index`` is not in ``-num_frames .. num_frames - 1``.
        """
        i = int(index)
        if not -self.num_frames <= i < self.num_frames:
            raise IndexError(
                f"{self.split_url}: frame index {index} out of range (num_frames {self.num_frames})"
            )
        logs, rows = self.selection.locate(np.array([i % self.num_frames], dtype=np.int64))
        return self._read_window(logs, rows, np.array([-1]))[0]

    def index_of(self, token: str) -> int:
        """The map-style index of the frame ``token`` (``stream[stream.index_of(t)]`` is that frame).

        The token index is built on first use from the ``token`` column of every selected log.

        Raises:
            KeyError: no frame the stream serves has this token (another log, or filtered out).
        """
        if self._token_index is None:
            index: dict[str, int] = {}
            for li, log in enumerate(self.selection.logs):
                try:
                    tokens = log.frames(["token"]).column("token").to_pylist()
                except DriveEngineError as exc:
                    raise self._reader(li).wrap_error(exc) from None
                first = int(self.offsets[li])
                rows = (
                    range(len(tokens))
                    if self.selection.rows is None
                    else self.selection.rows[first : int(self.offsets[li + 1])].tolist()
                )
                for k, row in enumerate(rows):
                    index[tokens[row]] = first + k
            self._token_index = index
        if token not in self._token_index:
            raise KeyError(
                f"{self.split_url}: no frame with token {token!r} among the frames this stream serves"
            )
        return self._token_index[token]

    def get(self, token: str) -> dict[str, Any]:
        """The sample of the key frame ``token`` (the same content as streamed, ``sample_index`` -1).

        Raises:
            KeyError: no frame the stream serves has this token.
        """
        return self[self.index_of(token)]

    # -- convenience -------------------------------------------------------------------------------
    def loader(
        self,
        num_workers: int = 0,
        batch_size: int | None = None,
        *,
        zero_copy: bool = True,
        held_batches: int = 2,
        **kwargs: Any,
    ) -> DataLoader:
        """A ``DataLoader`` over this stream: batch size = :attr:`device_batch_size` (or ``batch_size``
        without a global batch size), :func:`~driveengine.data.collate.collate_frames`, pinned memory when
        CUDA is available, ``prefetch_factor`` 2 with workers. Extra keyword arguments go to ``DataLoader``.

        With workers and ``zero_copy`` (the default) it is a :class:`~driveengine.data.ring.RingLoader`: the
        workers decode into a ring of shared-memory batch slots that the stream keeps across epochs and
        loaders, and the batches are views of those slots (no copy, no allocation per batch; see
        :mod:`driveengine.data.ring`). A batch stays valid as long as you hold it; holding more than
        ``held_batches`` batches at once (besides the one being fetched) stays correct but slows the
        loader down (``.clone()`` what you keep for long). ``zero_copy=False``: the plain DataLoader path.

        Raises:
            StreamError: a ``batch_size`` that is not the device batch of a global batch size.
        """
        from driveengine.data.collate import collate_frames

        if self.global_batch_size is not None and batch_size not in (None, self.device_batch_size):
            raise StreamError(
                f"batch_size {batch_size} differs from the device batch {self.device_batch_size} "
                f"(global batch {self.global_batch_size} / world size {self.world_size})"
            )
        if held_batches < 0:
            raise StreamError(f"held_batches must be >= 0, got {held_batches}")
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        batch = batch_size or self.device_batch_size
        if num_workers > 0:
            kwargs.setdefault("prefetch_factor", 2)
        if num_workers > 0 and zero_copy:
            prefetch = int(kwargs["prefetch_factor"])
            return RingLoader(
                self,
                lambda b: self._ring_for(num_workers, prefetch, held_batches, b),
                batch_size=batch,
                num_workers=num_workers,
                collate_fn=collate_frames,
                **kwargs,
            )
        return DataLoader(
            self, batch_size=batch, num_workers=num_workers, collate_fn=collate_frames, **kwargs
        )


class _PrefetchState:
    """What one process fetches into the cache ahead of reading (``FrameStream(prefetch=...)``): for each
    batch window of its plan, per log, the frame shard, the label groups' metadata and the shard files
    holding the window's rows of every label array it reads, and the sensor files of ``points`` and
    ``images``. Jobs run on a few threads (:class:`~driveengine.store.cache.Prefetcher`); a failed one is
    only logged (the reader then reads the file itself and reports what is wrong)."""

    THREADS = 4

    def __init__(self, stream: FrameStream) -> None:
        self.stream = stream
        self.fs = stream.dataset.fs
        self.arrays = tuple(f.label_array for f in stream._fields if f.label_array is not None)
        names = {f.name for f in stream._fields}
        self.blob_columns = tuple(
            c for c, field in (("lidar_path", "points"), ("cams", "images")) if field in names
        )
        self._pool: Prefetcher | None = None
        self._lock = threading.Lock()
        self._layouts: dict[tuple[int, str], tuple[int, int, str] | None] = {}
        self._columns: dict[int, dict[str, list[Any]]] = {}

    def window(self, logs: np.ndarray, rows: np.ndarray) -> None:
        """Queue the fetches of one batch window (log indices, rows)."""
        if self._pool is None:
            self._pool = Prefetcher(self.THREADS, max_queued=8 * self.THREADS)
        for a, b in _runs(logs):
            li, part = int(logs[a]), rows[a:b].copy()
            self._pool.submit(lambda li=li, part=part: self._fetch(li, part))

    def close(self) -> None:
        """Drop the queued fetches (running ones finish); the next window starts new threads."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _fetch(self, li: int, rows: np.ndarray) -> None:
        log = self.stream.selection.logs[li]
        self._get(log.meta_path)
        occ = log.occ_path
        if self.arrays and occ is not None:
            self._get(join_path(occ, "zarr.json"))
            for array in self.arrays:
                layout = self._layout(li, occ, array)
                if layout is None:
                    continue
                shard_frames, ndim, separator = layout
                for shard in np.unique(rows // shard_frames).tolist():
                    key = separator.join(["c", str(shard), *(["0"] * (ndim - 1))])
                    self._get(f"{join_path(occ, array)}/{key}")
        if self.blob_columns and log.blob_root:
            sweeps = self.stream.point_sweeps
            wanted = np.unique(np.concatenate([np.maximum(rows - j, 0) for j in range(sweeps + 1)]))
            columns = self._frame_columns(li)
            for row in wanted.tolist():
                for relative in self._blob_files(columns, row):
                    self.stream._blobs.prefetch(join_path(os.fspath(log.blob_root), relative))

    def _get(self, path: str) -> None:
        prefetch = getattr(self.fs, "prefetch", None)
        if prefetch is not None:
            prefetch(path)  # the cache's: only a stat when the file is there
        else:
            self.fs.size(path)

    def _layout(self, li: int, occ: str, array: str) -> tuple[int, int, str] | None:
        """(frames per shard, dimensions, key separator) of a label array, from its ``zarr.json`` (read
        through the cache); None when it is not the layout :mod:`driveengine.store.shards` reads."""
        with self._lock:
            if (li, array) in self._layouts:
                return self._layouts[(li, array)]
        meta = read_json(self.fs, join_path(join_path(occ, array), "zarr.json"))
        layout = None
        try:
            if meta is not None and meta["chunk_key_encoding"]["name"] == "default":
                frames = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
                separator = str(meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/"))
                layout = (frames, len(meta["shape"]), separator) if frames > 0 else None
        except (KeyError, TypeError, ValueError, IndexError):
            layout = None
        with self._lock:
            self._layouts[(li, array)] = layout
        return layout

    def _frame_columns(self, li: int) -> dict[str, list[Any]]:
        with self._lock:
            if li in self._columns:
                return self._columns[li]
        table = self.stream.selection.logs[li].frames(list(self.blob_columns))
        columns = {c: table.column(c).to_pylist() for c in self.blob_columns}
        with self._lock:
            self._columns[li] = columns
        return columns

    def _blob_files(self, columns: dict[str, list[Any]], row: int) -> list[str]:
        files = []
        if "lidar_path" in columns and columns["lidar_path"][row]:
            files.append(columns["lidar_path"][row])
        if "cams" in columns and columns["cams"][row]:
            files += [
                cam["data_path"] for cam in columns["cams"][row].values() if cam and cam.get("data_path")
            ]
        return files
