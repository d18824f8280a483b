"""The loader's fields: what a :class:`~driveengine.data.FrameStream` sample can hold and how each is read.

A registry, name -> :class:`Field`, in the spirit of MosaicML Streaming's encodings: a field says which
metadata columns of ``meta/<log>.parquet`` it needs (the stream reads them with the log's other columns
in one Parquet read) and how it reads a *block* of frames (rows of one log, in sample order) and, when
``history=k`` is asked for, their history (``history_<key>``). The stream knows no field by name.

Fields that exist without registration:

* **label arrays** (:class:`LabelArrayField`): every array of ``driveengine.schemas.occ.LABEL_ARRAYS``
  that the split's label groups hold (``semantics``, ``flow``, ``mask_lidar`` and any registered later,
  e.g. a ``mask_camera``); whole frames are decoded into one preallocated block per batch window, and
  with ``history`` they add ``history_<name>`` (k, ...);
* **metadata columns** (:class:`MetadataField`): any column of the frame rows, as a fallback (numpy for
  numbers and fixed-size lists, Python objects otherwise).

Registered here: ``points`` (:class:`PointsField`, read through the log's source's ``points_ego``) and
``images`` (:class:`ImagesField`: the dataset's cameras, any count, with ``intrinsics`` and
``ego_from_camera``).

**Adding a field** is one :func:`register_field` call, e.g.::

    class EgoSpeed(SampleField):
        name = "ego_speed"

        def columns(self, options):
            return ("ego_dynamic_state",)

        def read_frame(self, log, row):
            vx, vy = log.column("ego_dynamic_state")[row][:2]
            return {"ego_speed": float(np.hypot(vx, vy))}

    register_field(EgoSpeed())

Field names are checked when a stream is built (:func:`resolve_fields`): an unknown name is a
:class:`~driveengine.data.reader.StreamError` that lists the valid names and suggests the closest ones.
"""

from __future__ import annotations

import difflib
import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from driveengine.data.reader import LogReader, ReadOptions, StreamError
from driveengine.errors import DriveEngineError
from driveengine.geometry import relative_transform
from driveengine.schemas.frame import frame_schema
from driveengine.schemas.occ import LABEL_ARRAYS, REQUIRED_ARRAYS
from driveengine.store.dataset import CommittedLog, SplitDataset

IntArray = NDArray[np.int64]
#: What a field puts under one key of a sample: an array, a number, a string, a Python object.
Value = Any
#: A field's values for a block of rows: sample key -> one value per row (a list, or an array whose
#: first axis is the rows).
BlockValues = dict[str, Sequence[Value] | np.ndarray]


class Field(ABC):
    """How one loader field is read (see the module doc). Subclass :class:`ArrayField` or
    :class:`SampleField` rather than this.

    Attributes:
        name: the field's name in ``FrameStream(fields=...)``.
        history: ``history=k`` adds ``history_<key>`` (k, ...) for each key the field sets.
        label_array: the label array the field reads (the split's groups must hold it), or None.
    """

    name: str = ""
    history: bool = False
    label_array: str | None = None

    def columns(self, options: ReadOptions) -> tuple[str, ...]:
        """The metadata columns the field reads (with ``options``, e.g. ``point_sweeps``)."""
        return ()

    def frame_layout(self, log: LogReader) -> tuple[tuple[int, ...], np.dtype] | None:
        """Shape and dtype of one frame's value when it is a fixed-size array that the stream decodes
        into one block per batch window (collate then stacks without a copy); None otherwise."""
        return None

    @abstractmethod
    def read(self, log: LogReader, rows: IntArray, out: np.ndarray | None) -> BlockValues:
        """Values of frames ``rows`` (a block of one log, in sample order).

        Args:
            log: the log's reader.
            rows: (n,) rows of the log's frame rows.
            out: with :meth:`frame_layout`, the preallocated (n, ...) block to decode into (the returned
                values are then ignored for the field's own name); else None.
        """

    def read_history(self, log: LogReader, rows: IntArray) -> BlockValues:
        """The ``history_<key>`` values of one sample: ``rows`` are its (k,) history rows, nearest first;
        each returned value is stacked over them ((k, ...) arrays)."""
        raise NotImplementedError(f"field {self.name!r} has no history")


