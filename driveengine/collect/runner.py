"""``driveengine collect``: plan the logs of a split, run the per-log job in parallel, record the manifest.

Schedulers (one log per task, dynamic scheduling, per-log error isolation):

* ``workers=1``: in this process;
* ``workers=N``: a local process pool (:mod:`driveengine.collect.pool`: workers forked from a
  ``forkserver``; a worker killed by the OOM killer costs one retry of its log, not the run; workers die
  with this process, even after ``kill -9``);
* ``scheduler="local:N"``: a Dask ``LocalCluster`` of N single-threaded worker processes on 127.0.0.1;
* ``scheduler="tcp://host:port"``: an existing Dask distributed cluster; the output folder must be on a
  file system the workers share.

Workers write and commit their own log files (:mod:`driveengine.store.commit`); this process alone
owns ``manifest.json`` and saves it after each finished log, so an interrupted run keeps its finished
logs (for huge manifests, saves are spaced by :data:`MANIFEST_SAVE_BACKOFF` times their cost; a log
whose entry was not saved yet is simply redone). A lock file refuses a second ``collect`` on the same
output. Logs about to be redone lose their entry first, so an entry never disagrees with its files.

Ctrl-C (SIGINT) stops the workers, saves the manifest with the logs finished so far and raises
:class:`CollectInterrupted` (a ``KeyboardInterrupt``); the command line prints one line and exits 130.
Running the same command again resumes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from driveengine.collect.frames import BROKEN_BLOB_REASONS, FrameOptions
from driveengine.collect.job import PARQUET_OPTIONS, LogResult, LogTask, run_log
from driveengine.collect.pool import run_pool
from driveengine.errors import DriveEngineError
from driveengine.schemas import FORMAT_VERSION
from driveengine.schemas.classes import CAMERA_CHANNELS, LIDAR_CHANNEL
from driveengine.splits import SplitDef, load_split
from driveengine.store.commit import (
    CollectLock,
    clean_stale_temporaries,
    config_hash,
    entry_files_present,
    source_fingerprint,
)
from driveengine.store.manifest import Manifest, load_or_create_manifest, save_manifest

SOURCES = ("nuplan", "openscene")
#: Minimum seconds between two manifest saves during a run (always saved at the end).
#: The manifest is saved after every finished log, unless saving it takes long (huge splits): then it
#: waits at least this many times the last save's duration, so saving costs at most ~1/N of the client.
MANIFEST_SAVE_BACKOFF = 10.0


class CollectError(DriveEngineError):
    """``collect`` cannot start: bad input folder, unknown logs, bad scheduler, ..."""


class CollectInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a ``collect``; the logs finished before are committed (``summary``).

    A ``KeyboardInterrupt``, so callers that do not know it stop as usual; ``str()`` is the one line the
    command line prints.
    """

    def __init__(self, summary: CollectSummary, committed: int) -> None:
        self.summary = summary
        super().__init__(
            f"interrupted: {len(summary.done)} logs committed in this run, {committed} in "
            f"{summary.split_dir}; run the same command again to resume"
        )


@dataclass
class CollectConfig:
    """Settings of one ``collect`` run.

    Attributes:
        source: ``nuplan`` (``root`` holds ``splits/<folder>/*.db`` and ``sensor_blobs/``) or
            ``openscene`` (``root`` holds ``meta_datas/<folder>/*.pkl`` and ``sensor_blobs/<folder>/``).
        root: the input root.
        out: output root; the split goes to ``out/<split name>/``.
        split: split name or YAML path (see :mod:`driveengine.splits`), or a ``SplitDef``.
        sensor_root: blob root overriding the default one under ``root``.
        input_dir: folder of the log files overriding ``<root>/splits/<folder>`` (``meta_datas/<folder>``).
        sample_interval, is_test, filter_instance, check_blobs: see :class:`FrameOptions`.
        labels: build occupancy/flow labels.
        label_window_s, label_sweep_step, label_box_margin_m, label_visibility: label generator settings
            (``window_s``, ``sweep_step``, ``box_margin_m``, ``visibility`` of
            :class:`~driveengine.labels.generator.LabelConfig`; None keeps its default). They enter the
            config hash: changing one redoes the logs, keeping them skips the logs already done.
        openscene_occupancy: import OpenScene v1.0 occupancy labels from this folder instead.
        overwrite: redo logs even when their manifest entry matches.
        logs: restrict to these log names.
        workers: local worker processes (1 = in this process).
        scheduler: ``local:N`` or ``tcp://host:port`` for Dask; None for the local pool.
        progress: show tqdm bars.
    """

    source: str
    root: Path
    out: Path
    split: str | SplitDef = "mini"
    sensor_root: Path | None = None
    input_dir: Path | None = None
    sample_interval: int = 10
    is_test: bool = False
    filter_instance: bool = False
    check_blobs: bool = True
    labels: bool = True
    label_window_s: float | None = None
    label_sweep_step: int | None = None
    label_box_margin_m: float | None = None
    label_visibility: str | None = None
    openscene_occupancy: Path | None = None
    overwrite: bool = False
    logs: list[str] | None = None
    workers: int = 1
    scheduler: str | None = None
    progress: bool = True


