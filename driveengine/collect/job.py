"""The per-log job of ``collect``: read one log, write its frame rows (and labels), commit its files.

:func:`run_log` is what a process-pool worker or a Dask worker runs. It never raises: any failure
comes back as a :class:`LogResult` with ``status="failed"`` and a reason that names the file, and its
temporaries are removed. It commits the log's files itself (rename into place); the manifest is
updated by the client alone, from the returned entry.

Before anything is written the rows are checked for NaN/inf in the schema's finite columns
(:func:`~driveengine.collect.frames.check_finite`: the log fails, naming column, row and token). In a
pool worker, ``may_commit`` is asked right before the rename: a worker whose client is gone (killed)
commits nothing.
"""

from __future__ import annotations

import resource
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from driveengine.collect.frames import FrameOptions, build_frame_table, check_finite, select_frames
from driveengine.errors import DriveEngineError
from driveengine.sources.logdata import LogData
from driveengine.store.commit import commit_log_files, meta_relpath, occ_relpath, temporary_path

#: Parquet writer settings of frame shards (part of the format: changing them changes the bytes).
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "write_statistics": True}


@dataclass(frozen=True)
class LogTask:
    """Everything a worker needs to collect one log (picklable; paths must be visible to the worker).

    Attributes:
        log_name: output name (``meta/<log_name>.parquet``), the input file's stem.
        source: ``"nuplan"`` or ``"openscene"``.
        input_path: the ``.db`` or ``.pkl`` file.
        blob_root: folder the log's relative sensor paths are relative to (recorded, absolute, in the
            manifest entry's ``source.blob_root``, where ``driveengine show`` finds the images).
        split_dir: ``<out>/<split>``.
        options: frame settings.
        labels: build occupancy/flow labels (``driveengine.labels.generator``).
        label_config: the labels' ``LabelConfig`` (None without labels).
        split_ref: name or path of the split whose ``tokens`` restrict key frames (loaded in the worker,
            so a 100k-token list is not shipped with every task), or None.
        config_hash: hash of the settings, stored in the manifest entry.
        fingerprint: fingerprint of the inputs, stored in the manifest entry.
        openscene_occupancy: OpenScene v1.0 occupancy folder to import labels from instead of building them.
        tokens: the split's key-frame tokens when the split has no file (``split_ref`` is None).
    """

    log_name: str
    source: str
    input_path: str
    blob_root: str
    split_dir: str
    options: FrameOptions
    labels: bool = False
    label_config: Any = None
    split_ref: str | None = None
    config_hash: str = ""
    fingerprint: str = ""
    openscene_occupancy: str | None = None
    tokens: frozenset[str] | None = None


@dataclass
class LogResult:
    """Outcome of one :class:`LogTask`.

    Attributes:
        log_name: the task's log.
        status: ``"done"`` or ``"failed"``.
        entry: the manifest entry to record (done only).
        reason: why it failed (failed only), naming the file.
        frames: rows written.
        dropped: frames dropped by reason.
        notes: remarks (e.g. a log without key frames).
        broken: ``"<file>: <defect>"`` of the first broken sensor files found (their frames dropped).
        seconds: wall time of the job.
        peak_rss_mib: peak resident memory of the worker process so far, MiB.
    """

    log_name: str
    status: str
    entry: dict[str, Any] | None = None
    reason: str | None = None
    frames: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0


def read_log(source: str, path: str | Path) -> LogData:
    """Read one input log with the reader of ``source`` (``nuplan`` .db or ``openscene`` .pkl)."""
    if source == "nuplan":
        from driveengine.sources.nuplan.reader import read_nuplan_log

        return read_nuplan_log(path)
    if source == "openscene":
        from driveengine.sources.openscene.reader import read_openscene_log

        return read_openscene_log(path)
    raise DriveEngineError(f"unknown source {source!r}; use nuplan or openscene")


def _split_tokens(task: LogTask) -> frozenset[str] | None:
    if task.tokens is not None or task.split_ref is None:
        return task.tokens
    from driveengine.splits import load_split

    return load_split(task.split_ref).tokens


def _labels_module() -> Any:
    try:
        from driveengine.labels import generator as labels
    except ImportError as exc:
        raise DriveEngineError(
            f"occupancy labels are not available in this installation ({exc}); collect with --no-labels"
        ) from None
    return labels


