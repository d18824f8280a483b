"""``FrameStream``: a streaming ``torch.utils.data.IterableDataset`` over a collected split (DESIGN §3–§4).

Reads ``<root>/<split>/manifest.json`` once (no directory walks), then, per DataLoader worker, only the
files its samples need: the requested columns of ``meta/<log>.parquet`` (once per log and worker), the
requested arrays of ``occ/<log>.zarr`` (opened once per log and worker, one whole chunk per frame,
decoded into preallocated arrays, consecutive frames of a log in one read), ``.pcd`` point clouds and
camera images. ``root`` may be a local folder or an fsspec URL (``s3://bucket/prefix`` with s3fs; pass
``storage_options``, e.g. ``{"endpoint_url": ...}``).

Which sample each rank and worker reads is decided by :mod:`driveengine.data.plan` (global order
first, then dealt out; padding of uneven splits, resume); see there.

A sample is a dict:

============================ ===================================================================
key                          value
============================ ===================================================================
``token``, ``log_name``      the key frame's token and log (str)
``row``                      row of the frame in ``meta/<log>.parquet`` (int)
``sample_index``             position in the epoch's padded global order (int; -1 from :meth:`get`)
``semantics``                (nx, ny, nz) uint8 class ids, FREE = 16
``flow``                     (nx, ny, nz, 2) float16 (vx, vy) m/s, ego frame of the frame
``mask_lidar``               (nx, ny, nz) bool, observed by LiDAR
``points``                   (N, 4) float32 x, y, z (m, ego frame of the key frame), intensity;
                             with ``point_sweeps=s`` (N, 5): the previous ``s`` key frames of the
                             scene are added, moved into the key frame's ego frame, and the fifth
                             column is the time lag in seconds (0 for the key frame)
``images``                   (C, 3, H, W) float32 in [0, 1], the dataset's C cameras in its order,
                             resized to ``image_size``; with ``intrinsics`` (C, 3, 3) float64 scaled
                             to the resize and ``ego_from_camera`` (C, 4, 4) float64
any metadata column          its value: numpy arrays for fixed-size lists (``ego2global`` (4, 4)),
                             Python objects for strings, lists and structs
``history_*`` (history=k)    ``history_tokens`` (k,) str, ``history_valid`` (k,) bool,
                             ``ego_from_history`` (k, 4, 4) float64 = ``ego_t_from_ego_{t-j}`` for
                             j = 1..k, ``history_<field>`` (k, ...) for every occupancy field, and
                             with ``images`` ``history_images`` (k, C, 3, H, W),
                             ``history_intrinsics`` (k, C, 3, 3), ``history_ego_from_camera`` (k, C, 4, 4).
                             Entry ``j-1`` is the frame ``j`` key frames earlier in the same scene;
                             before the scene start the earliest frame of the scene is repeated and
                             ``history_valid`` is False.
============================ ===================================================================
"""

from __future__ import annotations

import io
import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from driveengine.data.plan import log_offsets, plan_epoch, split_frame_ids
from driveengine.errors import DriveEngineError
from driveengine.geometry import invert_transform
from driveengine.store.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

#: Fields read from ``occ/<log>.zarr``.
OCC_FIELDS: tuple[str, ...] = ("semantics", "flow", "mask_lidar")
#: Fields read from sensor files.
SENSOR_FIELDS: tuple[str, ...] = ("points", "images")


class StreamError(DriveEngineError):
    """A collected split cannot be streamed: a missing or corrupt shard, a bad field, a bad state."""


