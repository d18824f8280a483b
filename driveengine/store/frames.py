"""Frame shards, ``<out>/<split>/meta/<log>.parquet``: writing them (with the format's Parquet settings)
and reading them back (checking their format version).

Only committed logs (manifest entries) are visible to readers: open a split with
:func:`driveengine.store.dataset.open_split`, whose logs read their rows through :func:`read_shard`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from driveengine.errors import DriveEngineError
from driveengine.schemas import OLDEST_FORMAT_VERSION
from driveengine.schemas.frame import FRAME_SCHEMA_VERSION

#: Parquet writer settings of frame shards (part of the format: changing them changes the bytes).
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "write_statistics": True}


class FramesError(DriveEngineError):
    """A frame shard is missing, unreadable or of an unexpected schema."""


def write_frames(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write a log's frame rows to ``path`` (usually a temporary name the commit renames)."""
    pq.write_table(table, path, **PARQUET_OPTIONS)


def read_shard(path: str | os.PathLike[str] | Any, columns: list[str] | None = None) -> pa.Table:
    """Read one ``meta/<log>.parquet`` (a path or an open binary file) and check its format version.

    Raises:
        FramesError: missing or unreadable file, a column it lacks, or a format version this
            DriveEngine cannot read.
    """
    name = path if isinstance(path, str | os.PathLike) else getattr(path, "path", getattr(path, "name", path))
    try:
        # ParquetFile.read: ~3x less overhead per file than pq.read_table (datasets machinery), which
        # matters for splits of thousands of small logs; it ignores unknown columns, so check them first.
        shard = pq.ParquetFile(path)
        if columns is not None:
            unknown = sorted(set(columns) - set(shard.schema_arrow.names))
            if unknown:
                raise KeyError(f"no column {', '.join(unknown)}")
        table = shard.read(columns=columns)
    except FileNotFoundError:
        raise FramesError(
            f"{name}: frame shard missing; re-run `driveengine collect` to rebuild it"
        ) from None
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise FramesError(
            f"{name}: unreadable frame shard ({exc}); re-collect the log with --overwrite"
        ) from None
    version = (table.schema.metadata or {}).get(b"driveengine.format_version")
    if version is None or not OLDEST_FORMAT_VERSION <= int(version) <= FRAME_SCHEMA_VERSION:
        raise FramesError(
            f"{name}: frame schema version {version!r}, this DriveEngine reads {OLDEST_FORMAT_VERSION} to "
            f"{FRAME_SCHEMA_VERSION}"
        )
    return table


def read_log_frames(
    split_dir: str | os.PathLike[str], log_name: str, columns: list[str] | None = None
) -> pa.Table:
    """The frame rows of one committed log (row ``i`` = index ``i`` of its label arrays).

    Raises:
        FramesError: the log is not committed, or its shard is missing or unreadable.
    """
    from driveengine.store.dataset import open_split

    return open_split(split_dir).log(log_name).frames(columns)


def read_split_frames(split_dir: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """All committed frame rows of a split, logs in name order."""
    from driveengine.store.dataset import open_split

    return open_split(Path(split_dir)).frames(columns)