def _import_openscene_labels(task: LogTask, log: LogData, key_sweeps: Any, zarr_tmp: Path) -> dict[str, Any]:
    """Import OpenScene v1.0 occupancy files of the rows' frames (OpenScene source only).

    Each row is matched to its frame dict in the source pickle by token, whose ``occ_gt_final_path``
    (or, without it, OpenScene's own scene name and frame_idx) locates the files.
    """
    from driveengine.formats.openscene_labels import import_openscene_labels, locate_label_files
    from driveengine.sources.openscene.reader import load_openscene_pickle

    if task.source != "openscene":
        raise DriveEngineError(
            "--openscene-occupancy needs --source openscene (the files are named by its metadata)"
        )
    by_token = {str(f["token"]): f for f in load_openscene_pickle(task.input_path)}
    rows = [by_token[str(tok)] for tok in log.sweep_token[key_sweeps]]
    folder = Path(task.input_path).parent.name  # meta_datas/<folder>/<log>.pkl
    files = locate_label_files(rows, Path(task.openscene_occupancy or ""), folder)
    frames = import_openscene_labels(
        files,
        zarr_tmp,
        timestamps_us=log.sweep_timestamp_us[key_sweeps],
        source=str(task.openscene_occupancy),
    )
    return {"imported_from": str(task.openscene_occupancy), "frames": frames}


def _write_labels(
    task: LogTask, log: LogData, key_sweeps: Any, zarr_tmp: Path, progress: Callable[[int], None] | None
) -> dict[str, Any]:
    if task.openscene_occupancy:
        return _import_openscene_labels(task, log, key_sweeps, zarr_tmp)
    labels = _labels_module()
    return labels.write_log_labels(
        log, key_sweeps, Path(task.blob_root), zarr_tmp, task.label_config, progress=progress
    )


def run_log(
    task: LogTask,
    progress: Callable[[int], None] | None = None,
    may_commit: Callable[[], bool] | None = None,
) -> LogResult:
    """Collect one log: read, select key frames, write ``meta/<log>.parquet`` (+ labels), commit files.

    Args:
        task: what to do.
        progress: called with the number of frames whose labels were just finished (in-process runs).
        may_commit: asked right before the commit; False (the client is gone) fails the log instead.

    Never raises; see :class:`LogResult`.
    """
    start = time.perf_counter()
    split_dir = Path(task.split_dir)
    temporaries: list[Path] = []
    result = LogResult(log_name=task.log_name, status="failed")
    try:
        log = read_log(task.source, task.input_path)
        selection = select_frames(
            log,
            task.options,
            Path(task.blob_root),
            sweeps_are_key_frames=task.source == "openscene",
            tokens=_split_tokens(task),
        )
        table = build_frame_table(log, selection, task.options)
        check_finite(table, task.input_path, task.log_name)
        meta_rel = meta_relpath(task.log_name)
        meta_tmp = temporary_path(split_dir / meta_rel)
        meta_tmp.parent.mkdir(parents=True, exist_ok=True)
        temporaries.append(meta_tmp)
        pq.write_table(table, meta_tmp, **PARQUET_OPTIONS)
        files = {meta_rel: meta_tmp}
        label_stats = None
        occ_rel = None
        if task.labels and table.num_rows > 0:
            occ_rel = occ_relpath(task.log_name)
            occ_tmp = temporary_path(split_dir / occ_rel)
            occ_tmp.parent.mkdir(parents=True, exist_ok=True)
            temporaries.append(occ_tmp)
            label_stats = _write_labels(task, log, selection.key_sweeps, occ_tmp, progress)
            files[occ_rel] = occ_tmp
        checksums = commit_log_files(split_dir, files, may_commit)
        temporaries.clear()
        timestamps = table.column("timestamp").to_numpy()
        notes = list(selection.notes) + list(log.notes)
        result = LogResult(
            log_name=task.log_name,
            status="done",
            frames=table.num_rows,
            dropped=dict(selection.dropped),
            notes=notes,
            broken=list(selection.broken),
            entry={
                "frames": table.num_rows,
                "meta": meta_rel,
                "occ": occ_rel,
                "checksums": checksums,
                "source": {
                    "kind": task.source,
                    "path": str(task.input_path),
                    "blob_root": str(Path(task.blob_root).resolve()),
                    "fingerprint": task.fingerprint,
                },
                "config_hash": task.config_hash,
                "dropped": dict(sorted(selection.dropped.items())),
                "key_frame_candidates": int(selection.candidates.size),
                "labels": label_stats,
                "log_name": log.log_name,
                "first_timestamp": int(timestamps[0]) if len(timestamps) else None,
                "last_timestamp": int(timestamps[-1]) if len(timestamps) else None,
                "notes": notes + list(selection.broken),
                "committed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )
    except DriveEngineError as exc:
        result.reason = str(exc)
    except Exception as exc:  # per-log isolation: an unexpected error fails this log only
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.reason = (
            f"{task.input_path}: unexpected {type(exc).__name__}: {exc} "
            f"(at {Path(where.filename).name}:{where.lineno}; please report this)"
        )
    finally:
        for tmp in temporaries:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - start
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result