class ArrayField(Field):
    """A field whose value is a fixed-size array per frame, read a run of consecutive rows at a time."""

    history = True

    @abstractmethod
    def frame_layout(self, log: LogReader) -> tuple[tuple[int, ...], np.dtype]: ...

    @abstractmethod
    def read_run(self, log: LogReader, start: int, stop: int, out: np.ndarray) -> None:
        """Decode rows ``start:stop`` into ``out`` ((stop - start, ...), preallocated)."""

    def read(self, log: LogReader, rows: IntArray, out: np.ndarray | None) -> BlockValues:
        if out is None:
            shape, dtype = self.frame_layout(log)
            out = np.empty((len(rows), *shape), dtype=dtype)
        # Runs of consecutive rows are decoded with one read each (a handful of rows: Python ints).
        values = rows.tolist()
        a = 0
        for b in range(1, len(values) + 1):
            if b == len(values) or values[b] != values[b - 1] + 1:
                self.read_run(log, values[a], values[a] + (b - a), out[a:b])
                a = b
        return {self.name: out}

    def read_history(self, log: LogReader, rows: IntArray) -> BlockValues:
        lo, hi = int(rows.min()), int(rows.max()) + 1
        shape, dtype = self.frame_layout(log)
        block = np.empty((hi - lo, *shape), dtype=dtype)
        self.read_run(log, lo, hi, block)
        return {self.name: block[rows - lo]}


class SampleField(Field):
    """A field read one frame at a time (variable-size values, sensor files, Python objects)."""

    @abstractmethod
    def read_frame(self, log: LogReader, row: int) -> dict[str, Value]:
        """The field's values of frame ``row``: sample key -> value."""

    def read(self, log: LogReader, rows: IntArray, out: np.ndarray | None) -> BlockValues:
        values: dict[str, list[Value]] = {}
        for row in rows:
            for key, value in self.read_frame(log, int(row)).items():
                values.setdefault(key, []).append(value)
        return values

    def read_history(self, log: LogReader, rows: IntArray) -> BlockValues:
        decoded = {int(r): self.read_frame(log, int(r)) for r in np.unique(rows)}  # each frame once
        keys = decoded[int(rows[0])]
        return {key: np.stack([decoded[int(r)][key] for r in rows]) for key in keys}


@dataclass
class LabelArrayField(ArrayField):
    """A label array of ``occ/<log>.zarr`` (``semantics``, ``flow``, ``mask_lidar``, ...): (nx, ny, nz, ...)
    in the array's dtype, whole frames decoded straight into the window's block."""

    name: str = ""

    def __post_init__(self) -> None:
        if self.name not in LABEL_ARRAYS:
            raise ValueError(f"{self.name!r} is not a registered label array ({', '.join(LABEL_ARRAYS)})")
        self.label_array = self.name

    def frame_layout(self, log: LogReader) -> tuple[tuple[int, ...], np.dtype]:
        return log.frame_shape(self.name)

    def read_run(self, log: LogReader, start: int, stop: int, out: np.ndarray) -> None:
        log.read_labels(self.name, start, stop, out)


@dataclass
class MetadataField(SampleField):
    """A column of the frame rows: numpy for numbers and fixed-size lists (``ego2global`` (4, 4)),
    Python objects for strings, lists and structs."""

    name: str = ""

    def columns(self, options: ReadOptions) -> tuple[str, ...]:
        return (self.name,)

    def read(self, log: LogReader, rows: IntArray, out: np.ndarray | None) -> BlockValues:
        column = log.column(self.name)
        return {self.name: [column[int(r)] for r in rows]}

    def read_frame(self, log: LogReader, row: int) -> dict[str, Value]:
        return {self.name: log.column(self.name)[row]}


