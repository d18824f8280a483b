"""What one process of the loader reads from one committed log: :class:`LogReader`.

A :class:`LogReader` wraps the dataset handle's :class:`~driveengine.store.dataset.CommittedLog` (which
owns opening the log's frame rows and labels and checking them against the manifest and the split) and
adds what streaming needs on top: the log's metadata columns read once (one Parquet read of every
column the stream's fields need), the label arrays read whole frames at a time into preallocated
arrays (through the fast shard reader :mod:`driveengine.store.shards` by default, ``zarr`` otherwise),
and the log's sensor files read through its blob root. The loader's fields
(:mod:`driveengine.data.fields`) read a sample's values through it.

Errors of the dataset handle (:class:`~driveengine.store.dataset.DatasetError`, a missing or unreadable
frame shard, a malformed label group) reach the user as :class:`StreamError` with the handle's message
(which names the log and the file), prefixed with ``log <name>:`` where it does not say it already.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from driveengine.errors import DriveEngineError
from driveengine.store.dataset import CommittedLog
from driveengine.store.occ import OccDataError, OccLog

#: What ``images`` can be delivered as: float32 RGB in [0, 1], or uint8 RGB 0..255.
IMAGE_DTYPES: tuple[str, ...] = ("float32", "uint8")

#: A metadata column of one log: a numpy array (numbers, fixed-size lists as (n, a, b)) or a list.
Column = np.ndarray | list[Any]


class StreamError(DriveEngineError):
    """A collected split cannot be streamed: a missing or corrupt file, a bad field, a bad state."""


def join_path(base: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike (always with ``/`` for URLs)."""
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


def arrow_column_to_numpy(column: pa.ChunkedArray | pa.Array) -> Column:
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


@dataclass(frozen=True)
class ReadOptions:
    """The stream's settings that fields read with (the same for every log and process).

    Attributes:
        image_size: (width, height) in pixels of the resized camera images.
        point_sweeps: previous key frames of the scene merged into ``points``.
        cameras: the dataset's camera channels in order (the manifest's), or None (format 1: the order of
            the frame rows' ``cams``).
        fast_reads: read whole label frames through :mod:`driveengine.store.shards` (else ``zarr``).
        sensor_storage_options: fsspec options of the sensor files' blob root.
        image_dtype: ``"float32"`` (RGB in [0, 1]) or ``"uint8"`` (RGB 0..255: a quarter of the bytes; turn
            them into floats on the device with :func:`driveengine.data.collate.images_to_float`).
    """

    image_size: tuple[int, int] = (384, 216)
    point_sweeps: int = 0
    cameras: tuple[str, ...] | None = None
    fast_reads: bool = True
    sensor_storage_options: dict[str, Any] = field(default_factory=dict)
    image_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.image_dtype not in IMAGE_DTYPES:
            raise StreamError(
                f"image_dtype must be one of {', '.join(IMAGE_DTYPES)}, got {self.image_dtype!r}"
            )


class BlobFiles:
    """Reads sensor files (one fsspec file system per protocol, made on first use, per process); remote
    ones through the local cache of :mod:`driveengine.store.cache` when ``cache_options`` are given.

    Args:
        storage_options: fsspec options of the blob root.
        cache_options: ``cache_dir`` and ``cache_limit_bytes`` of the cache (empty: no cache).
    """

    def __init__(self, storage_options: dict[str, Any], cache_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options)
        self.cache_options = dict(cache_options or {})
        self._fs: dict[str, Any] = {}

    def _fs_of(self, path: str) -> tuple[Any, str]:
        """The file system of ``path`` and the path to give it."""
        from driveengine.store.cache import cached_url

        if "://" in path and self.cache_options:
            path = cached_url(path)
        protocol = path.split("://", 1)[0] if "://" in path else "file"  # drivecache::s3 for a cached URL
        fs = self._fs.get(protocol)
        if fs is None:
            options = {**self.storage_options, **self.cache_options} if protocol != "file" else {}
            fs = self._fs[protocol] = fsspec.core.url_to_fs(path, **options)[0]
        return fs, path

    def read(self, path: str, limit: int | None = None) -> bytes:
        """The bytes of ``path`` (local path or URL); with ``limit``, at most ``limit + 1`` of them (so a
        caller can tell a file larger than ``limit`` without reading it whole).

        Raises:
            FileNotFoundError: no such file.
        """
        fs, path = self._fs_of(path)
        end = None if limit is None else limit + 1
        if "::" in path:
            return fs.cat_file(path, end=end)
        with fs.open(path, "rb") as f:
            return f.read(-1 if end is None else end)

    def prefetch(self, path: str) -> None:
        """Fetch a remote sensor file into the cache (no-op for local files or without a cache)."""
        if "://" in path and self.cache_options:
            fs, path = self._fs_of(path)
            fs.prefetch(path)

    def __getstate__(self) -> dict[str, Any]:
        return {"storage_options": self.storage_options, "cache_options": self.cache_options, "_fs": {}}