@dataclass
class CollectSummary:
    """What a run did.

    Attributes:
        split_dir: the output split folder.
        done: logs collected in this run.
        skipped: logs whose manifest entry already matched.
        failed: log -> reason.
        frames: rows written in this run.
        dropped: frames dropped in this run, by reason.
        empty: logs committed with no rows (e.g. no frame with all cameras), with the reason.
        seconds: wall time.
        peak_rss_mib: highest peak resident memory reported by a worker, MiB.
        cleaned: stale temporaries removed at start.
        broken: ``"<file>: <defect>"`` of the first broken sensor files met (their frames dropped).
    """

    split_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    dropped: Counter = field(default_factory=Counter)
    empty: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    cleaned: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        """A multi-line human summary."""
        lines = [
            f"collect {self.split_dir}: {len(self.done)} logs done, {len(self.skipped)} skipped (up to date), "
            f"{len(self.failed)} failed; {self.frames} frames written in {self.seconds:.1f} s",
        ]
        if self.dropped:
            lines.append(
                "frames dropped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items()))
            )
        broken = {reason: self.dropped[reason] for reason in BROKEN_BLOB_REASONS if self.dropped.get(reason)}
        if broken:
            counts = ", ".join(f"{reason} {n}" for reason, n in broken.items())
            lines.append(
                f"WARNING: {sum(broken.values())} frames dropped for broken sensor files ({counts}), e.g. "
                f"{self.broken[0] if self.broken else '?'}; repair or re-download them, then run again "
                "with --overwrite"
            )
        for name, why in sorted(self.empty.items()):
            lines.append(f"  empty log {name}: {why}")
        if self.cleaned:
            lines.append(f"removed {len(self.cleaned)} stale temporaries of an interrupted run")
        for name, reason in sorted(self.failed.items()):
            lines.append(f"  FAILED {name}: {reason}")
        if self.failed:
            lines.append(
                "fix or remove the failed inputs and run the same command again (finished logs are kept)"
            )
        return "\n".join(lines)


def _input_dirs(config: CollectConfig, folder: str) -> tuple[Path, str, Path]:
    """(folder of the log files, their suffix, blob root)."""
    root = Path(config.root)
    if config.source == "nuplan":
        log_dir, suffix, blobs = root / "splits" / folder, ".db", root / "sensor_blobs"
        hint = "expected <nuplan-root>/splits/<folder>/*.db"
    elif config.source == "openscene":
        log_dir, suffix, blobs = root / "meta_datas" / folder, ".pkl", root / "sensor_blobs" / folder
        hint = "expected <openscene-root>/meta_datas/<folder>/*.pkl"
    else:
        raise CollectError(f"unknown source {config.source!r}; use one of {', '.join(SOURCES)}")
    if config.input_dir is not None:
        log_dir, hint = Path(config.input_dir), f"expected a folder of {suffix} files"
    if not log_dir.is_dir():
        raise CollectError(f"{log_dir}: no such folder ({hint}); check --{config.source}-root and --split")
    return log_dir, suffix, Path(config.sensor_root) if config.sensor_root else blobs


