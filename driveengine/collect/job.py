"""The per-log job of ``collect``: read one log, write its frame rows (and labels), commit its files.

:func:`run_log` is what a process-pool worker or a Dask worker runs. It never raises: any failure
comes back as a :class:`LogResult` with ``status="failed"`` and a reason that names the file, and its
temporaries are removed. It makes the log's files durable itself (:func:`~driveengine.store.commit.log_output`:
in a local folder, temporaries renamed into place; on an object store, a local scratch folder uploaded
under per-attempt keys and read back to verify them); the manifest is updated by the client alone, from
the returned :class:`~driveengine.store.manifest.LogEntry`, which names the files as committed.

The log is read through its source (``driveengine.sources``, by name: the task travels to other
processes, the source is looked up there), its key frames chosen by the source, its rows built and
written by the store's frame writer, its labels made by the task's label producer. Before anything is
written the rows are checked for NaN/inf in the schema's finite columns
(:func:`~driveengine.collect.frames.check_finite`: the log fails, naming column, row and token). In a
pool worker, ``may_commit`` is asked right before the rename (or the upload of the labels): a worker
whose client is gone (killed) commits nothing.
"""

from __future__ import annotations

import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from driveengine.collect.frames import FrameOptions, build_frame_table, check_finite, select_frames
from driveengine.errors import DriveEngineError
from driveengine.labels.base import LabelJob, LabelProducer
from driveengine.sources import get_source
from driveengine.sources.base import InputLog
from driveengine.store.commit import log_output, meta_relpath, occ_relpath
from driveengine.store.frames import write_frames
from driveengine.store.manifest import LogEntry, SourceRef
from driveengine.store.occ import OccStorage


@dataclass(frozen=True)
class LogTask:
    """Everything a worker needs to collect one log (picklable; input paths must be visible to the worker).

    Attributes:
        source: the source's registry name (looked up in the worker).
        input: the log's input (``input.name`` is the output name ``meta/<name>.parquet``).
        blob_root: folder the log's relative sensor paths are relative to (recorded, absolute, in the
            manifest entry, where the loader and ``show`` find the sensor files).
        split_dir: ``<out>/<split>``: a folder, or an fsspec URL (``s3://bucket/prefix/<split>``; the
            worker then needs only local scratch space, no shared file system).
        frames: frame settings.
        labels: the label producer, or None for frame rows only.
        storage: how the label group is stored.
        split_ref: name or path of the split whose ``tokens`` restrict key frames (loaded in the worker,
            so a 100k-token list is not shipped with every task), or None.
        tokens: the split's key-frame tokens when the split has no file (``split_ref`` is None).
        config_hash: hash of the settings, stored in the manifest entry.
        fingerprint: fingerprint of the inputs, stored in the manifest entry.
    """

    source: str
    input: InputLog
    blob_root: str
    split_dir: str
    frames: FrameOptions
    labels: LabelProducer | None = None
    storage: OccStorage = field(default_factory=OccStorage)
    split_ref: str | None = None
    tokens: frozenset[str] | None = None
    config_hash: str = ""
    fingerprint: str = ""

    @property
    def log_name(self) -> str:
        """The output name of the log."""
        return self.input.name


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
        worker_deaths: how the workers of this log's earlier attempts died (local pool runs; e.g.
            ``signal 9, SIGKILL``); empty when the first attempt ended it.
    """

    log_name: str
    status: str
    entry: LogEntry | None = None
    reason: str | None = None
    frames: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    worker_deaths: list[str] = field(default_factory=list)


def _split_tokens(task: LogTask) -> frozenset[str] | None:
    if task.tokens is not None or task.split_ref is None:
        return task.tokens
    from driveengine.splits import load_split

    return load_split(task.split_ref).tokens


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
    result = LogResult(log_name=task.log_name, status="failed")
    output = None
    try:
        output = log_output(task.split_dir)
        source = get_source(task.source)
        log = source.read_log(task.input)
        blob_root = Path(task.blob_root)
        selection = select_frames(
            log,
            task.frames,
            blob_root,
            candidates=source.key_frame_candidates(log, task.frames.sample_interval),
            lidar_defect=source.lidar_defect,
            tokens=_split_tokens(task),
        )
        table = build_frame_table(log, selection, task.frames)
        check_finite(table, str(task.input.path), task.log_name)
        meta_rel = meta_relpath(task.log_name)
        meta_tmp = output.stage(meta_rel)
        write_frames(table, meta_tmp)
        output.finish(meta_rel)
        label_stats = None
        occ_rel = None
        if task.labels is not None and table.num_rows > 0:
            occ_rel = occ_relpath(task.log_name)
            occ_tmp = output.stage(occ_rel)
            label_stats = task.labels.write(
                LabelJob(
                    log=log,
                    key_sweeps=selection.key_sweeps,
                    input=task.input,
                    source=source,
                    blob_root=blob_root,
                    out=occ_tmp,
                    classes=source.class_table,
                    storage=task.storage,
                    progress=progress,
                )
            )
        committed = output.commit(may_commit)
        timestamps = table.column("timestamp").to_numpy()
        notes = list(selection.notes) + list(log.notes)
        result = LogResult(
            log_name=task.log_name,
            status="done",
            frames=table.num_rows,
            dropped=dict(selection.dropped),
            notes=notes,
            broken=list(selection.broken),
            entry=LogEntry(
                frames=table.num_rows,
                meta=committed.paths[meta_rel],
                occ=None if occ_rel is None else committed.paths[occ_rel],
                checksums=committed.checksums,
                source=SourceRef(
                    name=task.source,
                    path=str(task.input.path),
                    blob_root=str(blob_root.resolve()),
                    fingerprint=task.fingerprint,
                ),
                config_hash=task.config_hash,
                dropped=dict(sorted(selection.dropped.items())),
                key_frame_candidates=int(selection.candidates.size),
                labels=label_stats,
                log_name=log.log_name,
                first_timestamp_us=int(timestamps[0]) if len(timestamps) else None,
                last_timestamp_us=int(timestamps[-1]) if len(timestamps) else None,
                notes=tuple(notes + list(selection.broken)),
                committed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            ),
        )
    except DriveEngineError as exc:
        result.reason = str(exc)
    except Exception as exc:  # per-log isolation: an unexpected error fails this log only
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.reason = (
            f"{task.input.path}: unexpected {type(exc).__name__}: {exc} "
            f"(at {Path(where.filename).name}:{where.lineno}; please report this)"
        )
    finally:
        if output is not None:
            output.discard()
    result.seconds = time.perf_counter() - start
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return result