class PointsField(SampleField):
    """``points``: (N, 4) float32 x, y, z (m, ego frame of the key frame), intensity, read through the
    log's source (``Source.points_ego``). With ``point_sweeps=s`` (N, 5): the previous ``s`` key frames of
    the scene are added, moved into the key frame's ego frame (:func:`~driveengine.geometry.relative_transform`),
    and the fifth column is the time lag in seconds (0 for the key frame)."""

    name = "points"

    def columns(self, options: ReadOptions) -> tuple[str, ...]:
        sweeps = ("scene_token", "ego2global", "timestamp") if options.point_sweeps else ()
        return ("lidar_path", "lidar2ego", *sweeps)

    def sweep(self, log: LogReader, row: int) -> np.ndarray:
        """(N, 4) float32 points of the key frame at ``row`` in its own ego frame."""
        from driveengine.errors import SourceError
        from driveengine.sources import get_source
        from driveengine.sources.base import MAX_SWEEP_BYTES

        relative = log.column("lidar_path")[row]
        try:
            return get_source(log.source).points_ego(
                log.read_bytes(relative, MAX_SWEEP_BYTES),
                log.sensor_path(relative),
                log.column("lidar2ego")[row],
            )
        except SourceError as exc:
            raise StreamError(f"log {log.name}: {exc}") from None

    def read_frame(self, log: LogReader, row: int) -> dict[str, Value]:
        points = self.sweep(log, row)
        sweeps = log.options.point_sweeps
        if not sweeps:
            return {"points": points}
        hist_rows, valid = log.history_rows(row, sweeps)
        poses = log.column("ego2global")
        times = log.column("timestamp")
        parts = [np.concatenate([points, np.zeros((len(points), 1), np.float32)], axis=1)]
        for j in np.flatnonzero(valid):  # a few sweeps, each moved as a whole (vectorised per sweep)
            r = int(hist_rows[j])
            p = self.sweep(log, r)
            ego_t_from_ego_r = relative_transform(poses[row], poses[r])
            part = np.empty((len(p), 5), np.float32)
            part[:, :3] = p[:, :3].astype(np.float64) @ ego_t_from_ego_r[:3, :3].T + ego_t_from_ego_r[:3, 3]
            part[:, 3] = p[:, 3]
            part[:, 4] = (times[row] - times[r]) * 1e-6
            parts.append(part)
        return {"points": np.concatenate(parts, axis=0)}