def _label_config(config: CollectConfig) -> Any:
    """The run's ``LabelConfig`` (None without generated labels), from the ``label_*`` settings."""
    if not config.labels or config.openscene_occupancy is not None:
        return None
    try:
        from driveengine.labels.generator import LabelConfig
    except ImportError as exc:
        raise CollectError(
            f"occupancy labels are not available in this installation ({exc}); collect with --no-labels"
        ) from None
    chosen = {
        "window_s": config.label_window_s,
        "sweep_step": config.label_sweep_step,
        "box_margin_m": config.label_box_margin_m,
        "visibility": config.label_visibility,
    }
    try:
        return LabelConfig(**{k: v for k, v in chosen.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise CollectError(
            f"bad label setting: {exc} (see the --label-* options of `driveengine collect --help`)"
        ) from None


def plan_tasks(config: CollectConfig) -> tuple[Path, list[LogTask]]:
    """The split folder and one :class:`LogTask` per selected log (sorted by name).

    Raises:
        CollectError: missing input folder, ``--logs`` naming logs the split does not have, ...
    """
    split = config.split if isinstance(config.split, SplitDef) else load_split(config.split)
    if config.openscene_occupancy is not None:
        if config.source != "openscene":
            raise CollectError(
                "--openscene-occupancy needs --source openscene (its metadata names the label files)"
            )
        if not Path(config.openscene_occupancy).is_dir():
            raise CollectError(f"{config.openscene_occupancy}: no such folder (--openscene-occupancy)")
    with_labels = config.labels or config.openscene_occupancy is not None
    log_dir, suffix, blob_root = _input_dirs(config, split.folder)
    available = {p.name.removesuffix(suffix): p for p in log_dir.iterdir() if p.name.endswith(suffix)}
    names = split.select_logs(list(available))
    if config.logs:
        unknown = sorted(set(config.logs) - set(names))
        if unknown:
            raise CollectError(
                f"--logs names {len(unknown)} log(s) that split {split.name!r} has no input for in {log_dir}: "
                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            )
        names = sorted(set(config.logs))
    options = FrameOptions(
        split=split.name,
        sample_interval=config.sample_interval,
        is_test=config.is_test,
        filter_instance=config.filter_instance,
        check_blobs=config.check_blobs,
    )
    label_config = _label_config(config)
    settings = {
        "format_version": FORMAT_VERSION,
        "source": config.source,
        "frames": options.to_dict(),
        "parquet": PARQUET_OPTIONS,
        "tokens": split.tokens_digest(),
        "labels": label_config.to_dict() if label_config is not None else None,
        "openscene_occupancy": str(config.openscene_occupancy) if config.openscene_occupancy else None,
    }
    digest = config_hash(settings)
    split_dir = Path(config.out) / split.name
    tasks = []
    for name in names:
        watched = [available[name]]
        if config.check_blobs or with_labels:
            sensor = blob_root / name
            watched += [sensor / LIDAR_CHANNEL] + [sensor / cam for cam in CAMERA_CHANNELS]
        tasks.append(
            LogTask(
                log_name=name,
                source=config.source,
                input_path=str(available[name]),
                blob_root=str(blob_root),
                split_dir=str(split_dir),
                options=options,
                labels=with_labels,
                label_config=label_config,
                split_ref=_split_ref(split) if split.tokens is not None and split.path else None,
                tokens=split.tokens if split.tokens is not None and not split.path else None,
                config_hash=digest,
                fingerprint=source_fingerprint(watched),
                openscene_occupancy=str(config.openscene_occupancy) if config.openscene_occupancy else None,
            )
        )
    return split_dir, tasks


def _split_ref(split: SplitDef) -> str:
    """How a worker finds the split again: a shipped split by name (install paths differ between
    machines), a user split by its path (which must be visible to the workers)."""
    shipped = Path(str(resources.files("driveengine.splits"))).resolve()
    return split.name if split.path and Path(split.path).parent.resolve() == shipped else str(split.path)


def _is_current(split_dir: Path, entry: dict[str, Any] | None, task: LogTask) -> bool:
    return (
        entry is not None
        and entry.get("config_hash") == task.config_hash
        and entry.get("source", {}).get("fingerprint") == task.fingerprint
        and entry_files_present(split_dir, entry)
    )


def _results_inline(tasks: list[LogTask], progress: Callable[[str, int], None]) -> Iterator[LogResult]:
    for task in tasks:
        yield run_log(task, progress=lambda n, name=task.log_name: progress(name, n))


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while processes are started (they inherit it: a terminal's Ctrl-C reaches the whole
    process group, and then only this process reacts); a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _results_dask(tasks: list[LogTask], scheduler: str) -> Iterator[LogResult]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise CollectError(f"--scheduler needs dask distributed ({exc})") from None
    cluster = None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.removeprefix("local:"))
        except ValueError:
            raise CollectError(f"--scheduler {scheduler!r}: expected local:N with N workers") from None
        with _sigint_ignored():  # the cluster's processes inherit it: Ctrl-C is handled here alone
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                processes=True,
                silence_logs=logging.ERROR,  # not the warnings of tasks cancelled by Ctrl-C; failures are ours
            )
        client = Client(cluster)
    elif scheduler.startswith("tcp://"):
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise CollectError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc})") from None
    else:
        raise CollectError(f"--scheduler {scheduler!r}: expected local:N or tcp://HOST:PORT")
    try:
        futures = [
            client.submit(run_log, task, key=f"collect-{task.log_name}-{time.time_ns()}", pure=False)
            for task in tasks
        ]
        by_key = {f.key: t for f, t in zip(futures, tasks, strict=True)}
        for future in as_completed(futures):
            task = by_key[future.key]
            try:
                yield future.result()
            except Exception as exc:  # KilledWorker, lost connection, ...
                yield LogResult(
                    task.log_name, "failed", reason=f"{task.input_path}: Dask task failed ({exc!r})"
                )
    finally:
        with _sigint_ignored():  # a Ctrl-C during the shutdown would leave the cluster half closed
            client.close()
            if cluster is not None:
                cluster.close()