def _join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike (always with ``/``)."""
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


def _resolve_distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's DDP rank and world size: explicit, else torch.distributed, else env, else 0/1."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (r if rank is None else int(rank)), (w if world_size is None else int(world_size))


def arrow_column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray | list[Any]:
    """One Parquet column as numpy (nested fixed-size lists of numbers become (n, a, b) arrays) or a list."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape: list[int] = []
    typ = array.type
    values = array
    while pa.types.is_fixed_size_list(typ) and values.null_count == 0:
        shape.append(typ.list_size)
        values = values.flatten()
        typ = typ.value_type
    if shape and (pa.types.is_integer(typ) or pa.types.is_floating(typ)) and values.null_count == 0:
        return values.to_numpy(zero_copy_only=False).reshape(len(array), *shape)
    if (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)) and not shape:
        if array.null_count == 0:
            return array.to_numpy(zero_copy_only=False)
    return array.to_pylist()


def _alloc_block(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> np.ndarray:
    """An uninitialised array to decode frames into.

    In a DataLoader worker it is the numpy view of a torch tensor in shared memory: collate then hands
    that tensor on (see :func:`~driveengine.data.collate.collate_frames`) and the DataLoader passes it to
    the main process without the copy into shared memory it makes of ordinary tensors.
    """
    if not shared:
        return np.empty(shape, dtype=dtype)
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).share_memory_().numpy()