class ImagesField(Field):
    """``images`` (C, 3, H, W): the dataset's C cameras in its order (any count), resized to ``image_size``,
    float32 RGB in [0, 1] or, with ``image_dtype="uint8"``, uint8 RGB 0..255 (a quarter of the bytes across
    process boundaries; :func:`driveengine.data.collate.images_to_float` makes the same floats on the
    device); with ``intrinsics`` (C, 3, 3) float64 scaled to the resize and ``ego_from_camera`` (C, 4, 4)
    float64. The images of a batch window are decoded straight into the window's block (a shared-memory
    batch slot in a DataLoader worker), like the label arrays."""

    name = "images"
    history = True

    def columns(self, options: ReadOptions) -> tuple[str, ...]:
        return ("cams",)

    @staticmethod
    def _channels(log: LogReader, row: int) -> tuple[str, ...]:
        return log.options.cameras or tuple(log.column("cams")[row])  # format 1: the shard's own order

    def frame_layout(self, log: LogReader) -> tuple[tuple[int, ...], np.dtype]:
        width, height = log.options.image_size
        count = len(self._channels(log, 0)) if log.frames else len(log.options.cameras or ())
        return (count, 3, height, width), np.dtype(log.options.image_dtype)

    def decode(self, log: LogReader, row: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode frame ``row``'s images into ``out`` ((C, 3, H, W) of the layout's dtype); returns its
        ``intrinsics`` and ``ego_from_camera``.

        Raises:
            StreamError: an image is missing or cannot be decoded, or the frame has another camera count.
        """
        from PIL import Image

        cams = log.column("cams")[row]
        channels = self._channels(log, row)
        if len(channels) != len(out):
            raise StreamError(
                f"log {log.name}: frame row {row} has {len(channels)} cameras, the stream's images {len(out)}"
            )
        width, height = log.options.image_size
        intrinsics = np.empty((len(channels), 3, 3))
        ego_from_camera = np.tile(np.eye(4), (len(channels), 1, 1))
        as_float = out.dtype == np.float32
        for c, channel in enumerate(channels):  # every camera of the frame, each a whole image
            cam = cams[channel]
            data = log.read_bytes(cam["data_path"])
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w0, h0 = im.size
                    im.draft("RGB", (width, height))  # JPEG: decode at a reduced scale when possible
                    rgb = im.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            except OSError as exc:
                raise StreamError(
                    f"log {log.name}: image {cam['data_path']} cannot be decoded ({exc})"
                ) from None
            pixels = np.asarray(rgb).transpose(2, 0, 1)  # (3, H, W) uint8
            if as_float:
                out[c] = pixels.astype(np.float32) / 255.0
            else:
                out[c] = pixels
            scale = np.diag([width / w0, height / h0, 1.0])
            intrinsics[c] = scale @ np.asarray(cam["cam_intrinsic"], dtype=np.float64)
            ego_from_camera[c, :3, :3] = np.asarray(cam["sensor2lidar_rotation"], dtype=np.float64)
            ego_from_camera[c, :3, 3] = np.asarray(cam["sensor2lidar_translation"], dtype=np.float64)
        return intrinsics, ego_from_camera

    def read(self, log: LogReader, rows: IntArray, out: np.ndarray | None) -> BlockValues:
        if out is None:
            shape, dtype = self.frame_layout(log)
            out = np.empty((len(rows), *shape), dtype=dtype)
        intrinsics, ego_from_camera = [], []
        for i, row in enumerate(rows.tolist()):
            k, e = self.decode(log, row, out[i])
            intrinsics.append(k)
            ego_from_camera.append(e)
        return {"images": out, "intrinsics": intrinsics, "ego_from_camera": ego_from_camera}

    def read_history(self, log: LogReader, rows: IntArray) -> BlockValues:
        unique = np.unique(rows)  # each frame once
        decoded = self.read(log, unique, None)
        at = np.searchsorted(unique, rows)
        return {key: np.stack([decoded[key][j] for j in at]) for key in decoded}


# -- the registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, Field] = {}


def register_field(field: Field, *, replace: bool = False) -> Field:
    """Make ``field`` available as ``FrameStream(fields=(..., field.name))``; returns it.

    Raises:
        ValueError: the name is empty, a label array's (those are fields already), or registered
            already (pass ``replace=True`` to replace it).
    """
    if not field.name:
        raise ValueError(f"{type(field).__name__}: a field needs a name")
    if field.name in LABEL_ARRAYS:
        raise ValueError(f"{field.name!r} is a label array, a loader field already (LabelArrayField)")
    if field.name in _REGISTRY and not replace:
        raise ValueError(f"a loader field {field.name!r} is registered already (replace=True replaces it)")
    _REGISTRY[field.name] = field
    return field


def unregister_field(name: str) -> None:
    """Remove a registered field (tests; the built-in ones can be registered again)."""
    _REGISTRY.pop(name, None)


def registered_fields() -> tuple[str, ...]:
    """Names of the registered fields (label arrays and metadata columns are fields without registration)."""
    return tuple(_REGISTRY)


register_field(PointsField())
register_field(ImagesField())


# -- resolving names against a split -------------------------------------------------------------------


@dataclass
class SplitFields:
    """What a split can serve, found out only as far as a request needs (most requests need no I/O).

    Attributes:
        split: the split.
        logs: its logs that a stream reads (non-empty ones).
    """

    split: SplitDataset
    logs: list[CommittedLog] = field(default_factory=list)

    @cached_property
    def shard_schema(self) -> pa.Schema | None:
        """The schema of the first log's frame shard (one Parquet footer read); None if it cannot be read
        (the read of the rows will report that, naming the file)."""
        if not self.logs:
            return None
        log = self.logs[0]
        try:
            if self.split.is_local:
                return pq.read_schema(log.meta_path)
            with self.split.fs.open(log.meta_path, "rb") as f:
                return pq.read_schema(f)
        except (OSError, ValueError):  # ArrowInvalid is a ValueError
            return None

    @property
    def schema(self) -> pa.Schema:
        """The frame rows' schema: the first shard's, else the format's."""
        cameras = self.split.manifest.dataset.cameras or ("CAM",)
        return self.shard_schema if self.shard_schema is not None else frame_schema(cameras)

    def has_column(self, name: str) -> bool:
        """Whether ``name`` is a column of the frame rows (the first shard's; the format's if that one
        cannot be read)."""
        return name in self.schema.names

    @property
    def has_labels(self) -> bool:
        """Whether any log has labels."""
        return any(log.has_labels for log in self.logs)

    @cached_property
    def label_arrays(self) -> tuple[str, ...]:
        """The label arrays of the first labelled log's group (opened once); () without labels."""
        for log in self.logs:
            if log.has_labels:
                fresh = CommittedLog(log.name, log.entry, self.split)  # not the split's cached one
                try:
                    return fresh.labels().arrays
                except DriveEngineError:  # the read of the labels reports it, naming the file
                    return REQUIRED_ARRAYS
        return ()

    def holds_array(self, name: str) -> bool:
        """Whether the split's label groups hold label array ``name`` (optional arrays: one group opened)."""
        if not self.has_labels:
            return False
        return name in REQUIRED_ARRAYS or name in self.label_arrays

    def valid_names(self) -> list[str]:
        """Every field name the split can serve: registered fields, its label arrays, its columns."""
        arrays = [a for a in LABEL_ARRAYS if self.holds_array(a)]
        return list(dict.fromkeys([*registered_fields(), *arrays, *self.schema.names]))


