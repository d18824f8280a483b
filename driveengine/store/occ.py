"""Writer and reader of the per-log occupancy labels, ``occ/<log>.zarr`` (Zarr v3, see ``schemas/occ.py``).

Writing::

    with create_occ(tmp_path, num_frames=T, generator=recipe.to_dict(), grid=grid, classes=table) as w:
        for frame in frames:                    # one frame at a time, in order
            w.append(semantics=..., flow=..., mask_lidar=...)   # every array of the group, by name
        w.set_stats({...})                      # optional, JSON

The writer buffers one shard (``shard_frames`` frames) and writes it whole, so memory stays bounded
for logs of any length; every chunk is written, fill values included, so every shard file exists. ``close()`` (or leaving the ``with``) writes the last, partial shard, checks
that exactly ``num_frames`` frames were appended and then consolidates the group's metadata (xarray
reads it in one go); on an exception inside the ``with`` nothing more is written (the caller discards
the temporary path). The coordinate arrays (``x``/``y``/``z`` voxel centres in metres, ``frame`` with
``token`` and ``timestamp_us`` along it, ``component``; see ``schemas/occ.py``) are written when the
group is created, so ``xr.open_zarr(path)`` gives labelled axes::

    ds = xr.open_zarr(path)                       # Dataset: semantics, flow, mask_lidar (+ optional)
    ds.semantics.sel(x=12.25, y=-3.75, method="nearest")
    ds.set_xindex("token").sel(token="8a2b...")   # a frame by its token

Reading::

    occ = open_occ(path)                        # validates format, version, arrays
    frame = occ.frame(i)                        # OccFrame(semantics, flow, mask_lidar) numpy arrays
    block = occ.read(0, 16)                     # dict name -> (n, ...) numpy arrays

``path`` may be a local path or an fsspec URL (``s3://...``; pass ``storage_options``).

Damage is an error, never fill values: zarr reads a missing shard file as the fill value (FREE,
zero flow, unobserved), which for a deleted file would be silently wrong labels. The writer leaves no
shard out (every frame is appended, and empty chunks are written), so :meth:`OccLog.frame` and
:meth:`OccLog.read` first check that the shard files of the frames they read exist, and report a
missing shard or one that does not decode as :class:`OccDataError` naming the log and the file.
Malformed metadata (a ``zarr.json`` that is not JSON or holds wrong types) is an
:class:`OccFormatError` naming that ``zarr.json``.
"""

from __future__ import annotations

import os
import posixpath
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
import zarr.codecs

from driveengine.errors import DriveEngineError
from driveengine.schemas import FORMAT_VERSION, GRID, OLDEST_FORMAT_VERSION, OPENSCENE_CLASSES, VoxelGrid
from driveengine.schemas.classes import ClassTable, class_table_from_record
from driveengine.schemas.occ import (
    COMPRESSION_LEVEL,
    COMPRESSOR,
    COORDINATE_ARRAYS,
    FLOW_COMPONENTS,
    LABEL_ARRAYS,
    OCC_FORMAT,
    REQUIRED_ARRAYS,
    SHARD_FRAMES,
    OccArraySpec,
    grid_axes_m,
    occ_array_specs,
    occ_group_attributes,
)
from driveengine.store.shards import FrameArrayWriter

PathLike = str | os.PathLike[str]


class OccFormatError(DriveEngineError):
    """An ``occ/<log>.zarr`` group is missing, of another format or version, or malformed."""

    def __init__(self, path: PathLike, reason: str, hint: str | None = None) -> None:
        self.path = str(path)
        message = f"{self.path}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class OccDataError(OccFormatError):
    """A shard of an ``occ/<log>.zarr`` array is missing or does not decode: ``log <log>: <file>: <reason> (<hint>)``."""

    def __init__(self, log: str, path: PathLike, reason: str, hint: str | None = None) -> None:
        super().__init__(path, reason, hint)
        self.log = log
        self.args = (f"log {log}: {self.args[0]}",)


#: What zarr raises while parsing malformed metadata or decoding damaged bytes (no common base class).
ZARR_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, KeyError, AttributeError, IndexError)