class _LogReader:
    """Everything one worker reads from one log: opened lazily, once, then reused."""

    def __init__(self, stream: FrameStream, log_index: int) -> None:
        self.stream = stream
        self.name = stream.log_names[log_index]
        self.entry = stream.manifest.logs[self.name]
        self.frames = self.entry.frames
        self._occ: Any = None
        self._fast: dict[str, Any] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._columns: dict[str, np.ndarray | list[Any]] = {}

    # -- metadata --------------------------------------------------------------------------------
    def column(self, name: str) -> np.ndarray | list[Any]:
        """The whole column ``name`` of this log's frame rows (read on first use, with its siblings)."""
        if name not in self._columns:
            wanted = sorted(set(self.stream._meta_columns) | {name})
            path = _join(self.stream.split_url, self.entry.meta)
            try:
                with self.stream.fs.open(path, "rb") as f:
                    table = pq.read_table(f, columns=[c for c in wanted if c not in self._columns])
            except FileNotFoundError:
                raise StreamError(
                    f"log {self.name}: frame rows {path} are missing although the manifest lists them; "
                    "re-run `driveengine collect` for this log"
                ) from None
            except (pa.ArrowInvalid, KeyError, OSError) as exc:
                raise StreamError(
                    f"log {self.name}: cannot read columns {wanted} from {path} ({exc}); the file is corrupt "
                    "or lacks a column (check the field names)"
                ) from None
            if table.num_rows != self.frames:
                raise StreamError(
                    f"log {self.name}: {path} has {table.num_rows} rows, the manifest says {self.frames}; "
                    "the log is corrupt, re-collect it"
                )
            for c in table.column_names:
                self._columns[c] = arrow_column_to_numpy(table.column(c))
        return self._columns[name]

    # -- occupancy -------------------------------------------------------------------------------
    def occ(self) -> Any:
        """The opened occupancy group (:class:`driveengine.store.occ.OccLog`)."""
        if self._occ is None:
            from driveengine.store.occ import OccFormatError, open_occ

            rel = self.entry.occ
            if not rel:
                raise StreamError(
                    f"log {self.name}: no occupancy labels (collected without labels); drop the fields "
                    f"{[f for f in self.stream.fields if f in OCC_FIELDS]} or re-collect with labels"
                )
            url = _join(self.stream.split_url, rel)
            if self.stream.is_local and not os.path.isdir(url):
                raise StreamError(
                    f"log {self.name}: occupancy shard {url} is missing although the manifest lists it; "
                    "re-run `driveengine collect` (or `driveengine verify`) for this log"
                )
            try:
                occ = open_occ(
                    url, storage_options=None if self.stream.is_local else self.stream.storage_options
                )
            except OccFormatError as exc:
                raise StreamError(f"log {self.name}: {exc}") from None
            if occ.num_frames != self.frames:
                raise StreamError(
                    f"log {self.name}: {url} has {occ.num_frames} frames, the manifest says {self.frames}; "
                    "the log is corrupt, re-collect it"
                )
            self._occ = occ
        return self._occ

    def read_occ(self, field: str, start: int, stop: int, out: np.ndarray) -> None:
        """Decode frames ``start:stop`` of array ``field`` into ``out`` ((stop - start, ...), preallocated)."""
        from zarr.core.buffer.cpu import NDBuffer

        from driveengine.store.occ import OccDataError
        from driveengine.store.shards import ShardMissingError, ShardReadError

        fast = self._frame_reader(field)
        if fast is not None:
            try:
                fast.read(start, stop, out)
            except ShardMissingError as exc:
                raise StreamError(
                    f"log {self.name}: cannot read {field} frames {start}..{stop - 1}: {exc} although the "
                    "manifest lists the log (a deleted or lost file); re-collect this log with --overwrite "
                    "(`driveengine verify` lists every damaged file)"
                ) from None
            except ShardReadError as exc:
                raise StreamError(
                    f"log {self.name}: cannot decode {field} frames {start}..{stop - 1} ({exc}); "
                    "the chunk is truncated or corrupt, re-collect this log"
                ) from None
            return
        occ = self.occ()
        try:
            occ.check_shards(field, start, stop)  # zarr would read a missing shard as fill values
        except OccDataError as exc:
            raise StreamError(str(exc)) from None
        array = occ.array(field)
        try:
            array.get_basic_selection((slice(start, stop),), out=NDBuffer.from_numpy_array(out))
        except Exception as exc:  # zarr/codec errors have no common base class
            raise StreamError(
                f"log {self.name}: cannot decode {field} frames {start}..{stop - 1} of "
                f"{_join(self.stream.split_url, self.entry.occ or '')} ({type(exc).__name__}: {exc}); "
                "the chunk is truncated or corrupt, re-collect this log"
            ) from None

    def _frame_reader(self, field: str) -> Any:
        """The fast whole-frame reader of ``field`` (:mod:`driveengine.store.shards`), None to use zarr."""
        if field not in self._fast:
            from driveengine.store.shards import FrameArrayReader

            reader = None
            if self.stream.fast_reads:
                path = _join(self.stream.split_url, self.entry.occ or "", field)
                fs = None if self.stream.is_local else self.stream.fs
                reader = FrameArrayReader.for_array(self.occ().group[field], path.removeprefix("file://"), fs)
            self._fast[field] = reader
        return self._fast[field]

    def frame_shape(self, field: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one frame of ``field`` (cached: zarr metadata access is slow)."""
        if field not in self._shapes:
            array = self.occ().group[field]
            self._shapes[field] = (tuple(array.shape[1:]), np.dtype(array.dtype))
        return self._shapes[field]

    # -- history ---------------------------------------------------------------------------------
    def history_rows(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the ``k`` previous key frames of ``row``'s scene (nearest first) and their validity."""
        scenes = self.column("scene_token")
        rows = row - np.arange(1, k + 1)
        valid = rows >= 0
        clipped = np.maximum(rows, 0)
        scene = scenes[row]
        valid &= np.array([scenes[r] == scene for r in clipped], dtype=bool)
        # Before the scene start, repeat the scene's earliest frame (the last valid one, else the frame).
        earliest = row
        out = np.empty(k, dtype=np.int64)
        for j in range(k):  # k is a handful of frames: no hot loop
            if valid[j]:
                earliest = int(clipped[j])
            out[j] = earliest
        return out, valid

    # -- sensors ---------------------------------------------------------------------------------
    def blob_root(self) -> str:
        """Folder (or URL) of this log's sensor files: the FrameStream's ``blob_root``, else the one the
        manifest recorded when the log was collected."""
        root = self.stream.blob_root or self.entry.source.blob_root
        if not root:
            raise StreamError(
                f"log {self.name}: fields 'points'/'images' need the sensor files and the manifest does not "
                "say where they are; pass blob_root= (the folder the frame rows' sensor paths start from)"
            )
        return os.fspath(root)

    def read_bytes(self, relative: str) -> bytes:
        path = _join(self.blob_root(), relative)
        try:
            with self.stream.sensor_fs(path).open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StreamError(
                f"log {self.name}: sensor file {path} is missing (check blob_root or re-download the blobs)"
            ) from None

    def points(self, row: int) -> np.ndarray:
        """(N, 4) float32 x, y, z (ego frame, m), intensity of the key frame at ``row``."""
        from driveengine.errors import SourceError
        from driveengine.sources import get_source

        rel = self.column("lidar_path")[row]
        path = _join(self.blob_root(), rel)
        try:
            return get_source(self.entry.source.name).points_ego(
                self.read_bytes(rel), path, self.column("lidar2ego")[row]
            )
        except SourceError as exc:
            raise StreamError(f"log {self.name}: {exc}") from None

    def images(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images (C, 3, H, W) float32, intrinsics (C, 3, 3) scaled to the resize, ego_from_camera (C, 4, 4),
        cameras in the dataset's order."""
        from PIL import Image

        cams = self.column("cams")[row]
        channels = self.stream.cameras or tuple(cams)  # format 1 manifests: the shard's own order
        width, height = self.stream.image_size
        images = np.empty((len(channels), 3, height, width), dtype=np.float32)
        intrinsics = np.empty((len(channels), 3, 3))
        ego_from_camera = np.tile(np.eye(4), (len(channels), 1, 1))
        for c, channel in enumerate(channels):  # every camera of the frame, each a whole image
            cam = cams[channel]
            data = self.read_bytes(cam["data_path"])
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w0, h0 = im.size
                    im.draft("RGB", (width, height))  # JPEG: decode at a reduced scale when possible
                    rgb = im.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            except OSError as exc:
                raise StreamError(
                    f"log {self.name}: image {cam['data_path']} cannot be decoded ({exc})"
                ) from None
            images[c] = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
            scale = np.diag([width / w0, height / h0, 1.0])
            intrinsics[c] = scale @ np.asarray(cam["cam_intrinsic"], dtype=np.float64)
            ego_from_camera[c, :3, :3] = np.asarray(cam["sensor2lidar_rotation"], dtype=np.float64)
            ego_from_camera[c, :3, 3] = np.asarray(cam["sensor2lidar_translation"], dtype=np.float64)
        return images, intrinsics, ego_from_camera


class FrameStream(IterableDataset):
    """Streams the key frames of a collected split, sharded over DDP ranks and DataLoader workers.

    Args:
        root: the collect output folder ``OUT`` (local path or fsspec URL); the split is ``OUT/<split>``.
        split: split folder name.
        fields: what each sample holds: ``semantics``, ``flow``, ``mask_lidar``, ``points``, ``images``
            and any column of ``meta/<log>.parquet``. Only these are read.
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
        point_sweeps: previous key frames of the scene merged into ``points``.
        logs: restrict to these logs (default: every log of the manifest).
        fast_reads: read whole frames of the label shards directly (:mod:`driveengine.store.shards`)
            instead of through ``zarr`` (same bytes, less overhead); off for debugging.
        max_open_logs: logs whose opened label groups and metadata columns a worker keeps (least
            recently used dropped); with a full shuffle over many logs, ``block_size`` keeps a worker's
            reads within few logs at a time.

    Raises:
        ManifestError: no manifest, or a manifest of a newer format version.
        StreamError: an unknown field or inconsistent options.
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
        point_sweeps: int = 0,
        logs: Sequence[str] | None = None,
        fast_reads: bool = True,
        max_open_logs: int = 64,
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
        self.point_sweeps = int(point_sweeps)
        self.fast_reads = bool(fast_reads)
        self.max_open_logs = max(int(max_open_logs), 1)
        self.rank, self.world_size = _resolve_distributed(rank, world_size)
        if self.history < 0 or self.point_sweeps < 0:
            raise StreamError(f"history ({history}) and point_sweeps ({point_sweeps}) must be >= 0")
        if len(set(self.fields)) != len(self.fields) or not self.fields:
            raise StreamError(f"fields must be a non-empty list of distinct names, got {list(fields)}")
        if self.global_batch_size is not None and self.global_batch_size % self.world_size:
            raise StreamError(
                f"global batch size {self.global_batch_size} is not a multiple of the world size {self.world_size}"
            )

        self.is_local = "://" not in self.root or self.root.startswith("file://")
        self.fs, root_path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.split_url = _join(self.root, split)
        self.manifest = self._read_manifest(root_path)
        names = sorted(self.manifest.logs)
        if logs is not None:
            unknown = sorted(set(logs) - set(names))
            if unknown:
                raise StreamError(f"{self.split_url}: logs {unknown} are not in the manifest")
            names = [n for n in names if n in set(logs)]
        self.log_names: list[str] = [n for n in names if self.manifest.logs[n].frames > 0]
        self.frame_counts = np.array([self.manifest.logs[n].frames for n in self.log_names], np.int64)
        self.offsets = log_offsets(self.frame_counts)
        if self.offsets[-1] == 0:
            raise StreamError(f"{self.split_url}: the manifest lists no frames; collect some logs first")

        root_of_blobs = blob_root if blob_root is not None else sensor_root
        self.blob_root = None if root_of_blobs is None else os.fspath(root_of_blobs)
        self.sensor_storage_options = dict(
            sensor_storage_options if sensor_storage_options is not None else self.storage_options
        )
        self.cameras: tuple[str, ...] = tuple(self.manifest.dataset.cameras or ())
        self._sensor_fs: Any = None
        # Metadata columns each reader loads together (one Parquet read per log and worker).
        meta = [f for f in self.fields if f not in OCC_FIELDS and f not in SENSOR_FIELDS]
        if self.history or self.point_sweeps:
            meta += ["scene_token", "ego2global", "token"]
        if self.point_sweeps:
            meta.append("timestamp")
        if "points" in self.fields:
            meta += ["lidar_path", "lidar2ego"]
        if "images" in self.fields:
            meta.append("cams")
        self._meta_columns = tuple(dict.fromkeys([*meta, "token"]))
        self._epoch = 0
        self._start = 0  # samples of the epoch's global order already consumed (resume)
        self._yielded = 0  # samples yielded by this process in the current epoch (in-process loading)
        self._readers: OrderedDict[int, _LogReader] = OrderedDict()
        self._readers_pid = os.getpid()
        self._token_index: dict[str, tuple[int, int]] | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def _read_manifest(self, root_path: str) -> Manifest:
        if self.is_local:
            return load_manifest(self.split_url.removeprefix("file://"))
        path = posixpath.join(root_path, self.split, MANIFEST_NAME)
        try:
            with self.fs.open(path, "rb") as f:
                import json

                data = json.loads(f.read())
        except FileNotFoundError:
            raise ManifestError(
                f"{_join(self.split_url, MANIFEST_NAME)}: no manifest; this location holds no collected "
                "split (run `driveengine collect` first)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ManifestError(
                f"{_join(self.split_url, MANIFEST_NAME)}: unreadable manifest ({exc})"
            ) from None
        return Manifest.from_json(data, _join(self.split_url, MANIFEST_NAME))

    def sensor_fs(self, path: str) -> Any:
        """The fsspec file system of the sensor blobs (made on first use, from ``path``'s protocol)."""
        if self._sensor_fs is None:
            self._sensor_fs = fsspec.core.url_to_fs(path, **self.sensor_storage_options)[0]
        return self._sensor_fs

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # open files stay in the process that opened them
        return state

    def _reader(self, log_index: int) -> _LogReader:
        """The reader of a log in this process; the least recently used beyond ``max_open_logs`` are dropped."""
        if self._readers_pid != os.getpid():  # a forked DataLoader worker: open its own files
            self._readers, self._readers_pid = OrderedDict(), os.getpid()
        reader = self._readers.get(log_index)
        if reader is None:
            reader = self._readers[log_index] = _LogReader(self, log_index)
            while len(self._readers) > self.max_open_logs:
                self._readers.popitem(last=False)
        else:
            self._readers.move_to_end(log_index)
        return reader

    # -- epochs and resume -------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        """Frames in the split (over the selected logs)."""
        return int(self.offsets[-1])

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
        """Samples this rank yields in the current epoch (from the resume point)."""
        return len(self._plan().frames)

    def state_dict(self, num_samples: int | None = None) -> dict[str, Any]:
        """The resume state: epoch and global samples consumed in it.

        Args:
            num_samples: samples of the epoch consumed by all ranks together, counted from the start
                of the epoch (a training loop passes ``steps_in_epoch * global_batch_size``). Default:
                counted by this object, which only sees samples when loading in-process
                (``num_workers=0``).
        """
        if num_samples is None:
            num_samples = self._start + self._yielded * self.world_size
        return {
            "epoch": self._epoch,
            "num_samples": int(num_samples),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "num_frames": self.num_frames,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration continues epoch ``state["epoch"]`` after its consumed samples.

        Raises:
            StreamError: the state belongs to another seed, shuffle, batch size or dataset size, or
                stops inside a global batch.
        """
        for key in ("seed", "shuffle", "global_batch_size", "num_frames"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise StreamError(
                    f"{self.split_url}: cannot resume, the saved loader state has {key}={state[key]!r} but "
                    f"this FrameStream has {mine!r}"
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
        logs, rows = split_frame_ids(plan.frames, self.offsets)
        window = max(plan.device_batch_size, 1)
        in_process = info is None
        if in_process:
            self._yielded = 0
        for s in range(0, len(rows), window):
            for sample in self._read_window(
                logs[s : s + window], rows[s : s + window], plan.positions[s : s + window]
            ):
                if in_process:
                    self._yielded += 1
                yield sample

    def _read_window(self, logs: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> list[dict[str, Any]]:
        """Samples of consecutive plan entries; occupancy arrays decoded into one preallocated block."""
        n = len(rows)
        samples: list[dict[str, Any]] = []
        for i in range(n):
            reader = self._reader(int(logs[i]))
            samples.append(
                {
                    "token": reader.column("token")[rows[i]],
                    "log_name": reader.name,
                    "row": int(rows[i]),
                    "sample_index": int(positions[i]),
                }
            )
        occ_fields = [f for f in self.fields if f in OCC_FIELDS]
        if occ_fields:
            # Runs of consecutive rows of one log are decoded with one read each.
            breaks = np.flatnonzero((np.diff(logs) != 0) | (np.diff(rows) != 1)) + 1
            starts = np.concatenate([[0], breaks])
            stops = np.concatenate([breaks, [n]])
            in_worker = get_worker_info() is not None
            for field in occ_fields:
                shape, dtype = self._reader(int(logs[0])).frame_shape(field)
                block = _alloc_block((n, *shape), dtype, shared=in_worker)
                for a, b in zip(starts, stops, strict=True):
                    self._reader(int(logs[a])).read_occ(
                        field, int(rows[a]), int(rows[a]) + (b - a), block[a:b]
                    )
                for i in range(n):
                    samples[i][field] = block[i]
        for i in range(n):
            reader = self._reader(int(logs[i]))
            self._add_fields(reader, int(rows[i]), samples[i])
        return samples

    def _add_fields(self, reader: _LogReader, row: int, sample: dict[str, Any]) -> None:
        """Metadata, sensors and history of one sample (occupancy fields are read per window)."""
        for field in self.fields:
            if field in OCC_FIELDS:
                continue
            if field == "points":
                sample["points"] = self._points(reader, row)
            elif field == "images":
                sample["images"], sample["intrinsics"], sample["ego_from_camera"] = reader.images(row)
            else:
                value = reader.column(field)[row]
                sample[field] = value
        if self.history:
            hist_rows, valid = reader.history_rows(row, self.history)
            poses = reader.column("ego2global")
            tokens = reader.column("token")
            ego_from_global = invert_transform(poses[row])
            sample["history_tokens"] = [tokens[r] for r in hist_rows]
            sample["history_valid"] = valid
            sample["ego_from_history"] = ego_from_global @ poses[hist_rows]
            for field in self.fields:
                if field in OCC_FIELDS:
                    lo, hi = int(hist_rows.min()), int(hist_rows.max()) + 1
                    shape, dtype = reader.frame_shape(field)
                    block = np.empty((hi - lo, *shape), dtype=dtype)
                    reader.read_occ(field, lo, hi, block)
                    sample[f"history_{field}"] = block[hist_rows - lo]
            if "images" in self.fields:
                decoded = {int(r): reader.images(int(r)) for r in np.unique(hist_rows)}
                for i, key in enumerate(("history_images", "history_intrinsics", "history_ego_from_camera")):
                    sample[key] = np.stack([decoded[int(r)][i] for r in hist_rows])

    def _points(self, reader: _LogReader, row: int) -> np.ndarray:
        points = reader.points(row)
        if not self.point_sweeps:
            return points
        hist_rows, valid = reader.history_rows(row, self.point_sweeps)
        poses = reader.column("ego2global")
        times = reader.column("timestamp")
        ego_from_global = invert_transform(poses[row])
        parts = [np.concatenate([points, np.zeros((len(points), 1), np.float32)], axis=1)]
        for j in np.flatnonzero(valid):  # a few sweeps, each moved as a whole (vectorised per sweep)
            r = int(hist_rows[j])
            p = reader.points(r)
            ego_t_from_ego_r = ego_from_global @ poses[r]
            moved = p[:, :3].astype(np.float64) @ ego_t_from_ego_r[:3, :3].T + ego_t_from_ego_r[:3, 3]
            lag = (times[row] - times[r]) * 1e-6
            part = np.empty((len(p), 5), np.float32)
            part[:, :3] = moved
            part[:, 3] = p[:, 3]
            part[:, 4] = lag
            parts.append(part)
        return np.concatenate(parts, axis=0)

    # -- random access -----------------------------------------------------------------------------
    def get(self, token: str) -> dict[str, Any]:
        """The sample of the key frame ``token`` (the same content as streamed, ``sample_index`` -1).

        The token index is built on first use from the ``token`` column of every log (Arrow).

        Raises:
            KeyError: no frame of the selected logs has this token.
        """
        if self._token_index is None:
            index: dict[str, tuple[int, int]] = {}
            for li in range(len(self.log_names)):
                for row, tok in enumerate(self._reader(li).column("token")):
                    index[tok] = (li, row)
            self._token_index = index
        if token not in self._token_index:
            raise KeyError(f"{self.split_url}: no frame with token {token!r}")
        li, row = self._token_index[token]
        return self._read_window(np.array([li]), np.array([row]), np.array([-1]))[0]

    # -- convenience -------------------------------------------------------------------------------
    def loader(self, num_workers: int = 0, batch_size: int | None = None, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over this stream: batch size = :attr:`device_batch_size` (or ``batch_size``
        without a global batch size), :func:`~driveengine.data.collate.collate_frames`, pinned memory when
        CUDA is available. Extra keyword arguments go to ``DataLoader``.
        """
        from driveengine.data.collate import collate_frames

        if self.global_batch_size is not None and batch_size not in (None, self.device_batch_size):
            raise StreamError(
                f"batch_size {batch_size} differs from the device batch {self.device_batch_size} "
                f"(global batch {self.global_batch_size} / world size {self.world_size})"
            )
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        if num_workers > 0:
            kwargs.setdefault("prefetch_factor", 2)
        return DataLoader(
            self,
            batch_size=batch_size or self.device_batch_size,
            num_workers=num_workers,
            collate_fn=collate_frames,
            **kwargs,
        )