def collect(config: CollectConfig, echo: Callable[[str], None] = print) -> CollectSummary:
    """Collect the logs of a split into ``config.out/<split>/`` (see the module doc).

    Returns:
        The run's summary; ``summary.ok`` is False when a log failed.

    Raises:
        CollectError: the run cannot start (bad folders, unknown logs, bad scheduler).
        CollectLockedError: another collect holds the output's lock.
    """
    start = time.perf_counter()
    split_dir, tasks = plan_tasks(config)
    summary = CollectSummary(split_dir=split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(split=split_dir.name)
    try:
        with CollectLock(split_dir):
            summary.cleaned = clean_stale_temporaries(split_dir)
            manifest = load_or_create_manifest(split_dir, split_dir.name)
            todo = []
            for task in tasks:
                if not config.overwrite and _is_current(split_dir, manifest.logs.get(task.log_name), task):
                    summary.skipped.append(task.log_name)
                else:
                    todo.append(task)
            # An entry must never disagree with its files: forget the logs about to be redone first.
            forgotten = [t.log_name for t in todo if manifest.logs.pop(t.log_name, None) is not None]
            if forgotten or not (split_dir / "manifest.json").exists():
                save_manifest(split_dir, manifest)
            if todo:
                echo(f"collect: {len(todo)} logs to do, {len(summary.skipped)} up to date -> {split_dir}")
            bars = _Bars(len(todo), config.progress and bool(todo))
            try:
                _consume(_run(config, todo, bars), manifest, split_dir, summary, bars)
            finally:
                bars.close()
    except KeyboardInterrupt:
        summary.seconds = time.perf_counter() - start
        raise CollectInterrupted(summary, len(manifest.logs)) from None
    summary.seconds = time.perf_counter() - start
    return summary


class _Bars:
    """tqdm bars of logs and frames; frames advance while labels are made (in-process and pool runs:
    progress arrives in this thread, between results) or when a log ends (Dask)."""

    def __init__(self, total_logs: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.logs = tqdm(total=total_logs, desc="logs", unit="log", disable=not enabled, position=0)
        self.frames = tqdm(desc="frames", unit="frame", disable=not enabled, position=1)
        self._reported: Counter = Counter()
        self._done: set[str] = set()

    def frame_progress(self, log_name: str, n: int) -> None:
        if log_name not in self._done:  # a late message of a finished log is already counted
            self._reported[log_name] += n
            self.frames.update(n)

    def log_done(self, result: LogResult) -> None:
        self._done.add(result.log_name)
        self.frames.update(max(0, result.frames - self._reported.pop(result.log_name, 0)))
        self.logs.update(1)

    def close(self) -> None:
        self.frames.close()
        self.logs.close()


def _run(config: CollectConfig, todo: list[LogTask], bars: _Bars) -> Iterator[LogResult]:
    if not todo:
        return iter(())
    if config.scheduler:
        return _results_dask(todo, config.scheduler)
    if config.workers <= 1 or len(todo) == 1:
        return _results_inline(todo, bars.frame_progress)
    return run_pool(todo, min(config.workers, len(todo)), bars.frame_progress)


def _consume(
    results: Iterator[LogResult], manifest: Manifest, split_dir: Path, summary: CollectSummary, bars: _Bars
) -> None:
    """Record each finished log in the manifest (this process is its only writer) and in the summary."""
    last_save, save_cost = 0.0, 0.0
    dirty = False
    try:
        for result in results:
            summary.peak_rss_mib = max(summary.peak_rss_mib, result.peak_rss_mib)
            if result.status == "done" and result.entry is not None:
                manifest.logs[result.log_name] = result.entry
                dirty = True
                summary.done.append(result.log_name)
                summary.frames += result.frames
                summary.dropped.update(result.dropped)
                summary.broken.extend(result.broken)
                if result.frames == 0:
                    summary.empty[result.log_name] = "; ".join(result.notes) or "no key frame kept"
            else:
                summary.failed[result.log_name] = result.reason or "unknown error"
                bars.logs.write(f"FAILED {result.log_name}: {summary.failed[result.log_name]}")
            bars.log_done(result)
            if dirty and time.monotonic() - last_save >= MANIFEST_SAVE_BACKOFF * save_cost:
                started = time.monotonic()
                save_manifest(split_dir, manifest)
                last_save, save_cost, dirty = time.monotonic(), time.monotonic() - started, False
    finally:
        if dirty:
            save_manifest(split_dir, manifest)
