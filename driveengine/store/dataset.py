"""The dataset handle: one collected split, its committed logs, their frames and labels, opened lazily.

Everything that reads a collected split — the loader, ``evaluate``, ``export``, ``show``, ``stats``,
``verify`` — opens it here::

    split = open_split("dataset/mini")                 # or "s3://bucket/dataset/mini" (storage_options=...)
    split.grid, split.classes, split.cameras, split.dataset_name
    for log in split.logs:                             # committed logs, name order
        rows = log.frames(["token", "timestamp"])      # pyarrow Table, row i = label frame i
        labels = log.labels()                          # OccLog (None-free: raises without labels)
        log.blob_root                                  # where its sensor files are

Only logs the manifest lists are visible (the manifest is the commit point). Every count is checked
where it is read: a frame shard whose rows or a label group whose frames disagree with the manifest,
or a label grid that is not the split's, is a :class:`DatasetError` naming the log and the file.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from driveengine.errors import DriveEngineError
from driveengine.schemas.classes import ClassTable
from driveengine.schemas.frame import frame_schema, schema_cameras
from driveengine.schemas.grid import VoxelGrid
from driveengine.store.frames import FramesError, read_shard
from driveengine.store.manifest import MANIFEST_NAME, LogEntry, Manifest, ManifestError, load_manifest
from driveengine.store.occ import OccFormatError, OccLog, open_occ

#: The ``frame_index`` column (its field in the frame schema), given to shards written without it.
FRAME_INDEX_FIELD: pa.Field = frame_schema(("CAM",)).field("frame_index")


class DatasetError(DriveEngineError):
    """A committed log's files disagree with the manifest or with each other (the log and file named)."""


def _join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike (always ``/`` for URLs)."""
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


@dataclass
class CommittedLog:
    """One committed log of a split (made by :class:`SplitDataset`).

    Attributes:
        name: the log's name (its manifest key).
        entry: its manifest entry.
        split: the split it belongs to.
    """

    name: str
    entry: LogEntry
    split: SplitDataset
    _labels: OccLog | None = field(default=None, repr=False)

    @property
    def frames_count(self) -> int:
        """Rows of the frame shard (= frames of the labels)."""
        return self.entry.frames

    @property
    def meta_path(self) -> str:
        """The frame shard's path or URL."""
        return self.split.path(self.entry.meta)

    @property
    def occ_path(self) -> str | None:
        """The label group's path or URL (None without labels)."""
        return None if self.entry.occ is None else self.split.path(self.entry.occ)

    @property
    def has_labels(self) -> bool:
        return self.entry.occ is not None

    @property
    def blob_root(self) -> str | None:
        """Where the log's sensor files are (the split's override, else the manifest's), None if unknown."""
        return self.split.blob_root or self.entry.source.blob_root or None

    def frames(self, columns: list[str] | None = None) -> pa.Table:
        """The log's frame rows (``columns`` only, default all); row ``i`` is label frame ``i``.

        Shards written before the ``frame_index`` column existed (format 1, early format 2) get it here,
        as the row positions it stands for (last column), so the logs of a split always concatenate.

        Raises:
            FramesError: the shard is missing, unreadable or lacks a column.
            DatasetError: it does not hold the manifest's number of rows.
        """
        try:
            table = self._read_shard(columns)
        except FramesError:
            if columns is None or "frame_index" not in columns:
                raise
            table = self._read_shard([c for c in columns if c != "frame_index"])
            table = table.append_column(
                FRAME_INDEX_FIELD, pa.array(np.arange(table.num_rows, dtype=np.int32))
            )
            table = table.select(columns)
        else:
            if columns is None and "frame_index" not in table.schema.names:
                table = table.append_column(
                    FRAME_INDEX_FIELD, pa.array(np.arange(table.num_rows, dtype=np.int32))
                )
        if table.num_rows != self.entry.frames:
            raise DatasetError(
                f"log {self.name}: {self.meta_path} has {table.num_rows} rows, the manifest says "
                f"{self.entry.frames}; the log is damaged, re-collect it with --overwrite"
            )
        return table

    def _read_shard(self, columns: list[str] | None) -> pa.Table:
        if self.split.is_local:
            return read_shard(self.meta_path, columns)
        try:
            with self.split.fs.open(self.meta_path, "rb") as f:
                return read_shard(f, columns)
        except FileNotFoundError:
            raise FramesError(
                f"{self.meta_path}: frame shard missing; re-run `driveengine collect`"
            ) from None

    def labels(self) -> OccLog:
        """The log's label group, opened once and checked against the manifest and the split's grid.

        Raises:
            DatasetError: the log has no labels, its group is missing or malformed (the file named), or
                it disagrees with the manifest or the split.
        """
        if self._labels is None:
            path = self.occ_path
            if path is None:
                raise DatasetError(
                    f"log {self.name}: no labels (collected without them); re-collect with labels"
                )
            try:
                occ = open_occ(
                    Path(path) if self.split.is_local else path,
                    storage_options=None if self.split.is_local else self.split.storage_options,
                    log_name=self.name,
                )
            except OccFormatError as exc:
                raise DatasetError(f"log {self.name}: {exc}") from None
            if occ.num_frames != self.entry.frames:
                raise DatasetError(
                    f"log {self.name}: {path} has {occ.num_frames} frames, the manifest says "
                    f"{self.entry.frames}; the log is damaged, re-collect it with --overwrite"
                )
            if occ.grid != self.split.grid:
                raise DatasetError(
                    f"log {self.name}: {path} is on the grid {occ.grid.describe()}, the split on "
                    f"{self.split.grid.describe()}; re-collect the log with --overwrite"
                )
            self._labels = occ
        return self._labels