#: Advice printed with damaged labels.
DAMAGED_HINT = (
    "re-collect the log with `driveengine collect ... --overwrite`; `driveengine verify` lists damaged files"
)


def _child(path: PathLike, *parts: str) -> str:
    """``path/part/...`` for local paths and URLs alike."""
    text = os.fspath(path)
    return posixpath.join(text.rstrip("/"), *parts) if "://" in text else os.path.join(text, *parts)


#: The per-attempt id an object-store collect puts in a group's name (``occ/<log>.<attempt>.zarr``, see
#: :mod:`driveengine.store.commit`): UTC time and 8 hex digits.
ATTEMPT_SUFFIX_RE = re.compile(r"\.\d{8}T\d{6}Z-[0-9a-f]{8}$")


def log_name_of(path: PathLike) -> str:
    """The log name of ``.../occ/<log>.zarr`` (or of ``.../occ/<log>.<attempt>.zarr`` on an object store)."""
    stem = posixpath.basename(os.fspath(path).replace("\\", "/").rstrip("/")).removesuffix(".zarr")
    return ATTEMPT_SUFFIX_RE.sub("", stem)


class OccFrame(NamedTuple):
    """The required labels of one frame, dense, indexed ``[x, y, z]`` on the group's grid."""

    semantics: np.ndarray  #: (nx, ny, nz) uint8, the class table's free id where nothing was seen
    flow: np.ndarray  #: (nx, ny, nz, 2) float16, (vx, vy) m/s, ego frame of the frame
    mask_lidar: np.ndarray  #: (nx, ny, nz) bool


@dataclass(frozen=True)
class OccStorage:
    """How label groups are stored (part of the format's bytes, so part of the config hash).

    Attributes:
        shard_frames: frames per shard (the writer holds one shard in memory); chunks are one frame.
        compressor, compression_level: see :func:`make_compressor`.
    """

    shard_frames: int = SHARD_FRAMES
    compressor: str = COMPRESSOR
    compression_level: int = COMPRESSION_LEVEL

    def __post_init__(self) -> None:
        if self.shard_frames < 1:
            raise ValueError(f"OccStorage.shard_frames must be >= 1, got {self.shard_frames}")
        make_compressor(self.compressor, self.compression_level)  # validates the name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (config hash)."""
        return {
            "shard_frames": self.shard_frames,
            "compressor": self.compressor,
            "level": self.compression_level,
        }


def make_compressor(name: str = COMPRESSOR, level: int = COMPRESSION_LEVEL) -> Any:
    """A Zarr v3 bytes-to-bytes codec: ``"zstd"`` (level 1-22), ``"blosc-zstd"``, ``"blosc-lz4"`` or ``"none"``."""
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=level)
    if name in ("blosc-zstd", "blosc-lz4"):
        return zarr.codecs.BloscCodec(cname=name.split("-", 1)[1], clevel=level, shuffle="bitshuffle")
    if name == "none":
        return None
    raise ValueError(f"unknown compressor {name!r}; use 'zstd', 'blosc-zstd', 'blosc-lz4' or 'none'")


def _copy_into(out: np.ndarray, value: np.ndarray) -> None:
    """``out[...] = value`` (cast to ``out``'s dtype), faster for mostly-zero float32 arrays cast to float16.

    numpy's float32 to float16 cast costs ~2.5 ns an element (3 ms for a frame's flow on OpenScene's
    grid), and flow is zero nearly everywhere (only object voxels move). So such an array is copied as
    zeros plus the cast of its other elements, found by their bits (``-0.0`` and NaN included): the same
    bytes as the plain cast, at a third of the time. Arrays with more than 1/8 of their elements set
    take the plain cast.
    """
    if out.dtype == np.float16 and value.dtype == np.float32 and value.flags.c_contiguous and value.size:
        bits = value.reshape(-1).view(np.uint32)
        set_ = np.flatnonzero(bits != 0)  # (a bool mask first: 10x faster than nonzero on the words)
        if set_.size <= bits.size // 8:
            flat = out.reshape(-1)  # out is a C-contiguous row of the shard buffer: a view
            flat.fill(0)
            flat[set_] = value.reshape(-1)[set_]
            return
    out[...] = value