class LogReader:
    """Everything one process reads from one committed log: opened lazily, once, then reused.

    Args:
        log: the committed log (a fresh :class:`CommittedLog` per process: its opened labels are not
            shared with other processes).
        columns: the metadata columns to read together on first use (one Parquet read).
        options: the stream's read settings.
        blobs: the process's sensor file reader.
    """

    def __init__(
        self, log: CommittedLog, columns: Sequence[str], options: ReadOptions, blobs: BlobFiles
    ) -> None:
        self.log = log
        self.name = log.name
        self.frames = log.entry.frames
        self.options = options
        self.blobs = blobs
        self._wanted = tuple(columns)
        self._columns: dict[str, Column] = {}
        self._fast: dict[str, Any] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    @property
    def source(self) -> str:
        """The registry name of the source that collected the log."""
        return self.log.entry.source.name

    # -- metadata --------------------------------------------------------------------------------
    def column(self, name: str) -> Column:
        """The whole column ``name`` of the log's frame rows (read on first use, with its siblings).

        Raises:
            StreamError: the frame shard is missing, unreadable, lacks a column, or disagrees with the
                manifest (the log and the file named).
        """
        if name not in self._columns:
            wanted = [c for c in dict.fromkeys([*self._wanted, name]) if c not in self._columns]
            try:
                table = self.log.frames(wanted)
            except DriveEngineError as exc:  # FramesError, DatasetError
                raise self.wrap_error(exc) from None
            for c in table.column_names:
                self._columns[c] = arrow_column_to_numpy(table.column(c))
        return self._columns[name]

    # -- labels ----------------------------------------------------------------------------------
    def labels(self) -> OccLog:
        """The log's label group (opened once, checked by the dataset handle).

        Raises:
            StreamError: no labels, a missing or malformed group, or one that disagrees with the manifest
                or the split's grid.
        """
        try:
            return self.log.labels()
        except DriveEngineError as exc:  # DatasetError
            raise self.wrap_error(exc) from None

    def frame_shape(self, array: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one frame of label array ``array`` (cached: zarr metadata access is slow).

        Raises:
            StreamError: the log's labels lack the array.
        """
        if array not in self._shapes:
            occ = self.labels()
            if array not in occ.arrays:
                raise StreamError(
                    f"log {self.name}: its labels {occ.path} hold no array {array!r} (they hold "
                    f"{', '.join(occ.arrays)}); drop the field or re-collect the log with a producer that "
                    "writes it"
                )
            z = occ.array(array)
            self._shapes[array] = (tuple(z.shape[1:]), np.dtype(z.dtype))
        return self._shapes[array]

    def read_labels(self, array: str, start: int, stop: int, out: np.ndarray) -> None:
        """Decode frames ``start:stop`` of label array ``array`` into ``out`` ((stop - start, ...), preallocated).

        Raises:
            StreamError: a shard file is missing, truncated or corrupt (the log and the file named).
        """
        from zarr.core.buffer.cpu import NDBuffer

        from driveengine.store.shards import ShardMissingError, ShardReadError

        self.frame_shape(array)  # checks that the group holds the array
        fast = self._fast_reader(array)
        if fast is not None:
            try:
                fast.read(start, stop, out)
            except ShardMissingError as exc:
                raise StreamError(
                    f"log {self.name}: cannot read {array} frames {start}..{stop - 1}: {exc} although the "
                    "manifest lists the log (a deleted or lost file); re-collect this log with --overwrite "
                    "(`driveengine verify` lists every damaged file)"
                ) from None
            except ShardReadError as exc:
                raise StreamError(
                    f"log {self.name}: cannot decode {array} frames {start}..{stop - 1} ({exc}); "
                    "the chunk is truncated or corrupt, re-collect this log"
                ) from None
            return
        occ = self.labels()
        try:
            occ.check_shards(array, start, stop)  # zarr would read a missing shard as fill values
        except OccDataError as exc:
            raise StreamError(str(exc)) from None
        try:
            occ.array(array).get_basic_selection((slice(start, stop),), out=NDBuffer.from_numpy_array(out))
        except Exception as exc:  # zarr/codec errors have no common base class
            raise StreamError(
                f"log {self.name}: cannot decode {array} frames {start}..{stop - 1} of {occ.path} "
                f"({type(exc).__name__}: {exc}); the chunk is truncated or corrupt, re-collect this log"
            ) from None

    def _fast_reader(self, array: str) -> Any:
        """The fast whole-frame reader of ``array`` (:mod:`driveengine.store.shards`), None to use zarr."""
        if array not in self._fast:
            from driveengine.store.shards import FrameArrayReader

            reader = None
            if self.options.fast_reads:
                occ = self.labels()
                split = self.log.split
                path = join_path(occ.path, array)
                reader = FrameArrayReader.for_array(
                    occ.array(array), path, None if split.is_local else split.fs
                )
            self._fast[array] = reader
        return self._fast[array]

    # -- history ---------------------------------------------------------------------------------
    def history_rows(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the ``k`` previous key frames of ``row``'s scene (nearest first) and their validity.

        Before the scene start the scene's earliest frame is repeated (valid False).
        """
        scenes = self.column("scene_token")
        rows = row - np.arange(1, k + 1)
        valid = rows >= 0
        clipped = np.maximum(rows, 0)
        scene = scenes[row]
        valid &= np.array([scenes[r] == scene for r in clipped], dtype=bool)
        earliest = row
        out = np.empty(k, dtype=np.int64)
        for j in range(k):  # k is a handful of frames: no hot loop
            if valid[j]:
                earliest = int(clipped[j])
            out[j] = earliest
        return out, valid

    # -- sensors ---------------------------------------------------------------------------------
    def blob_root(self) -> str:
        """Folder (or URL) of the log's sensor files: the stream's ``blob_root``, else the manifest's.

        Raises:
            StreamError: neither says where they are.
        """
        root = self.log.blob_root
        if not root:
            raise StreamError(
                f"log {self.name}: fields 'points'/'images' need the sensor files and the manifest does not "
                "say where they are; pass blob_root= (the folder the frame rows' sensor paths start from)"
            )
        return os.fspath(root)

    def sensor_path(self, relative: str) -> str:
        """Path or URL of a sensor file named relative to the blob root."""
        return join_path(self.blob_root(), relative)

    def read_bytes(self, relative: str, limit: int | None = None) -> bytes:
        """The bytes of a sensor file (``relative`` to the blob root).

        Args:
            relative: the file, relative to the blob root.
            limit: the largest size accepted, bytes (a larger file is refused, not read whole).

        Raises:
            StreamError: the file is missing or larger than ``limit``.
        """
        path = self.sensor_path(relative)
        try:
            data = self.blobs.read(path, limit)
        except FileNotFoundError:
            raise StreamError(
                f"log {self.name}: sensor file {path} is missing (check blob_root or re-download the blobs)"
            ) from None
        if limit is not None and len(data) > limit:
            raise StreamError(
                f"log {self.name}: sensor file {path} is larger than {limit} bytes: damaged? (collect it again)"
            )
        return data

    # -- errors ----------------------------------------------------------------------------------
    def wrap_error(self, exc: Exception) -> StreamError:
        """``exc`` as a StreamError, its message kept, naming the log."""
        message = str(exc)
        return StreamError(
            message if message.startswith(f"log {self.name}:") else f"log {self.name}: {message}"
        )