@dataclass
class SplitDataset:
    """A collected split (see the module doc). Use :func:`open_split`.

    Attributes:
        url: the split folder (local path or URL).
        manifest: its manifest.
        fs: the fsspec file system of ``url``.
        storage_options: fsspec options of ``url``.
        blob_root: a blob root that overrides every log's recorded one (e.g. ``--blob-root``), or None.
    """

    url: str
    manifest: Manifest
    fs: Any
    storage_options: dict[str, Any]
    blob_root: str | None = None

    @property
    def is_local(self) -> bool:
        """Whether the split is on the local file system."""
        return "://" not in self.url

    @property
    def name(self) -> str:
        """The split's name."""
        return self.manifest.split or posixpath.basename(self.url.rstrip("/"))

    @property
    def grid(self) -> VoxelGrid:
        """The voxel grid of the split's labels."""
        return self.manifest.grid

    @property
    def classes(self) -> ClassTable:
        """The class table of the split's labels."""
        return self.manifest.classes

    @property
    def dataset_name(self) -> str:
        """The dataset the split holds (``nuplan``, ``nuscenes``, ...)."""
        return self.manifest.dataset.name

    @cached_property
    def cameras(self) -> tuple[str, ...]:
        """The camera channels of the frame rows, in order (format 1: read from the first shard)."""
        if self.manifest.dataset.cameras is not None:
            return self.manifest.dataset.cameras
        for log in self.logs:
            return schema_cameras(log.frames(["cams"]).schema)
        return ()

    @cached_property
    def logs(self) -> list[CommittedLog]:
        """The committed logs, in name order."""
        return [CommittedLog(name, self.manifest.logs[name], self) for name in sorted(self.manifest.logs)]

    def log(self, name: str) -> CommittedLog:
        """The committed log ``name``.

        Raises:
            DatasetError: no such committed log (the message says how to list them).
        """
        for log in self.logs:
            if log.name == name:
                return log
        raise DatasetError(
            f"{self.url}: log {name!r} is not committed here (see `driveengine stats {self.url}`)"
        )

    def path(self, relative: str) -> str:
        """Path or URL of a file of the split (``relative`` to the split folder)."""
        return _join(self.url, relative)

    def frames(self, columns: list[str] | None = None) -> pa.Table:
        """All committed frame rows, logs in name order (empty table with the schema when none)."""
        tables = [log.frames(columns) for log in self.logs]
        if tables:
            return pa.concat_tables(tables)
        from driveengine.schemas.frame import frame_schema

        schema = frame_schema(self.manifest.dataset.cameras or ("CAM",))
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()


def open_split(
    path_or_url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    blob_root: str | os.PathLike[str] | None = None,
) -> SplitDataset:
    """Open a collected split folder ``<out>/<split>`` (local path or fsspec URL such as ``s3://...``).

    Args:
        path_or_url: the split folder.
        storage_options: fsspec options for URLs (e.g. ``{"endpoint_url": ...}``).
        blob_root: overrides where every log's sensor files are (default: as the manifest records).

    Raises:
        ManifestError: no manifest there, or an unreadable, malformed or newer one.
    """
    url = os.fspath(path_or_url)
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    options = dict(storage_options or {})
    if "://" in url:
        fs, _ = fsspec.core.url_to_fs(url, **options)
        path = _join(url, MANIFEST_NAME)
        try:
            with fs.open(path, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            raise ManifestError(
                f"{path}: no manifest; this location holds no collected split (run `driveengine collect` first)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
        manifest = Manifest.from_json(data, path)
    else:
        fs = fsspec.filesystem("file")
        manifest = load_manifest(url)
    return SplitDataset(url, manifest, fs, options, None if blob_root is None else os.fspath(blob_root))