class OccWriter:
    """Appends frames to a new ``occ/<log>.zarr`` group, one shard at a time. Use :func:`create_occ`."""

    def __init__(
        self,
        group: zarr.Group,
        path: PathLike,
        num_frames: int,
        specs: dict[str, OccArraySpec],
        shard_frames: int,
        arrays: dict[str, zarr.Array],
        direct: dict[str, FrameArrayWriter] | None = None,
    ) -> None:
        self._group = group
        self.path = path
        self.num_frames = num_frames
        self.shard_frames = shard_frames
        self._specs = specs
        # the arrays as created: their write_empty_chunks config is not stored, a group lookup drops it
        self._arrays = arrays
        # arrays written without zarr (store/shards.py), each with one frame buffer for the cast
        self._direct = direct or {}
        self._frame_buffers: dict[str, np.ndarray] = {}
        self._buffers: dict[str, np.ndarray] | None = None  # the shard buffers of the other arrays
        self._shard_start = 0  # first frame of the buffered shard
        self._filled = 0  # frames in the buffer
        self._closed = False

    @property
    def frames_written(self) -> int:
        """Frames appended so far (buffered or on disk)."""
        return self._shard_start + self._filled

    def append(self, **frame: np.ndarray) -> None:
        """Append the next frame: one dense array per label array of the group, by name (e.g.
        ``semantics=`` (nx, ny, nz) class ids, ``flow=`` (nx, ny, nz, 2) m/s, ``mask_lidar=`` (nx, ny, nz)
        bool); values are cast to the array's dtype (e.g. float32 flow to float16)."""
        if set(frame) != set(self._specs):
            raise ValueError(
                f"{self.path}: a frame needs exactly the arrays {sorted(self._specs)}, got {sorted(frame)}"
            )
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        if self.frames_written >= self.num_frames:
            raise ValueError(f"{self.path}: more than the {self.num_frames} frames declared")
        if self._buffers is None:
            # every row is overwritten by append() before a flush writes it: no need to fill
            self._buffers = {
                name: np.empty(spec.shards(self.shard_frames), dtype=spec.dtype)
                for name, spec in self._specs.items()
                if name not in self._direct
            }
        for name, spec in self._specs.items():
            value = np.asarray(frame[name])
            if value.shape != spec.frame_shape:
                raise ValueError(
                    f"{self.path}: {name} frame has shape {value.shape}, expected {spec.frame_shape}"
                )
        for name, spec in self._specs.items():
            value = np.asarray(frame[name])
            direct = self._direct.get(name)
            if direct is None:
                _copy_into(self._buffers[name][self._filled], value)  # casts (e.g. float32 flow to float16)
                continue
            if value.dtype != spec.dtype or not value.flags.c_contiguous:
                out = self._frame_buffers.get(name)
                if out is None:
                    out = self._frame_buffers[name] = np.empty(spec.frame_shape, dtype=spec.dtype)
                _copy_into(out, value)
                value = out
            direct.append(value)
        self._filled += 1
        if self._filled == self.shard_frames:
            self._flush()

    def set_stats(self, stats: dict) -> None:
        """Store JSON-ready statistics of the generation in the group attribute ``stats``."""
        self._group.attrs.update({"stats": stats})

    def _flush(self) -> None:
        if not self._filled or self._buffers is None:
            return
        start, stop = self._shard_start, self._shard_start + self._filled
        for name, buffer in self._buffers.items():
            self._arrays[name][start:stop] = buffer[: self._filled]
        for writer in self._direct.values():
            writer.flush()  # the last, partial shard (full ones were written as they filled)
        self._shard_start = stop
        self._filled = 0

    def close(self) -> None:
        """Write the last (partial) shard and check that every declared frame was appended."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._buffers = None
        if self._shard_start != self.num_frames:
            raise ValueError(
                f"{self.path}: {self._shard_start} frames appended, {self.num_frames} declared; "
                "the group is incomplete, discard it"
            )
        consolidate_group(self._group)

    def __enter__(self) -> OccWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            self._buffers = None


def create_occ(
    path: PathLike,
    num_frames: int,
    *,
    generator: dict,
    grid: VoxelGrid = GRID,
    classes: ClassTable = OPENSCENE_CLASSES,
    arrays: tuple[str, ...] = REQUIRED_ARRAYS,
    storage: OccStorage = OccStorage(),
    timestamps_us: np.ndarray | list[int] | None = None,
    storage_options: dict | None = None,
    tokens: Sequence[str] | np.ndarray | None = None,
) -> OccWriter:
    """Create (overwriting) an ``occ/<log>.zarr`` group of ``num_frames`` frames and return its writer.

    Args:
        path: where the group goes (local path or fsspec URL); an existing group there is replaced.
        num_frames: T, the number of frames (rows of ``meta/<log>.parquet``).
        generator: JSON-ready description of how the labels were made (e.g. the label recipe's dict).
        grid: the voxel grid.
        classes: the class table of ``semantics``.
        arrays: the label arrays of the group (the required ones plus optional registered ones, see
            :data:`driveengine.schemas.occ.LABEL_ARRAYS`).
        storage: shard size and compression.
        timestamps_us: optional (T,) frame timestamps, microseconds, stored as an attribute so that
            readers can check the alignment with ``meta/<log>.parquet``, and as the ``timestamp_us``
            coordinate.
        storage_options: fsspec options for URLs.
        tokens: optional (T,) tokens of the frame rows, in row order: the ``token`` coordinate (select a
            frame by token in xarray).

    Raises:
        ValueError: bad counts (timestamps or tokens not one per frame), unknown or missing arrays.
    """
    if num_frames < 0:
        raise ValueError(f"{path}: num_frames must be >= 0")
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    unknown = [name for name in arrays if name not in LABEL_ARRAYS]
    if missing or unknown:
        raise ValueError(f"{path}: label arrays {list(arrays)} lack {missing} or name unknown ones {unknown}")
    shard_frames = storage.shard_frames
    ts = None if timestamps_us is None else [int(t) for t in np.asarray(timestamps_us).ravel()]
    if ts is not None and len(ts) != num_frames:
        raise ValueError(f"{path}: {len(ts)} timestamps for {num_frames} frames")
    tok = None if tokens is None else [str(t) for t in np.asarray(tokens).ravel()]
    if tok is not None and len(tok) != num_frames:
        raise ValueError(f"{path}: {len(tok)} tokens for {num_frames} frames")
    specs = occ_array_specs(grid, classes, tuple(arrays))
    store = str(path) if isinstance(path, os.PathLike) else path
    group = zarr.open_group(store, mode="w", zarr_format=3, storage_options=storage_options)
    coordinates = _write_coordinates(group, grid, num_frames, tok, ts)
    along_frame = " ".join(
        c for c in coordinates if c != "frame" and COORDINATE_ARRAYS[c].dimension == "frame"
    )
    group.attrs.update(
        occ_group_attributes(num_frames, generator, grid, ts, classes, tuple(arrays), coordinates)
    )
    codec = make_compressor(storage.compressor, storage.compression_level)
    shard_frames = max(1, min(shard_frames, num_frames)) if num_frames else shard_frames
    created: dict[str, zarr.Array] = {}
    for name, spec in specs.items():
        created[name] = group.create_array(
            name,
            shape=spec.shape(num_frames),
            dtype=spec.dtype,
            chunks=spec.chunks(),
            shards=spec.shards(shard_frames),
            compressors=() if codec is None else (codec,),
            fill_value=spec.fill_value,
            dimension_names=spec.dimension_names,
            attributes={
                "description": spec.description,
                **({"coordinates": along_frame} if along_frame else {}),
            },
            # Every chunk is written, even one equal to the fill value (all free, zero flow, unobserved):
            # so every shard file exists and a missing one is damage, never "all fill" (readers rely on
            # it), and zarr 3.1 skips its "all fill value" check, which costs several times the
            # compression itself on 640k-voxel frames.
            config={"write_empty_chunks": True},
        )
    direct: dict[str, FrameArrayWriter] = {}
    if "://" not in store and not storage_options:  # local: shards written without zarr's writer
        for name, array in created.items():
            writer = FrameArrayWriter.for_array(array, os.path.join(store, name), num_frames)
            if writer is not None:
                direct[name] = writer
    return OccWriter(group, path, num_frames, specs, shard_frames, created, direct)


def _write_coordinates(
    group: zarr.Group,
    grid: VoxelGrid,
    num_frames: int,
    tokens: list[str] | None,
    timestamps_us: list[int] | None,
) -> tuple[str, ...]:
    """Write the coordinate arrays of a new group (``schemas/occ.py`` COORDINATE_ARRAYS); returns their names.

    Each is one uncompressed chunk (a few kB at most); strings are Zarr v3 variable-length UTF-8.
    """
    x, y, z = grid_axes_m(grid)
    values: dict[str, np.ndarray] = {"frame": np.arange(num_frames, dtype=np.int64)}
    if tokens is not None:
        values["token"] = np.array(tokens, dtype=object)
    if timestamps_us is not None:
        values["timestamp_us"] = np.asarray(timestamps_us, dtype=np.int64)
    values |= {"x": x, "y": y, "z": z, "component": np.array(FLOW_COMPONENTS, dtype=object)}
    for name, value in values.items():
        coord = COORDINATE_ARRAYS[name]
        attributes = {"description": coord.description, **({"units": coord.units} if coord.units else {})}
        array = group.create_array(
            name,
            shape=value.shape,
            dtype=str if value.dtype == object else value.dtype,
            chunks=(max(1, value.shape[0]),),
            compressors=None,
            fill_value="" if value.dtype == object else 0,
            dimension_names=(coord.dimension,),
            attributes=attributes,
        )
        if value.size:
            array[:] = value
    return tuple(values)


#: zarr-python's warning that consolidated metadata is not (yet) part of the Zarr v3 specification: known
#: and accepted (xarray and zarr-python read it; other readers ignore the extra key of ``zarr.json``).
_CONSOLIDATED_WARNING = "Consolidated metadata is currently not part in the Zarr format 3 specification"


def consolidate_group(group: zarr.Group) -> None:
    """Write the consolidated metadata of a label group into its ``zarr.json`` (after the last attribute
    change: a later change of the group's attributes through zarr keeps it, a new array does not)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONSOLIDATED_WARNING)
        zarr.consolidate_metadata(group.store_path.store, path=group.store_path.path or None, zarr_format=3)


@dataclass
class OccLog:
    """An opened ``occ/<log>.zarr`` group. Use :func:`open_occ`.

    Attributes:
        path: the group's location.
        group: the Zarr group (arrays ``semantics``, ``flow``, ``mask_lidar`` and optional ones).
        grid: the voxel grid from the group attributes.
        attrs: all group attributes (a plain dict).
        classes: the class table of ``semantics``.
        arrays: the label arrays the group holds (required first).
        coordinate_arrays: the coordinate arrays the group holds (group attribute ``coordinate_arrays``;
            empty for older groups). No reader needs them: they are for xarray and the verifier.
        name: the log's name when the opener knows it (:attr:`log_name`), else ``""``.
    """

    path: str
    group: zarr.Group
    grid: VoxelGrid
    attrs: dict
    classes: ClassTable = OPENSCENE_CLASSES
    arrays: tuple[str, ...] = REQUIRED_ARRAYS
    coordinate_arrays: tuple[str, ...] = ()
    name: str = ""
    _present: dict[str, set[int]] = field(default_factory=dict, repr=False)  # shards known to exist
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)

    def array(self, name: str) -> zarr.Array:
        """The Zarr array ``name`` (opened once: each group lookup re-reads its metadata)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]  # type: ignore[assignment]
        return self._arrays[name]

    @property
    def log_name(self) -> str:
        """The log's name: the one it was opened under (a committed log's manifest name), else the group's
        file name without ``.zarr`` (and without a per-attempt id, ``<log>.<attempt>.zarr`` on object stores)."""
        return self.name or log_name_of(self.path)

    @property
    def num_frames(self) -> int:
        """T, the number of frames."""
        return int(self.array("semantics").shape[0])

    @property
    def semantics(self) -> zarr.Array:
        """The raw Zarr array (no shard checks: prefer :meth:`frame` / :meth:`read`)."""
        return self.array("semantics")

    @property
    def flow(self) -> zarr.Array:
        """The raw Zarr array (no shard checks: prefer :meth:`frame` / :meth:`read`)."""
        return self.array("flow")

    @property
    def mask_lidar(self) -> zarr.Array:
        """The raw Zarr array (no shard checks: prefer :meth:`frame` / :meth:`read`)."""
        return self.array("mask_lidar")

    def frame(self, i: int) -> OccFrame:
        """Dense labels of frame ``i`` (0 <= i < T).

        Raises:
            OccDataError: a shard file holding the frame is missing or does not decode.
        """
        if not 0 <= i < self.num_frames:
            raise IndexError(f"{self.path}: frame {i} out of range (T = {self.num_frames})")
        return OccFrame(*(self._read(name, i, i + 1)[0] for name in REQUIRED_ARRAYS))

    def read(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Frames ``start:stop`` of every array of the group, ``{name: (n, ...) ndarray}``.

        Raises:
            OccDataError: a shard file holding the frames is missing or does not decode.
        """
        stop = self.num_frames if stop is None else stop
        return {name: self._read(name, start, stop) for name in self.arrays}

    def shard_file(self, name: str, shard: int) -> str:
        """Path (or URL) of shard ``shard`` of array ``name`` (frames ``shard * S`` to ``(shard + 1) * S - 1``)."""
        array = self.array(name)
        key = array.metadata.encode_chunk_key((shard, *([0] * (array.ndim - 1))))
        return _child(self.path, name, *key.split("/"))

    def _frames_per_shard(self, name: str) -> int:
        shards = self.array(name).shards
        return int(shards[0]) if shards else 1

    def _shards(self, name: str, start: int, stop: int) -> range:
        per_shard = self._frames_per_shard(name)
        return range(start // per_shard, (max(stop, start + 1) - 1) // per_shard + 1)

    def check_shards(self, name: str, start: int, stop: int) -> None:
        """Check that the shard files holding frames ``start:stop`` of ``name`` exist and are at least as
        long as their chunk index (each shard checked once).

        Raises:
            OccDataError: a shard file is missing or shorter than its index (zarr would read either as
                fill values).
        """
        if stop <= start:
            return
        present = self._present.setdefault(name, set())
        array = self.array(name)
        per_shard = self._frames_per_shard(name)
        store_path = self.group.store_path
        prefix = f"{store_path.path}/{name}" if store_path.path else name
        for shard in self._shards(name, start, stop):
            if shard in present:
                continue
            key = array.metadata.encode_chunk_key((shard, *([0] * (array.ndim - 1))))
            first, last = shard * per_shard, min((shard + 1) * per_shard, self.num_frames) - 1
            try:
                size = zarr.core.sync.sync(store_path.store.getsize(f"{prefix}/{key}"))
            except FileNotFoundError:
                size = None
            except OSError as exc:
                raise OccDataError(
                    self.log_name,
                    self.shard_file(name, shard),
                    f"cannot read the shard file ({exc})",
                    DAMAGED_HINT,
                ) from None
            if size is None or size < 16 * per_shard:  # (offset, nbytes) uint64 per frame chunk
                what = "is missing" if size is None else f"is truncated ({size} bytes)"
                raise OccDataError(
                    self.log_name,
                    self.shard_file(name, shard),
                    f"the shard file of {name} frames {first}..{last} {what} (zarr would read fill values "
                    "instead of the labels)",
                    DAMAGED_HINT,
                )
            present.add(shard)

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of array ``name``, checked (see :meth:`check_shards`)."""
        self.check_shards(name, start, stop)
        try:
            return self.array(name)[start:stop]  # type: ignore[return-value]
        except ZARR_ERRORS as exc:
            files = ", ".join(self.shard_file(name, s) for s in self._shards(name, start, stop))
            raise OccDataError(
                self.log_name,
                files,
                f"{name} frames {start}..{stop - 1} do not decode ({type(exc).__name__}: {exc}); "
                "the shard is truncated or corrupt",
                DAMAGED_HINT,
            ) from None


def open_occ(path: PathLike, storage_options: dict | None = None, log_name: str = "") -> OccLog:
    """Open and validate an ``occ/<log>.zarr`` group written by :func:`create_occ`; ``log_name`` names the
    log when the group's file name is not its name (see :attr:`OccLog.log_name`).

    Raises:
        OccFormatError: missing group, another format, a newer format version, malformed metadata (a
            ``zarr.json`` that is not JSON or holds wrong types: the file is named), or arrays whose
            dtype / frame shape disagree with ``schemas/occ.py``.
    """
    store = str(path) if isinstance(path, os.PathLike) else path
    if isinstance(path, os.PathLike) and not Path(path).exists():
        raise OccFormatError(path, "no such Zarr group", "run `driveengine collect` to write the labels")
    meta = _child(path, "zarr.json")
    try:
        # each array's own zarr.json, not the consolidated copy: damage to one is then seen (and named)
        group = zarr.open_group(
            store, mode="r", zarr_format=3, storage_options=storage_options, use_consolidated=False
        )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise OccFormatError(path, f"not a Zarr v3 group ({exc})", "re-run `driveengine collect`") from None
    except ZARR_ERRORS as exc:
        raise OccFormatError(
            meta, f"malformed group metadata ({type(exc).__name__}: {exc})", DAMAGED_HINT
        ) from None
    attrs = dict(group.attrs)
    if attrs.get("format") != OCC_FORMAT:
        raise OccFormatError(
            path, f"group attribute format is {attrs.get('format')!r}, expected {OCC_FORMAT!r}"
        )
    version = attrs.get("format_version")
    if not isinstance(version, int) or not OLDEST_FORMAT_VERSION <= version <= FORMAT_VERSION:
        raise OccFormatError(
            path,
            f"format version {version!r}, this DriveEngine reads {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}",
            "upgrade driveengine",
        )
    grid_record = attrs.get("grid")
    try:
        if not isinstance(grid_record, dict):
            raise ValueError(f"expected an object, got {type(grid_record).__name__}")
        grid = VoxelGrid.from_dict(grid_record)
    except (KeyError, TypeError, ValueError) as exc:
        raise OccFormatError(
            meta, f"malformed group attribute grid ({type(exc).__name__}: {exc})", DAMAGED_HINT
        ) from None
    try:  # format 1: OpenScene's table as an id map
        classes = class_table_from_record(attrs.get("class_table", attrs.get("classes")))
    except ValueError as exc:
        raise OccFormatError(meta, f"malformed group attribute class_table ({exc})", DAMAGED_HINT) from None
    names = attrs.get("arrays", list(REQUIRED_ARRAYS))
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) and n in LABEL_ARRAYS for n in names)
        or any(n not in names for n in REQUIRED_ARRAYS)
    ):
        raise OccFormatError(
            meta,
            f"malformed group attribute arrays {names!r} (known arrays: {sorted(LABEL_ARRAYS)})",
            DAMAGED_HINT,
        )
    specs = occ_array_specs(grid, classes, tuple(names))
    frames = None
    for name in names:
        try:
            arr = group.get(name)
        except ZARR_ERRORS as exc:
            raise OccFormatError(
                _child(path, name, "zarr.json"),
                f"malformed metadata of array {name!r} ({type(exc).__name__}: {exc})",
                DAMAGED_HINT,
            ) from None
        if arr is None:
            raise OccFormatError(path, f"array {name!r} is missing", "re-run `driveengine collect`")
        if not isinstance(arr, zarr.Array):
            raise OccFormatError(_child(path, name, "zarr.json"), f"{name!r} is a group, expected an array")
        spec = specs[name]
        if arr.dtype != spec.dtype or tuple(arr.shape[1:]) != spec.frame_shape:
            raise OccFormatError(
                path,
                f"array {name!r} is {arr.dtype} {arr.shape}, expected {spec.dtype} (T, {spec.frame_shape})",
            )
        if frames is not None and arr.shape[0] != frames:
            raise OccFormatError(path, f"array {name!r} has {arr.shape[0]} frames, others {frames}")
        frames = arr.shape[0]
    coordinates = attrs.get("coordinate_arrays")
    known = (
        [c for c in coordinates if isinstance(c, str) and c in COORDINATE_ARRAYS]
        if isinstance(coordinates, list)
        else []
    )
    return OccLog(str(path), group, grid, attrs, classes, tuple(names), tuple(known), log_name)
