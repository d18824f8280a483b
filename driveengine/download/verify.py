"""``driveengine verify``: is everything the metadata references present and readable?

Reads every ``openscene-v1.1/meta_datas/<split>/*.pkl`` (untrusted: loaded with
:func:`driveengine.sources.openscene.reader.load_openscene_pickle`, a restricted unpickler admitting numpy and
builtins only), collects each frame's ``lidar_path`` and ``cams[*].data_path`` (relative to
``openscene-v1.1/sensor_blobs/<split>/``), and checks each referenced blob:

- presence, with one directory listing per folder (not one ``stat`` per file);
- readability (``--content``, default): a ``.pcd`` header parses and a binary body is as long as the
  header says; a ``.jpg`` starts with the JPEG SOI marker and ends with EOI (a truncated JPEG lacks it).

Every missing or broken blob is attributed to the archive shard that holds it: from the file lists
recorded at extraction (``.driveengine/archives/*.files.txt``), else from a published log-to-shard map
(``--shard-map``), else inferred from where the same log's other blobs came from. Archives still on
disk are re-hashed against their recorded / published / ``--md5-file`` MD5 (when one is known). The
report ends with the exact ``driveengine download ... --shards N`` commands that fix what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from driveengine.download.checksums import lookup, read_checksum_file
from driveengine.download.checksums import md5_file as _md5_of
from driveengine.download.release import format_shards, load_manifest, select_files
from driveengine.download.state import archive_index, read_download_record
from driveengine.errors import DriveEngineError
from driveengine.progress import progress
from driveengine.sources.openscene.reader import load_openscene_pickle

RELEASE_DIR = "openscene-v1.1"
_SHARD_IN_NAME = re.compile(r"_(\d+)\.(?:tgz|tar\.gz|tar)$")


# -- blob checks ------------------------------------------------------------------------------------


def check_pcd(path: Path) -> str | None:
    """``None`` when the PCD header parses and a binary body is complete, else the problem in words."""
    from driveengine.sources.pcd import read_pcd_header

    try:
        header = read_pcd_header(path)
    except DriveEngineError as exc:
        return getattr(exc, "reason", str(exc))
    if header.encoding == "binary":
        point_bytes = sum(size * count for size, count in zip(header.sizes, header.counts, strict=True))
        need = header.data_offset + header.points * point_bytes
        size = path.stat().st_size
        if size < need:
            return f"truncated: {size:,} bytes, the header announces {need:,}"
    return None


def check_jpeg(path: Path) -> str | None:
    """``None`` when the file starts with the JPEG SOI marker and ends with EOI, else the problem."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
            size = f.seek(0, os.SEEK_END)
            if size < 4:
                return f"too short for a JPEG ({size} bytes)"
            f.seek(-32 if size >= 32 else -size, os.SEEK_END)
            tail = f.read()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if head != b"\xff\xd8\xff":
        return "not a JPEG (no SOI marker)"
    if b"\xff\xd9" not in tail.rstrip(b"\x00\r\n "):
        return "truncated JPEG (no EOI marker at the end)"
    return None


def check_blob(path: Path) -> str | None:
    """Content check by extension (``.pcd``, ``.jpg``/``.jpeg``); other files only need to be non-empty."""
    suffix = path.suffix.lower()
    if suffix == ".pcd":
        return check_pcd(path)
    if suffix in (".jpg", ".jpeg"):
        return check_jpeg(path)
    try:
        return None if path.stat().st_size > 0 else "empty file"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"


# -- shard attribution ------------------------------------------------------------------------------