def resolve_fields(names: Sequence[str], catalog: SplitFields, options: ReadOptions) -> tuple[Field, ...]:
    """The fields ``names`` of a split, checked.

    Raises:
        StreamError: a name is no field of this split (unknown, a label array its groups lack, labels
            asked of a split without any); the message lists the valid names and the closest ones.
    """
    out: list[Field] = []
    problems: list[str] = []
    for name in names:
        found, problem = _lookup(name, catalog, options)
        if found is not None:
            out.append(found)
            continue
        valid = catalog.valid_names()
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        problems.append(problem + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""))
    if problems:
        raise StreamError(
            f"{catalog.split.url}: {'; '.join(problems)} (valid fields: {', '.join(catalog.valid_names())})"
        )
    return tuple(out)


def _lookup(name: str, catalog: SplitFields, options: ReadOptions) -> tuple[Field | None, str]:
    """The field ``name`` (registered, a label array, a column), or None and why not."""
    registered = _REGISTRY.get(name)
    if registered is not None:
        missing = [c for c in registered.columns(options) if not catalog.has_column(c)]
        if missing:
            return None, f"field {name!r} needs the columns {missing}, which the frame rows lack"
        if registered.label_array is not None and not catalog.holds_array(registered.label_array):
            return (
                None,
                f"field {name!r} needs the label array {registered.label_array!r}, which the split lacks",
            )
        return registered, ""
    if name in LABEL_ARRAYS:
        if not catalog.has_labels:
            return None, (
                f"field {name!r} is a label array and no log of the split has labels (collected without "
                "them); drop it or re-collect with labels"
            )
        if not catalog.holds_array(name):
            held = ", ".join(catalog.label_arrays)
            return None, f"the split's label groups hold no array {name!r} (they hold {held})"
        return LabelArrayField(name), ""
    if catalog.has_column(name):
        return MetadataField(name), ""
    where = f" (e.g. {catalog.logs[0].meta_path})" if catalog.logs else ""
    return None, (
        f"unknown field {name!r}: not a loader field, a label array of the split, nor a column of its frame "
        f"rows{where}"
    )


def field_columns(fields: Sequence[Field], options: ReadOptions) -> tuple[str, ...]:
    """The metadata columns ``fields`` read, without duplicates, in order."""
    return tuple(dict.fromkeys(c for f in fields for c in f.columns(options)))
