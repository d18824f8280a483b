"""``driveengine download``: plan, check disk space, fetch, verify, extract and record release archives.

Each selected archive goes through: skip when its extraction is complete (marker present and every
file it extracted still there) -> download to ``.part`` (resumable, verified) -> extract all-or-nothing
-> delete the archive unless asked to keep it. Archives whose extraction fails as corrupt are
downloaded once more from zero; archives refused for what they hold (links, paths leaving the
folder, ``.driveengine/`` members, decompression bombs) are not. Re-running the same command continues
where it stopped, and repairs archives whose extracted files went missing.

Limits (see :class:`~driveengine.download.fetch.FetchOptions` and :mod:`.extract`): ``--timeout``
(connect, each read and the size probes), ``--min-speed`` over ``--speed-window`` and ``--deadline`` per
file, and ``--max-extract-ratio`` (extracted bytes / archive bytes; default
:data:`EXTRACT_RATIO_MARGIN` x the archive's ``extract_ratio`` in ``release.json``). Without a
checksum a download must still match the manifest's size (exactly, or within ``size_tolerance`` of a
rounded figure); a server's ``Content-Length`` alone verifies nothing.

Sizes unknown to the manifest are probed before the download (``Range: bytes=0-0``). When the first
probe gets no answer at all, the mirror is reported unreachable in one line (and, unless it is a dry
run, the download stops there) instead of one line per file.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from driveengine.download.checksums import lookup, read_checksum_file
from driveengine.download.errors import (
    ArchiveError,
    DownloadError,
    InsufficientSpaceError,
    UnsafeArchiveError,
)
from driveengine.download.extract import extract_archive
from driveengine.download.fetch import (
    FetchOptions,
    FetchResult,
    FetchTask,
    LineFn,
    Probe,
    fetch_file,
    parallel_map,
    probe,
)
from driveengine.download.release import (
    MirrorSource,
    ReleaseFile,
    format_shards,
    load_manifest,
    resolve_source,
    select_files,
    url_for,
)
from driveengine.download.state import (
    DownloadRecord,
    extraction_complete,
    read_download_record,
    write_checksums_file,
    write_download_record,
)
from driveengine.errors import DriveEngineError
from driveengine.progress import Progress, progress

#: Default decompression-bomb limit: this many times the archive's expected ``extract_ratio``.
EXTRACT_RATIO_MARGIN = 5.0


@dataclass
class DownloadRequest:
    """Everything ``driveengine download`` was asked to do.

    Attributes:
        split: release split (``mini``, ``trainval``, ``test``, ``private_test_*``, ``navtrain``).
        out: download folder; archives land at ``out/<release path>``, extraction into ``out``.
        modalities: subset of the split's modalities (``None``: all).
        shards: shard indices of sharded modalities (``None``: all).
        mirror / base_url: where from (``base_url`` wins; default: the release's default mirror).
        md5_file: extra md5sum/sha256sum file with expected digests.
        extract: extract archives after download.
        keep_archives: keep archives after a verified extraction.
        dry_run: only list files, sizes and the disk-space need.
        options: fetch behaviour (jobs, retries, backoff, timeouts, minimum speed, deadline).
        max_extract_ratio: most extracted bytes per archive byte (``None``: :data:`EXTRACT_RATIO_MARGIN`
            x the archive's ``extract_ratio`` from the manifest).
        release_json: a release manifest to use instead of the packaged ``release.json``.
    """

    split: str
    out: Path
    modalities: list[str] | None = None
    shards: list[int] | None = None
    mirror: str | None = None
    base_url: str | None = None
    md5_file: Path | None = None
    extract: bool = True
    keep_archives: bool = False
    dry_run: bool = False
    options: FetchOptions = field(default_factory=FetchOptions)
    max_extract_ratio: float | None = None
    release_json: Path | None = None

    def __post_init__(self) -> None:
        ratio = self.max_extract_ratio
        if ratio is not None and not (math.isfinite(ratio) and ratio >= 1):
            raise DownloadError(f"--max-extract-ratio {ratio}: must be a finite number >= 1")

    def extract_ratio_limit(self, file: ReleaseFile) -> float:
        """The decompression-bomb ratio for ``file`` (see ``max_extract_ratio``)."""
        return self.max_extract_ratio or EXTRACT_RATIO_MARGIN * file.extract_ratio


@dataclass
class PlannedFile:
    """One archive of the plan and its state on disk.

    ``state``: ``extracted`` (nothing to do), ``downloaded`` (verified archive present),
    ``partial`` (a ``.part`` to resume), ``todo``. ``size`` is the manifest's, or the server's answer to
    the size probe (for the plan and the disk-space check; only the manifest's is verified).
    ``unreachable``: why the source did not answer the first size probe (see :func:`probe_sizes`).
    """

    file: ReleaseFile
    url: str
    path: Path
    size: int | None
    size_exact: bool
    md5: str | None
    sha256: str | None
    state: str
    part_bytes: int = 0
    source: MirrorSource | None = None
    unreachable: str | None = None

    def fetch_task(self) -> FetchTask:
        """What :func:`~driveengine.download.fetch.fetch_file` needs; sizes only from the manifest."""
        f = self.file
        return FetchTask(
            url=self.url,
            dest=self.path,
            name=f.name,
            size=f.size,
            size_tolerance=0.0 if f.size_exact else f.size_tolerance,
            md5=self.md5,
            sha256=self.sha256,
            authorization=self.source.authorization if self.source else None,
        )


@dataclass
class Outcome:
    """Result for one planned archive: ``ok``, the reason when not, and what happened."""

    name: str
    ok: bool
    error: str | None = None
    action: str = ""
    interrupted: bool = False


@dataclass
class DownloadReport:
    """What :func:`run_download` did: the plan, per-archive outcomes, disk figures, interruption."""

    plan: list[PlannedFile]
    outcomes: list[Outcome] = field(default_factory=list)
    needed_bytes: int = 0
    free_bytes: int = 0
    unknown_sizes: int = 0
    interrupted: bool = False

    @property
    def failures(self) -> list[Outcome]:
        """Outcomes that failed (not counting interruptions)."""
        return [o for o in self.outcomes if not o.ok and not o.interrupted]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (``download --json``): the plan (one record per archive: name, state, size in bytes or
        None, whether the size is the manifest's, url, path, why its source was unreachable), the outcomes,
        the disk figures in bytes and whether the run was interrupted."""
        return {
            "plan": [
                {"file": p.file.name, "state": p.state, "size": p.size, "size_exact": p.size_exact, "url": p.url,
                 "path": str(p.path), "unreachable": p.unreachable or None}
                for p in self.plan
            ],
            "outcomes": [
                {"file": o.name, "ok": o.ok, "error": o.error, "action": o.action, "interrupted": o.interrupted}
                for o in self.outcomes
            ],
            "needed_bytes": self.needed_bytes, "free_bytes": self.free_bytes, "unknown_sizes": self.unknown_sizes,
            "interrupted": self.interrupted, "failures": len(self.failures),
        }  # fmt: skip


def format_command(
    req: DownloadRequest, shards: list[int] | None = None, modalities: list[str] | None = None
) -> str:
    """The ``driveengine download`` command line equivalent to ``req`` (optionally other shards/modalities)."""
    parts = ["driveengine", "download", "--split", req.split]
    mods = modalities if modalities is not None else req.modalities
    if mods:
        parts += ["--modality", ",".join(mods)]
    sel = shards if shards is not None else req.shards
    if sel:
        parts += ["--shards", format_shards(sel)]
    parts += ["--out", str(req.out)]
    if req.base_url:
        parts += ["--base-url", req.base_url]
    elif req.mirror:
        parts += ["--mirror", req.mirror]
    if req.md5_file:
        parts += ["--md5-file", str(req.md5_file)]
    if req.release_json:
        parts += ["--release-json", str(req.release_json)]
    if req.max_extract_ratio:
        parts += ["--max-extract-ratio", f"{req.max_extract_ratio:g}"]
    if req.options.jobs != FetchOptions().jobs:
        parts += ["--jobs", str(req.options.jobs)]
    if req.keep_archives:
        parts.append("--keep-archives")
    if not req.extract:
        parts.append("--no-extract")
    return shlex.join(parts)


def plan_download(req: DownloadRequest, line: LineFn | None = None) -> list[PlannedFile]:
    """Resolve the request against the release manifest and the state of ``req.out``.

    Sizes unknown to the manifest are asked from the server (``Range: bytes=0-0``, in parallel, with
    ``req.options.timeout_s``) for the files that still need downloading; see :func:`probe_sizes`.
    """
    manifest = load_manifest(str(req.release_json) if req.release_json else None)
    files = select_files(req.split, req.modalities, req.shards, manifest)
    source = resolve_source(req.split, req.mirror, req.base_url, manifest)
    table = read_checksum_file(req.md5_file) if req.md5_file else {}
    plan: list[PlannedFile] = []
    for f in files:
        expected = lookup(table, f.name) if table else None
        path = f.local_path(req.out)
        item = PlannedFile(
            file=f,
            url=url_for(source.base_url, f),
            path=path,
            size=f.size,
            size_exact=f.size_exact,
            md5=(expected.md5 if expected and expected.md5 else f.md5),
            sha256=(expected.sha256 if expected and expected.sha256 else f.sha256),
            state="todo",
            source=source,
        )
        if req.extract and extraction_complete(req.out, f.basename):
            item.state = "extracted"
        elif _verified_archive(req.out, item):
            item.state = "downloaded"
        elif (part := path.with_name(path.name + ".part")).exists():
            item.state = "partial"
            item.part_bytes = part.stat().st_size
        plan.append(item)

    to_probe = [p for p in plan if p.state in ("todo", "partial") and not p.size_exact]
    line = line or (lambda s: None)
    offline = probe_sizes(to_probe, source, req.options, line)
    if offline and req.dry_run:  # a real run stops with this reason instead (run_download)
        line(
            f"[offline] {source.label}: unreachable: {offline}; "
            f"the size of {len(to_probe)} archive{'s' if len(to_probe) != 1 else ''} is unknown"
        )
    return plan


def probe_sizes(
    items: list[PlannedFile], source: MirrorSource, opts: FetchOptions, line: LineFn
) -> str | None:
    """Ask the server the size of each of ``items`` (``opts.timeout_s`` per request) and store it.

    The first file is asked alone: when it gets no answer at all, the source is unreachable: every
    item is marked so (``unreachable``), nothing more is asked and the reason is returned (for one
    line per source instead of one per file). Else the others are asked in parallel
    (``max(4, opts.jobs)`` at a time), each file left without a size gets its own line, and ``None``
    is returned.
    """
    if not items:
        return None
    first = probe(items[0].url, opts, source.authorization)
    if first.unreachable:
        for p in items:
            p.unreachable = first.problem
        return first.problem
    rest = parallel_map(lambda p: probe(p.url, opts, source.authorization), items[1:], max(4, opts.jobs))
    for p, answer in zip(items, [first, *rest], strict=True):
        _store_probe(p, answer, line)
    return None


def _store_probe(item: PlannedFile, answer: Probe, line: LineFn) -> None:
    """Keep a probed size for the plan, or say why there is none."""
    if answer.size is not None:
        item.size, item.size_exact = answer.size, True
        return
    line(f"[size?]   {item.file.name}: size unknown: {answer.problem} ({item.url})")


def _verified_archive(root: Path, item: PlannedFile) -> bool:
    """The archive is present with a matching download record (size and mtime unchanged)."""
    if not item.path.is_file():
        return False
    record = read_download_record(root, item.file.basename)
    if record is None:
        return False
    st = item.path.stat()
    if record.size != st.st_size or record.mtime_ns != st.st_mtime_ns:
        return False
    if item.md5 and record.md5 != item.md5:
        return False
    return item.sha256 is None or record.sha256 == item.sha256


def space_needed(plan: list[PlannedFile], extract: bool) -> tuple[int, int]:
    """``(bytes, files of unknown size)`` still needed on disk for downloading and extracting ``plan``."""
    needed = 0
    unknown = 0
    for p in plan:
        if p.state == "extracted":
            continue
        if p.size is None:
            unknown += 1
            continue
        if p.state in ("todo", "partial"):
            needed += max(0, p.size - p.part_bytes)
        if extract:
            needed += int(p.size * p.file.extract_ratio)
    return needed, unknown


def free_space(folder: Path) -> tuple[Path, int]:
    """The nearest existing folder at or above ``folder`` and the free bytes of its file system."""
    probe = folder.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"


class _Progress:
    """One overall byte count (:mod:`driveengine.progress`: a bar on a terminal, a line every 10 s or 10 % in a
    file) and per-file state lines; thread-safe (downloads run in parallel threads)."""

    def __init__(self, show: bool) -> None:
        self._show = show
        self._lock = threading.Lock()
        self._display: contextlib.AbstractContextManager[Progress] = progress(desc="download", show=False)
        self._bar = self._display.__enter__()  # messages only, until start()

    def start(self, total: int | None) -> None:
        """Count ``total`` bytes from now on (None: unknown)."""
        with self._lock:
            self._display.__exit__(None, None, None)
            self._display = progress(total, desc="download", unit="B", scale=True, show=self._show)
            self._bar = self._display.__enter__()

    def advance(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def line(self, msg: str) -> None:
        with self._lock:
            self._bar.write(msg)

    def close(self) -> None:
        with self._lock:
            self._display.__exit__(None, None, None)


def run_download(req: DownloadRequest, echo: LineFn = print, show_progress: bool = True) -> DownloadReport:
    """Run a download request end to end (see the module docstring). Never raises for a per-file failure:
    the report lists them; raises for invalid requests and insufficient disk space.

    Args:
        req: the request.
        echo: where the plan and the summary go (one line per call).
        show_progress: show the byte count (:mod:`driveengine.progress`); per-file lines come either way.

    Raises:
        ReleaseError: unknown split / modality / shard / mirror.
        InsufficientSpaceError: the download and extraction do not fit (checked before any byte).
    """
    req.out = Path(req.out)
    progress = _Progress(show_progress)
    try:
        plan = plan_download(req, progress.line)
        report = DownloadReport(plan=plan)
        report.needed_bytes, report.unknown_sizes = space_needed(plan, req.extract)
        folder, report.free_bytes = free_space(req.out)
        if req.dry_run:
            _print_plan(plan, report, req, echo)
            return report
        _stop_if_unreachable(plan)
        if report.needed_bytes > report.free_bytes:
            raise InsufficientSpaceError(folder, report.needed_bytes, report.free_bytes)
        if report.unknown_sizes:
            echo(
                f"warning: the size of {report.unknown_sizes} archives is unknown; the disk-space check "
                f"covers the others ({_human(report.needed_bytes)} needed, {_human(report.free_bytes)} free)"
            )
        work = [p for p in plan if p.state != "extracted"]
        done = len(plan) - len(work)
        if done:
            echo(f"{done} of {len(plan)} archives already downloaded and extracted: skipped")
        if not work:
            report.outcomes = [Outcome(p.file.name, True, action="already complete") for p in plan]
            return report
        known = sum(p.size or 0 for p in work if p.state != "downloaded")
        progress.start(known or None)
        stop = threading.Event()
        try:
            outcomes = parallel_map(lambda p: _process(p, req, progress, stop), work, req.options.jobs, stop)
        except KeyboardInterrupt:
            report.interrupted = True
            outcomes = []
        report.outcomes = [
            Outcome(p.file.name, True, action="already complete") for p in plan if p.state == "extracted"
        ]
        report.outcomes += outcomes
    finally:
        progress.close()
    write_checksums_file(req.out)
    _print_summary(report, req, echo)
    return report


def _stop_if_unreachable(plan: list[PlannedFile]) -> None:
    """Raise one :class:`DownloadError` when the size probe found the source unreachable."""
    cut_off = [p for p in plan if p.unreachable]
    if not cut_off:
        return
    source = cut_off[0].source
    where = source.label if source else cut_off[0].url
    raise DownloadError(
        f"{where}: unreachable ({cut_off[0].unreachable}); nothing was downloaded (check the network or "
        "proxy settings, raise --timeout, or choose another --mirror or --base-url)"
    )


def _process(item: PlannedFile, req: DownloadRequest, progress: _Progress, stop: threading.Event) -> Outcome:
    """Download (unless a verified archive is present), extract, clean up one archive.

    A file-system or DriveEngine error fails this archive only (reported), never the others.
    """
    try:
        return _process_one(item, req, progress, stop)
    except (OSError, DriveEngineError) as exc:
        progress.line(f"[failed]  {item.file.name}: {exc}")
        return Outcome(item.file.name, False, f"{type(exc).__name__}: {exc}")


def _process_one(
    item: PlannedFile, req: DownloadRequest, progress: _Progress, stop: threading.Event
) -> Outcome:
    name = item.file.name
    task = item.fetch_task()
    attempts_left = 2  # a corrupt archive is downloaded once more from zero
    action = "verified archive present"
    while True:
        if item.state != "downloaded" or not item.path.exists():
            res = fetch_file(task, req.options, progress.advance, progress.line, stop)
            if not res.ok:
                return Outcome(name, False, res.error, interrupted=res.interrupted)
            _record(req.out, res)
            action = "downloaded" + (f" (resumed at {res.resumed_from:,} bytes)" if res.resumed_from else "")
        if not req.extract:
            return Outcome(name, True, action=action)
        if stop.is_set():
            return Outcome(name, False, "interrupted before extraction", interrupted=True)
        record = read_download_record(req.out, item.file.basename)
        try:
            result = extract_archive(
                item.path,
                req.out,
                name=name,
                md5=record.md5 if record else None,
                max_ratio=req.extract_ratio_limit(item.file),
            )
        except UnsafeArchiveError as exc:
            # refused for what it holds: the same bytes again would be refused again
            item.path.unlink(missing_ok=True)
            return Outcome(name, False, f"{type(exc).__name__}: {exc}")
        except ArchiveError as exc:
            attempts_left -= 1
            item.path.unlink(missing_ok=True)
            if attempts_left <= 0 or item.md5 is not None:
                # with a published checksum the bytes are the published ones: downloading again cannot help
                return Outcome(name, False, f"{exc} (downloaded {'twice' if attempts_left <= 0 else 'once'})")
            progress.line(f"[retry]   {name}: {exc.reason}; downloading again from zero")
            item.state = "todo"
            continue
        progress.line(f"[extract] {name}: {len(result.files):,} files, {_human(result.nbytes)}")
        if not req.keep_archives:
            item.path.unlink(missing_ok=True)
        return Outcome(name, True, action=action + ", extracted")


def _record(root: Path, res: FetchResult) -> None:
    st = res.task.dest.stat()
    write_download_record(
        root,
        DownloadRecord(
            name=res.task.name,
            size=res.size,
            md5=res.md5 or "",
            sha256=res.sha256,
            url=res.task.url,
            mtime_ns=st.st_mtime_ns,
            finished=st.st_mtime,
        ),
    )


def _print_plan(plan: list[PlannedFile], report: DownloadReport, req: DownloadRequest, echo: LineFn) -> None:
    echo(f"{'state':<11} {'size':>12}  file")
    total = 0
    for p in plan:
        size = _human(p.size) if p.size is not None else "unknown"
        if p.size is not None and not p.size_exact:
            size = "~" + size
        total += p.size or 0
        state = p.state if p.state != "partial" else f"partial {_human(p.part_bytes)}"
        echo(f"{state:<11} {size:>12}  {p.file.name}")
    approx = any(p.size is not None and not p.size_exact for p in plan)
    echo(
        f"{len(plan)} files, total {'~' if approx else ''}{_human(total)}"
        + (f" ({report.unknown_sizes} of unknown size)" if report.unknown_sizes else "")
    )
    echo(
        f"needed on disk for download{' + extraction' if req.extract else ''}: {_human(report.needed_bytes)}; "
        f"free under {req.out}: {_human(report.free_bytes)}"
    )


def _print_summary(report: DownloadReport, req: DownloadRequest, echo: LineFn) -> None:
    ok = sum(1 for o in report.outcomes if o.ok)
    if report.interrupted or any(o.interrupted for o in report.outcomes):
        parts = sum(1 for p in report.plan if p.path.with_name(p.path.name + ".part").exists())
        echo(f"interrupted: {ok} archives complete, {parts} partial downloads kept (.part).")
        echo(f"to continue, run the same command again:\n  {format_command(req)}")
    failures = report.failures
    if failures:
        echo(f"{len(failures)} of {len(report.plan)} archives FAILED:")
        for o in failures:
            echo(f"  {o.name}: {o.error}")
        echo(f"to retry them, run the same command again:\n  {format_command(req)}")
    elif not report.interrupted and not any(o.interrupted for o in report.outcomes):
        echo(f"{ok} of {len(report.plan)} archives complete in {req.out}")