def load_shard_map(path: str | Path) -> dict[str, int]:
    """A published log-to-shard map as ``{log_name: shard}``.

    Accepted JSON shapes: ``{"<shard>": [logs...]}``, ``{"<log>": shard}``, ``[[logs of shard 0], ...]``,
    or a list of ``{"log"|"log_name": ..., "shard"|"index": ...}`` records.

    Raises:
        DriveEngineError: unreadable file or none of the shapes above.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise DriveEngineError(f"{path}: cannot read the shard map: {exc}") from None
    out: dict[str, int] = {}

    def add(log: object, shard: object) -> None:
        shard_s = str(shard)
        match = re.search(r"(\d+)$", Path(shard_s).stem) if not shard_s.isdigit() else None
        index = int(shard_s) if shard_s.isdigit() else (int(match.group(1)) if match else None)
        if index is None:
            raise DriveEngineError(f"{path}: shard {shard!r} of log {log!r} is not a shard number")
        out[str(log).removesuffix(".pkl")] = index

    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, list):
                for log in value:
                    add(log, key)
            elif isinstance(value, (int, str)):
                add(key, value)
            else:
                raise DriveEngineError(f"{path}: unexpected value for {key!r} in the shard map")
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if isinstance(item, list):
                for log in item:
                    add(log, i)
            elif isinstance(item, dict):
                log = item.get("log") or item.get("log_name")
                shard = item.get("shard", item.get("index"))
                if log is None or shard is None:
                    raise DriveEngineError(f"{path}: record {i} lacks log/shard keys")
                add(log, shard)
    else:
        raise DriveEngineError(f"{path}: a shard map must be a JSON object or list")
    return out


def _modality_of(rel: str) -> str:
    return "lidar" if rel.lower().endswith(".pcd") or "/MergedPointCloud/" in rel else "camera"


def _shard_of(archive_name: str) -> int | None:
    match = _SHARD_IN_NAME.search(archive_name)
    return int(match.group(1)) if match else None


# -- the report -------------------------------------------------------------------------------------


@dataclass
class BlobProblem:
    """A blob the metadata references that is missing or unreadable.

    ``path`` is relative to ``sensor_blobs/<split>/``; ``archive``/``shard`` say where it comes from and
    ``attribution`` how that was found (``recorded``, ``shard-map``, ``inferred``, ``unknown``).
    """

    path: str
    log: str
    modality: str
    problem: str
    archive: str | None = None
    shard: int | None = None
    attribution: str = "unknown"


@dataclass
class LogSummary:
    """Per log: frames, referenced blobs, and how many are missing / unreadable."""

    log: str
    frames: int = 0
    blobs: int = 0
    missing: int = 0
    unreadable: int = 0


@dataclass
class ArchiveCheck:
    """An archive found on disk and the outcome of re-hashing it."""

    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    """Everything ``verify`` found; ``ok`` when nothing is missing or wrong."""

    root: str
    split: str
    metadata_files: int = 0
    frames: int = 0
    blobs: int = 0
    logs: list[LogSummary] = field(default_factory=list)
    problems: list[BlobProblem] = field(default_factory=list)
    metadata_errors: list[str] = field(default_factory=list)
    archives: list[ArchiveCheck] = field(default_factory=list)
    partial_downloads: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing missing, unreadable or corrupt."""
        return not (self.problems or self.metadata_errors or any(not a.ok for a in self.archives))

    def to_json(self) -> str:
        """The report as JSON (stable keys, for scripts)."""
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=1)

    def format(self, max_lines: int = 50) -> str:
        """The report for people: totals, logs with problems, the problems, the fixing commands."""
        out = [
            f"verify {self.root} split {self.split}: {self.metadata_files} metadata files, {self.frames:,} frames, "
            f"{self.blobs:,} referenced blobs"
        ]
        for err in self.metadata_errors:
            out.append(f"  METADATA {err}")
        for a in self.archives:
            out.append(f"  archive {'ok     ' if a.ok else 'CORRUPT'} {a.name}: {a.detail}")
        for part in self.partial_downloads:
            out.append(f"  partial download (not verified, resume with download): {part}")
        bad_logs = [s for s in self.logs if s.missing or s.unreadable]
        if bad_logs:
            out.append(f"{len(bad_logs)} of {len(self.logs)} logs have problems:")
            for s in bad_logs[:max_lines]:
                out.append(
                    f"  {s.log}: {s.missing} missing, {s.unreadable} unreadable of {s.blobs} blobs ({s.frames} frames)"
                )
        if self.problems:
            out.append(f"{len(self.problems)} blobs missing or unreadable:")
            for p in self.problems[:max_lines]:
                where = f"{p.archive} ({p.attribution})" if p.archive else "archive unknown"
                out.append(f"  {p.path}: {p.problem}; in {where}")
            if len(self.problems) > max_lines:
                out.append(f"  ... and {len(self.problems) - max_lines} more (use --json for all)")
        if self.fixes:
            out.append("to fix, run:")
            out.extend(f"  {cmd}" for cmd in self.fixes)
        out.append("OK: everything the metadata references is present and readable" if self.ok else "FAILED")
        return "\n".join(out)


# -- the check ---------------------------------------------------------------------------------------


