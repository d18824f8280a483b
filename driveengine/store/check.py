"""``driveengine verify OUT/<split>``: re-hash a collected split's committed files against its manifest.

``collect`` records a sha256 for every file of a log when it commits it (``checksums`` of each manifest
entry: ``meta/<log>.parquet`` hashed as a file, ``occ/<log>.zarr`` as a tree with
:func:`~driveengine.store.commit.sha256_tree`). :func:`verify_split` recomputes them and names every
file that is missing or differs. For a label group whose tree hash differs it also names what can be
named from the group itself: shard files its arrays need that are missing, and files that do not
belong to a DriveEngine group. Paths that would leave the split folder (``../../etc/passwd``) are
reported, never read.

A split on an object store (``s3://bucket/prefix/<split>``, any fsspec URL; endpoint and credentials from
fsspec's configuration and the environment, or ``storage_options``) is checked the same way, reading
every object back from the store: a file's sha256 is streamed from its object, a label group's tree hash
is computed from the objects under its key prefix (as the worker that uploaded it did), and a differing
group is compared, shard by shard, with what its own metadata says it holds.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from driveengine.store.commit import sha256_file, sha256_object, sha256_tree, tree_digest
from driveengine.store.manifest import (
    MANIFEST_NAME,
    ManifestError,
    is_remote,
    join_location,
    load_manifest,
    local_path,
    remote_fs,
)

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
            line = f"  {f.status.upper()}: {join_location(self.split_dir, f.path)} (log {f.log})"
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


def collected_split_folder(
    root: str | os.PathLike[str], split: str, storage_options: dict[str, Any] | None = None
) -> Path | str | None:
    """The collected split ``root`` names: ``root`` itself or ``root/<split>`` when it holds a
    ``manifest.json``; None otherwise (e.g. a download folder). A URL (``s3://...``) is returned as its
    text, a folder as a :class:`~pathlib.Path`.

    Raises:
        ManifestError: a URL fsspec has no file system for, or a store that cannot be listed.
    """
    if is_remote(root):
        url = os.fspath(root).rstrip("/")
        for location in (url, join_location(url, split)):
            fs, path = remote_fs(join_location(location, MANIFEST_NAME), storage_options)
            try:
                if fs.isfile(path):
                    return location
            except OSError as exc:
                raise ManifestError(f"{location}: cannot look for {MANIFEST_NAME} ({exc})") from None
        return None
    folder_root = local_path(root)
    for folder in (folder_root, folder_root / split):
        if (folder / MANIFEST_NAME).is_file():
            return folder
    return None


def _remote_key(root: str, rel: str) -> str | None:
    """``root/rel`` if ``rel`` stays under ``root`` (relative, POSIX, no ``..``), else None."""
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or ".." in parts or parts in ((), (".",)):
        return None
    return f"{root}/{rel}"


class _RemoteSplit:
    """A split on an object store, as :func:`verify_split` reads it (every object read back)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, root = remote_fs(self.url, storage_options)
        self.root = root.rstrip("/")

    def objects(self, key: str) -> dict[str, int]:
        """The objects under the prefix ``key`` (full key -> size in bytes)."""
        self.fs.invalidate_cache(key)
        try:
            listing = self.fs.find(key, detail=True)
        except FileNotFoundError:
            return {}
        return {k: int(v["size"]) for k, v in listing.items() if v.get("type") != "directory"}

    def check(self, log: str, rel: str, expected: Any) -> FileCheck:
        key = _remote_key(self.root, rel)
        if key is None:
            return FileCheck(rel, log, UNSAFE, str(expected))
        if not isinstance(expected, str) or not expected.startswith("sha256:"):
            return FileCheck(rel, log, UNRECORDED, str(expected))
        try:
            self.fs.invalidate_cache(key)
            try:
                info = self.fs.info(key)
            except FileNotFoundError:
                info = {"type": "directory"}
            if info.get("type") != "directory":
                actual = sha256_object(self.fs, key, int(info["size"]))
                tree = None
            else:
                tree = self.objects(key)
                if not tree:
                    return FileCheck(rel, log, MISSING, expected)
                actual = tree_digest(
                    {k[len(key) + 1 :]: sha256_object(self.fs, k, size) for k, size in sorted(tree.items())}
                )
        except FileNotFoundError:  # removed while it was read
            return FileCheck(rel, log, MISSING, expected)
        except OSError as exc:
            return FileCheck(rel, log, MISSING, expected, details=[f"unreadable: {exc}"])
        if actual == expected:
            return FileCheck(rel, log, OK, expected, actual)
        details = self.zarr_details(key, rel, tree) if tree is not None else []
        return FileCheck(rel, log, DIFFERS, expected, actual, details)

    def zarr_details(self, key: str, rel: str, found: dict[str, int]) -> list[str]:
        """What a differing remote label group lacks or holds extra, by its own metadata (best effort)."""
        from driveengine.store.occ import OccFormatError, open_occ

        url = join_location(self.url, rel)
        try:
            occ = open_occ(url, storage_options=self.storage_options)
        except OccFormatError as exc:
            return [f"unreadable group: {exc}"]
        except OSError as exc:
            return [f"unreadable group: {url} ({exc})"]

        def key_of(shard_url: str) -> str:
            return f"{key}/{shard_url[len(url.rstrip('/')) + 1 :]}"

        expected = {f"{key}/zarr.json"}
        details = []
        for name in occ.coordinate_arrays:
            expected.add(f"{key}/{name}/zarr.json")
            if occ.array(name).shape[0]:
                expected.add(key_of(occ.shard_file(name, 0)))
        for name in occ.arrays:
            array = occ.array(name)
            per_shard = int(array.shards[0]) if array.shards else 1
            expected.add(f"{key}/{name}/zarr.json")
            for shard in range(-(-occ.num_frames // per_shard)):
                shard_key = key_of(occ.shard_file(name, shard))
                expected.add(shard_key)
                if shard_key not in found:
                    last = min((shard + 1) * per_shard, occ.num_frames) - 1
                    details.append(
                        f"missing: {rel}/{shard_key[len(key) + 1 :]} ({name} frames {shard * per_shard}..{last})"
                    )
        extra = sorted(set(found) - expected)
        details += [
            f"not part of a DriveEngine label group: {posixpath.join(rel, k[len(key) + 1 :])}" for k in extra
        ]
        return details


def verify_split(
    split_dir: str | os.PathLike[str],
    *,
    workers: int = 4,
    on_file: Callable[[FileCheck], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SplitCheck:
    """Re-hash every committed file of a collected split against its manifest's sha256s.

    Args:
        split_dir: a collected split ``OUT/<split>`` (holds ``manifest.json``): a folder, or an fsspec URL
            (``s3://bucket/prefix/<split>``: every object is read back from the store).
        workers: files hashed in parallel (threads; hashing and object reads release the GIL).
        on_file: called with each result as it is ready (progress).
        storage_options: options of a URL's file system (default: fsspec's configuration and the
            environment, e.g. ``FSSPEC_S3_ENDPOINT_URL``).

    Returns:
        One :class:`FileCheck` per file the manifest names (its ``checksums``, plus ``meta``/``occ`` that
        have no checksum recorded), in log then path order.

    Raises:
        ManifestError: the manifest is missing or unreadable (or fsspec has no file system for the URL).
    """
    check: Callable[[str, str, Any], FileCheck]
    if is_remote(split_dir):
        location: str | Path = os.fspath(split_dir).rstrip("/")
        manifest = load_manifest(location, storage_options)
        remote = _RemoteSplit(location, storage_options)
        check = remote.check
    else:
        location = local_path(split_dir)
        manifest = load_manifest(location)
        check = functools.partial(_check_one, location)
    todo: list[tuple[str, str, Any]] = []
    for log in sorted(manifest.logs):
        entry = manifest.logs[log]
        checksums = entry.checksums
        paths = sorted({*checksums, *(p for p in (entry.meta, entry.occ) if p)})
        todo += [(log, rel, checksums.get(rel)) for rel in paths]
    results: list[FileCheck] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(lambda item: check(*item), todo):
            results.append(result)
            if on_file is not None:
                on_file(result)
    return SplitCheck(str(location), len(manifest.logs), results)
