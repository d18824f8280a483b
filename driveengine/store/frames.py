"""Reading frame rows back: ``<out>/<split>/meta/<log>.parquet`` of the logs the manifest lists.

Only committed logs (manifest entries) are visible; temporaries and uncommitted files are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from driveengine.errors import DriveEngineError
from driveengine.schemas.frame import FRAME_SCHEMA, FRAME_SCHEMA_VERSION
from driveengine.store.manifest import load_manifest


class FramesError(DriveEngineError):
    """A frame shard is missing, unreadable or of an unexpected schema."""


def committed_logs(split_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the logs committed in ``split_dir`` (sorted)."""
    return sorted(load_manifest(split_dir).logs)


def read_log_frames(
    split_dir: str | os.PathLike[str], log_name: str, columns: list[str] | None = None
) -> pa.Table:
    """The frame rows of one committed log (row ``i`` = index ``i`` of its occupancy arrays).

    Args:
        split_dir: ``<out>/<split>``.
        log_name: a log of the manifest.
        columns: subset of columns (default: all).

    Raises:
        FramesError: the log is not committed, its shard is missing or its format version is newer.
    """
    split_dir = Path(split_dir)
    entry = load_manifest(split_dir).logs.get(log_name)
    if entry is None:
        raise FramesError(
            f"{split_dir}: log {log_name!r} is not committed here (see `driveengine stats {split_dir}`)"
        )
    return read_shard(split_dir / entry["meta"], columns)


def read_shard(path: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """Read one ``meta/<log>.parquet`` and check its format version.

    Raises:
        FramesError: missing or unreadable file, or a format version this DriveEngine cannot read.
    """
    try:
        table = pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise FramesError(
            f"{path}: frame shard missing; re-run `driveengine collect` to rebuild it"
        ) from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise FramesError(
            f"{path}: unreadable frame shard ({exc}); re-collect the log with --overwrite"
        ) from None
    version = (table.schema.metadata or {}).get(b"driveengine.format_version")
    if version is None or int(version) > FRAME_SCHEMA_VERSION:
        raise FramesError(
            f"{path}: frame schema version {version!r}, this DriveEngine reads up to {FRAME_SCHEMA_VERSION}"
        )
    return table


def read_split_frames(split_dir: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """All committed frame rows of a split, logs in name order (schema :data:`FRAME_SCHEMA`)."""
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    tables = [read_shard(split_dir / manifest.logs[name]["meta"], columns) for name in sorted(manifest.logs)]
    if not tables:
        schema = FRAME_SCHEMA if columns is None else pa.schema([FRAME_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)