def _release_dir(root: Path, split: str) -> Path:
    """``root/openscene-v1.1`` (or ``root`` itself when it is that folder)."""
    if (root / RELEASE_DIR).is_dir() or not (root / "meta_datas").is_dir():
        return root / RELEASE_DIR
    return root


def verify_release(
    root: str | Path,
    split: str,
    shard_map: str | Path | None = None,
    md5_file: str | Path | None = None,
    check_content: bool = True,
    check_archives: bool = True,
    jobs: int = 8,
    show_progress: bool = False,
) -> VerifyReport:
    """Verify the extracted split under ``root`` against its metadata (see the module docstring).

    Args:
        root: the download folder (holding ``openscene-v1.1/``), or the ``openscene-v1.1`` folder itself.
        split: the split to check.
        shard_map: published log-to-shard map JSON (see :func:`load_shard_map`).
        md5_file: md5sum file with expected archive digests.
        check_content: check PCD/JPEG headers, not only presence.
        check_archives: re-hash the archives of the split still on disk that have a known MD5.
        jobs: threads for the content checks and archive hashing.
        show_progress: show the content check's progress (:mod:`driveengine.progress`: a bar on a terminal,
            single lines in a file).

    Returns:
        The :class:`VerifyReport`.
    """
    root = Path(root)
    release = _release_dir(root, split)
    report = VerifyReport(root=str(root), split=split)
    meta_dir = release / "meta_datas" / split
    blob_dir = release / "sensor_blobs" / split
    # download folder the archive records live in (root, or the parent of an openscene-v1.1 folder)
    state_root = root if release != root else root.parent

    # 1. metadata: referenced blobs per log
    refs: dict[str, str] = {}  # blob path -> log
    per_log: dict[str, LogSummary] = {}
    pkls = sorted(meta_dir.glob("*.pkl")) if meta_dir.is_dir() else []
    if not pkls:
        report.metadata_errors.append(
            f"{meta_dir}: no metadata (*.pkl) found; download it: "
            + shlex.join(
                [
                    "driveengine",
                    "download",
                    "--split",
                    split,
                    "--modality",
                    "metadata",
                    "--out",
                    str(state_root),
                ]
            )
        )
    for pkl in pkls:
        try:
            frames = load_openscene_pickle(pkl)
        except DriveEngineError as exc:
            report.metadata_errors.append(str(exc))
            continue
        report.metadata_files += 1
        for frame in frames:
            log = str(frame.get("log_name") or pkl.stem)
            summary = per_log.setdefault(log, LogSummary(log=log))
            summary.frames += 1
            report.frames += 1
            paths = [frame.get("lidar_path")]
            cams = frame.get("cams") or {}
            if isinstance(cams, dict):
                paths += [c.get("data_path") for c in cams.values() if isinstance(c, dict)]
            for p in paths:
                if p and str(p) not in refs:
                    refs[str(p)] = log
                    summary.blobs += 1
    report.blobs = len(refs)
    report.logs = sorted(per_log.values(), key=lambda s: s.log)

    # 2. presence: one listing per folder
    by_dir: dict[str, list[str]] = defaultdict(list)
    for p in refs:
        head, _, tail = p.rpartition("/")
        by_dir[head].append(tail)
    present: list[str] = []
    found: list[tuple[str, str]] = []  # (path, problem)
    for folder, names in by_dir.items():
        try:
            listing = set(os.listdir(blob_dir / folder))
        except OSError:
            listing = set()
        for n in names:
            rel = f"{folder}/{n}" if folder else n
            (present.append(rel) if n in listing else found.append((rel, "missing")))

    # 3. content
    if check_content and present:
        chunks = [present[i : i + 512] for i in range(0, len(present), 512)]

        def check_chunk(chunk: list[str]) -> list[tuple[str, str]]:
            return [(rel, f"unreadable: {why}") for rel in chunk if (why := check_blob(blob_dir / rel))]

        with (
            progress(len(present), desc="verify", unit="file", show=show_progress) as bar,
            ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
        ):
            for chunk, bad in zip(chunks, pool.map(check_chunk, chunks), strict=True):
                found += bad
                bar.update(len(chunk))

    # 4. attribution
    index = archive_index(state_root)
    prefix = os.path.relpath(blob_dir, state_root).replace(os.sep, "/") + "/"
    log_shards: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)  # (log, modality) -> shard counts
    log_any_shard: dict[str, Counter[int]] = defaultdict(Counter)
    for path, archive in index.items():
        if path.startswith(prefix):
            rel = path[len(prefix) :]
            shard = _shard_of(archive)
            if shard is not None:
                log = rel.split("/", 1)[0]
                log_shards[(log, _modality_of(rel))][shard] += 1
                log_any_shard[log][shard] += 1
    published = load_shard_map(shard_map) if shard_map else {}
    names = _archive_names(split)
    for rel, problem in sorted(found):
        log = refs[rel]
        modality = _modality_of(rel)
        item = BlobProblem(path=rel, log=log, modality=modality, problem=problem)
        recorded = index.get(prefix + rel)
        if recorded:
            item.archive, item.shard, item.attribution = recorded, _shard_of(recorded), "recorded"
        else:
            dir_log = rel.split("/", 1)[0]
            shard = None
            if log in published or dir_log in published:
                shard, item.attribution = published.get(log, published.get(dir_log)), "shard-map"
            elif log_shards.get((dir_log, modality)):
                shard, item.attribution = log_shards[(dir_log, modality)].most_common(1)[0][0], "inferred"
            elif log_any_shard.get(dir_log):
                shard, item.attribution = log_any_shard[dir_log].most_common(1)[0][0], "inferred"
            if shard is not None:
                item.shard = shard
                item.archive = names.get((modality, shard))
        report.problems.append(item)
        summary = per_log.get(log)
        if summary:
            if problem == "missing":
                summary.missing += 1
            else:
                summary.unreadable += 1

    # 5. archives still on disk
    if check_archives:
        _check_archives(state_root, split, md5_file, report, jobs)

    # 6. fixing commands
    report.fixes = _fix_commands(report, split, state_root)
    return report


