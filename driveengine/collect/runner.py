"""``driveengine collect``: plan the logs of a split, run the per-log job in parallel, record the manifest.

:func:`collect` plans the run (:mod:`driveengine.collect.plan`), runs the per-log jobs
(:mod:`driveengine.collect.job`) on a scheduler (:mod:`driveengine.collect.schedulers`: in-process, a
local process pool, Dask) and records each finished log in the manifest.

Workers write and commit their own log files (:mod:`driveengine.store.commit`); this process alone
owns ``manifest.json`` and saves it after each finished log, so an interrupted run keeps its finished
logs (for huge manifests, saves are spaced by :data:`MANIFEST_SAVE_BACKOFF` times their cost; a log
whose entry was not saved yet is simply redone). A lock refuses a second ``collect`` on the same
output. Logs about to be redone lose their entry first, so an entry never disagrees with its files.

The output root is a folder, or an fsspec URL (``s3://bucket/prefix``, ``gs://...``): then workers
upload each log under per-attempt keys and verify them, this process commits by putting the manifest,
and removes at the start and at the end of the run the objects no entry names (attempts of crashed
runs and killed workers, logs redone); the lock is an object with a lease (see
:mod:`driveengine.store.commit` for the protocol and its limits). The store's endpoint and credentials
come from the environment of every process (fsspec's ``FSSPEC_S3_ENDPOINT_URL=...`` or
``FSSPEC_S3='{"endpoint_url": ...}'``, the back-end's ``AWS_ACCESS_KEY_ID``...).

A split holds one dataset: a run whose source, cameras, class table or grid differ from the logs
already committed there is refused (``--overwrite`` redoes them all).

Ctrl-C (SIGINT) stops the workers, saves the manifest with the logs finished so far and raises
:class:`CollectInterrupted` (a ``KeyboardInterrupt``); the command line prints one line and exits 130.
Running the same command again resumes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from driveengine.collect.config import CollectConfig, CollectError, RunOptions, SourceSelection
from driveengine.collect.frames import BROKEN_BLOB_REASONS
from driveengine.collect.job import LogResult, LogTask
from driveengine.collect.plan import Plan, plan_tasks
from driveengine.collect.schedulers import run_tasks
from driveengine.progress import Progress, progress
from driveengine.store.commit import ObjectStoreLock, ObjectStoreSplit, SplitOutput, split_output
from driveengine.store.manifest import LogEntry, Manifest, is_remote

logger = logging.getLogger(__name__)

__all__ = [
    "CollectConfig", "CollectError", "CollectInterrupted", "CollectSummary", "RunOptions", "SourceSelection",
    "collect", "plan_tasks",
]  # fmt: skip

#: Minimum seconds between two manifest saves during a run (always saved at the end).
#: The manifest is saved after every finished log, unless saving it takes long (huge splits): then it
#: waits at least this many times the last save's duration, so saving costs at most ~1/N of the client.
MANIFEST_SAVE_BACKOFF = 10.0


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
class CollectSummary:
    """What a run did.

    Attributes:
        split_dir: the output split folder (or URL).
        done: logs collected in this run.
        skipped: logs whose manifest entry already matched.
        failed: log -> reason.
        frames: rows written in this run.
        dropped: frames dropped in this run, by reason.
        empty: logs committed with no rows (e.g. no frame with all cameras), with the reason.
        seconds: wall time.
        peak_rss_mib: highest peak resident memory reported by a worker, MiB.
        cleaned: leftovers removed: temporaries of crashed runs (folder, at start); objects that no
            manifest entry names (object store, at start and end: crashed or killed attempts, logs redone).
        broken: ``"<file>: <defect>"`` of the first broken sensor files met (their frames dropped).
        retried: log -> how the workers of its earlier attempts died (local pool), whether the log was
            then done (the text summary lists these) or failed (its reason says so).
    """

    split_dir: Path | str
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
    retried: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (``collect --json``): every field, ``ok``, and ``seconds`` rounded to milliseconds."""
        return {
            "split_dir": str(self.split_dir), "ok": self.ok, "done": list(self.done), "skipped": list(self.skipped),
            "failed": dict(self.failed), "frames": self.frames, "dropped": dict(sorted(self.dropped.items())),
            "empty": dict(self.empty), "seconds": round(self.seconds, 3), "peak_rss_mib": round(self.peak_rss_mib, 1),
            "cleaned": len(self.cleaned), "broken": list(self.broken), "retried": dict(self.retried),
        }  # fmt: skip

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
        if self.cleaned and is_remote(self.split_dir):
            lines.append(
                f"removed {len(self.cleaned)} objects that no manifest entry names (unfinished attempts of an "
                "interrupted run or a killed worker, logs redone)"
            )
        elif self.cleaned:
            lines.append(f"removed {len(self.cleaned)} stale temporaries of an interrupted run")
        for name, deaths in sorted(self.retried.items()):
            if name not in self.failed:
                lines.append(f"  retried {name} after its worker died ({'; '.join(deaths)})")
        for name, reason in sorted(self.failed.items()):
            lines.append(f"  FAILED {name}: {reason}")
        if self.failed:
            lines.append(
                "fix or remove the failed inputs and run the same command again (finished logs are kept)"
            )
        return "\n".join(lines)


def _is_current(output: SplitOutput, entry: LogEntry | None, task: LogTask) -> bool:
    return (
        entry is not None
        and entry.config_hash == task.config_hash
        and entry.source.fingerprint == task.fingerprint
        and output.files_present(entry)
    )


