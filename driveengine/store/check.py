"""``driveengine verify OUT/<split>``: re-hash a collected split's committed files against its manifest.

``collect`` records a sha256 for every file of a log when it commits it (``checksums`` of each manifest
entry: ``meta/<log>.parquet`` hashed as a file, ``occ/<log>.zarr`` as a tree with
:func:`~driveengine.store.commit.sha256_tree`). :func:`verify_split` recomputes them and names every
file that is missing or differs. For a label group whose tree hash differs it also names what can be
named from the group itself: shard files its arrays need that are missing, and files that do not
belong to a DriveEngine group. Paths that would leave the split folder (``../../etc/passwd``) are
reported, never read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from driveengine.store.commit import sha256_file, sha256_tree
from driveengine.store.manifest import MANIFEST_NAME, load_manifest

#: Statuses of a checked file.
OK = "ok"
MISSING = "missing"
DIFFERS = "differs"
UNSAFE = "outside the split folder"
UNRECORDED = "no checksum"


@dataclass
class FileCheck:
    """One committed file (or Zarr folder) of a log, checked against the manifest.

    Attributes:
        path: relative to the split folder, as the manifest names it.
        log: the log it belongs to.
        status: ``ok``, ``missing``, ``differs``, ``outside the split folder`` or ``no checksum``.
        expected, actual: ``sha256:<hex>`` recorded / recomputed (actual empty when not computed).
        details: what was found inside a differing Zarr group (missing shard files, foreign files).
    """

    path: str
    log: str
    status: str
    expected: str = ""
    actual: str = ""
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass
class SplitCheck:
    """Result of :func:`verify_split`."""

    split_dir: str
    logs: int
    files: list[FileCheck]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    @property
    def problems(self) -> list[FileCheck]:
        return [f for f in self.files if not f.ok]

    def damaged_logs(self) -> list[str]:
        """Names of the logs with at least one problem, sorted."""
        return sorted({f.log for f in self.problems})

    def format(self) -> str:
        """A human-readable report: one line per problem naming the file and the log, then what to do."""
        head = (
            f"verify {self.split_dir}: {self.logs} logs, {len(self.files)} committed files re-hashed "
            f"against {MANIFEST_NAME}"
        )
        if self.ok:
            return f"{head}\nOK: every committed file matches its sha256"
        lines = [head]
        for f in self.problems:
            line = f"  {f.status.upper()}: {Path(self.split_dir) / f.path} (log {f.log})"
            if f.status == DIFFERS:
                line += f": sha256 {f.actual.removeprefix('sha256:')[:12]}..., manifest {f.expected.removeprefix('sha256:')[:12]}..."
            lines.append(line)
            lines += [f"      {d}" for d in f.details]
        logs = self.damaged_logs()
        lines.append(
            f"{len(self.problems)} of {len(self.files)} files damaged in {len(logs)} log(s): re-collect them with "
            f"`driveengine collect ... --overwrite --logs {','.join(logs)}`"
        )
        return "\n".join(lines)

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=1)


def _inside(split_dir: Path, rel: str) -> Path | None:
    """``split_dir / rel`` if that stays inside the split folder (symlinks resolved), else None."""
    if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        return None
    target = split_dir / rel
    base = os.path.realpath(split_dir)
    real = os.path.realpath(target)
    return target if real == base or real.startswith(base + os.sep) else None


def _zarr_details(group_dir: Path, split_dir: Path) -> list[str]:
    """What a differing ``occ/<log>.zarr`` lacks or holds extra, by its own metadata (best effort)."""
    from driveengine.store.occ import OccFormatError, open_occ

    try:
        occ = open_occ(group_dir)
    except OccFormatError as exc:
        return [f"unreadable group: {exc}"]
    expected = {group_dir / "zarr.json"}
    details = []
    for name in occ.coordinate_arrays:  # small one-chunk arrays beside the label arrays (not checked here)
        expected.add(group_dir / name / "zarr.json")
        if occ.array(name).shape[0]:
            expected.add(Path(occ.shard_file(name, 0)))
    for name in occ.arrays:
        array = occ.array(name)
        per_shard = int(array.shards[0]) if array.shards else 1
        expected.add(group_dir / name / "zarr.json")
        shards = -(-occ.num_frames // per_shard)
        for shard in range(shards):
            path = Path(occ.shard_file(name, shard))
            expected.add(path)
            if not path.is_file():
                last = min((shard + 1) * per_shard, occ.num_frames) - 1
                details.append(
                    f"missing: {path.relative_to(split_dir)} ({name} frames {shard * per_shard}..{last})"
                )
    extra = sorted(p for p in group_dir.rglob("*") if p.is_file() and p not in expected)
    details += [f"not part of a DriveEngine label group: {p.relative_to(split_dir)}" for p in extra]
    return details


def _check_one(split_dir: Path, log: str, rel: str, expected: Any) -> FileCheck:
    path = _inside(split_dir, rel)
    if path is None:
        return FileCheck(rel, log, UNSAFE, str(expected))
    if not isinstance(expected, str) or not expected.startswith("sha256:"):
        return FileCheck(rel, log, UNRECORDED, str(expected))
    if not path.exists():
        return FileCheck(rel, log, MISSING, expected)
    actual = sha256_tree(path) if path.is_dir() else sha256_file(path)
    if actual == expected:
        return FileCheck(rel, log, OK, expected, actual)
    details = _zarr_details(path, split_dir) if path.is_dir() else []
    return FileCheck(rel, log, DIFFERS, expected, actual, details)


def collected_split_folder(root: str | os.PathLike[str], split: str) -> Path | None:
    """The collected split folder ``root`` names: ``root`` itself or ``root/<split>`` when it holds a
    ``manifest.json``; None otherwise (e.g. a download folder)."""
    root = Path(root)
    for folder in (root, root / split):
        if (folder / MANIFEST_NAME).is_file():
            return folder
    return None


def verify_split(
    split_dir: str | os.PathLike[str],
    *,
    workers: int = 4,
    on_file: Callable[[FileCheck], None] | None = None,
) -> SplitCheck:
    """Re-hash every committed file of a collected split against its manifest's sha256s.

    Args:
        split_dir: a collected split folder ``OUT/<split>`` (holds ``manifest.json``).
        workers: files hashed in parallel (threads; hashing releases the GIL).
        on_file: called with each result as it is ready (progress).

    Returns:
        One :class:`FileCheck` per file the manifest names (its ``checksums``, plus ``meta``/``occ`` that
        have no checksum recorded), in log then path order.

    Raises:
        ManifestError: the manifest is missing or unreadable.
    """
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    todo: list[tuple[str, str, Any]] = []
    for log in sorted(manifest.logs):
        entry = manifest.logs[log]
        checksums = entry.checksums
        paths = sorted({*checksums, *(p for p in (entry.meta, entry.occ) if p)})
        todo += [(log, rel, checksums.get(rel)) for rel in paths]
    results: list[FileCheck] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(lambda item: _check_one(split_dir, *item), todo):
            results.append(result)
            if on_file is not None:
                on_file(result)
    return SplitCheck(str(split_dir), len(manifest.logs), results)