def _archive_names(split: str) -> dict[tuple[str, int], str]:
    try:
        files = select_files(split, manifest=load_manifest())
    except DriveEngineError:
        return {}
    return {(f.modality, f.shard): f.name for f in files if f.shard is not None}


def _check_archives(
    root: Path, split: str, md5_file: str | Path | None, report: VerifyReport, jobs: int
) -> None:
    try:
        files = select_files(split)
    except DriveEngineError:
        return
    table = read_checksum_file(md5_file) if md5_file else {}
    on_disk = [f for f in files if f.local_path(root).is_file()]
    report.partial_downloads = [
        f.name for f in files if f.local_path(root).with_name(f.local_path(root).name + ".part").is_file()
    ]

    def check(f: Any) -> ArchiveCheck:
        path = f.local_path(root)
        expected_from = []
        record = read_download_record(root, f.basename)
        given = lookup(table, f.name) if table else None
        expected = {
            "--md5-file": given.md5 if given else None,
            "release manifest": f.md5,
            "download record": record.md5 if record else None,
        }
        if not any(expected.values()):
            return ArchiveCheck(f.name, True, "present; no checksum known to check it against")
        digest = _md5_of(path)
        for source, value in expected.items():
            if value:
                if value != digest:
                    return ArchiveCheck(
                        f.name, False, f"MD5 {digest} differs from the {source} ({value}); download it again"
                    )
                expected_from.append(source)
        return ArchiveCheck(f.name, True, f"MD5 matches the {', '.join(expected_from)}")

    if on_disk:
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, 4))) as pool:
            report.archives = list(pool.map(check, on_disk))


def _fix_commands(report: VerifyReport, split: str, root: Path) -> list[str]:
    by_modality: dict[str, set[int]] = defaultdict(set)
    unknown: set[str] = set()
    for p in report.problems:
        if p.shard is not None:
            by_modality[p.modality].add(p.shard)
        else:
            unknown.add(p.modality)
    for a in report.archives:
        if not a.ok:
            shard = _shard_of(a.name)
            modality = "lidar" if "_lidar" in a.name else "camera" if "_camera" in a.name else None
            if shard is not None and modality:
                by_modality[modality].add(shard)
    base = ["driveengine", "download", "--split", split]
    cmds = [
        shlex.join(
            [*base, "--modality", modality, "--shards", format_shards(sorted(shards)), "--out", str(root)]
        )
        for modality, shards in sorted(by_modality.items())
    ]
    for modality in sorted(unknown):
        cmds.append(
            shlex.join([*base, "--modality", modality, "--out", str(root)])
            + "   # shard unknown: pass --shard-map to narrow this down"
        )
    return cmds