def _output_of(config: CollectConfig, plan: Plan) -> tuple[SplitOutput, list[LogTask]]:
    """Where the run writes, and the plan's tasks pointed there (an ``--out`` URL: its split's URL)."""
    output = split_output(config.run.out, plan.split)
    return output, [replace(task, split_dir=output.location) for task in plan.tasks]


def _adopt_dataset(manifest: Manifest, plan: Plan, overwrite: bool, location: str) -> None:
    """Record the run's dataset in the manifest; refuse mixing datasets in one split (see the module doc)."""
    conflicts = manifest.dataset.conflicts(plan.dataset) if manifest.logs else []
    if conflicts and not overwrite:
        raise CollectError(
            f"{location}: its {len(manifest.logs)} committed logs hold other data than this run would "
            f"write ({'; '.join(conflicts)}); collect into another --out, or pass --overwrite to redo them all"
        )
    if conflicts:
        manifest.logs.clear()
    manifest.dataset = plan.dataset


def collect(config: CollectConfig, echo: Callable[[str], None] = print) -> CollectSummary:
    """Collect the logs of a split into ``config.run.out/<split>/`` (a folder or a URL; see the module doc).

    Returns:
        The run's summary; ``summary.ok`` is False when a log failed.

    Raises:
        CollectError: the run cannot start (bad folders, unknown logs, bad scheduler, another dataset).
        OutputLocationError: an output URL fsspec cannot open, or a bucket it cannot write.
        CollectLockedError: another collect holds the output's lock (or took it over during this run).
        CollectInterrupted: Ctrl-C (the logs finished before it are committed).
    """
    start = time.perf_counter()
    plan = plan_tasks(config)
    output, tasks = _output_of(config, plan)
    split_dir: Path | str = Path(output.location) if not is_remote(output.location) else output.location
    summary = CollectSummary(split_dir=split_dir)
    manifest = Manifest(split=plan.split)
    run = config.run
    try:
        with output.lock() as lock:
            if isinstance(lock, ObjectStoreLock) and lock.took_over:
                echo(f"collect: took over the lock of a previous run ({lock.took_over})")
            if isinstance(output, ObjectStoreSplit) and not output.atomic:
                echo(
                    f"collect: note: {output.location} has no conditional writes (registered in "
                    "driveengine.store.commit); its lock cannot stop two runs started at the same instant"
                )
            manifest = output.load_manifest(plan.split)
            summary.cleaned = output.clean(manifest, at_start=True)
            before = dict(manifest.logs)
            _adopt_dataset(manifest, plan, run.overwrite, output.location)
            todo = []
            for task in tasks:
                if not run.overwrite and _is_current(output, manifest.logs.get(task.log_name), task):
                    summary.skipped.append(task.log_name)
                else:
                    todo.append(task)
            # An entry must never disagree with its files: forget the logs about to be redone first.
            for task in todo:
                manifest.logs.pop(task.log_name, None)
            if manifest.logs != before or not output.has_manifest:
                output.save_manifest(manifest)
            if todo:
                echo(f"collect: {len(todo)} logs to do, {len(summary.skipped)} up to date -> {split_dir}")
            with progress(
                len(todo), desc="collect", unit="log", rate_unit="frame", show=run.progress and bool(todo)
            ) as bar:
                bars = _Bars(bar)
                results = run_tasks(todo, run.workers, run.scheduler, bars.frame_progress)
                _consume(results, manifest, output, summary, bars)
            summary.cleaned += output.clean(manifest, at_start=False)
    except KeyboardInterrupt:
        summary.seconds = time.perf_counter() - start
        raise CollectInterrupted(summary, len(manifest.logs)) from None
    summary.seconds = time.perf_counter() - start
    return summary


class _Bars:
    """Progress of logs (the count) and frames (the rate, :mod:`driveengine.progress`: a bar on a terminal,
    single lines in a file); frames advance while labels are made (in-process and pool runs: progress
    arrives in this thread, between results) or when a log ends (Dask)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self._reported: Counter = Counter()
        self._done: set[str] = set()

    def frame_progress(self, log_name: str, n: int) -> None:
        if log_name not in self._done:  # a late message of a finished log is already counted
            self._reported[log_name] += n
            self.bar.update(0, amount=n)

    def log_done(self, result: LogResult) -> None:
        self._done.add(result.log_name)
        self.bar.update(1, amount=max(0, result.frames - self._reported.pop(result.log_name, 0)))
        logger.debug("%s: %s, %d frames", result.log_name, result.status, result.frames)


def _consume(
    results: Iterator[LogResult],
    manifest: Manifest,
    output: SplitOutput,
    summary: CollectSummary,
    bars: _Bars,
) -> None:
    """Record each finished log in the manifest (this process is its only writer) and in the summary."""
    last_save, save_cost = 0.0, 0.0
    dirty = False
    try:
        for result in results:
            summary.peak_rss_mib = max(summary.peak_rss_mib, result.peak_rss_mib)
            if result.worker_deaths:
                summary.retried[result.log_name] = list(result.worker_deaths)
            refused = None if result.entry is None else output.check_result(result.entry)
            if refused is not None:
                result.status, result.reason = "failed", refused
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
                bars.bar.write(f"FAILED {result.log_name}: {summary.failed[result.log_name]}")
            bars.log_done(result)
            if dirty and time.monotonic() - last_save >= MANIFEST_SAVE_BACKOFF * save_cost:
                started = time.monotonic()
                output.save_manifest(manifest)
                last_save, save_cost, dirty = time.monotonic(), time.monotonic() - started, False
    finally:
        if dirty:
            output.save_manifest(manifest)
