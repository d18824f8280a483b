"""Per-log atomic commit of a split folder, and the lock that keeps one ``collect`` per output.

Protocol (DESIGN §3), for one log:

1. the worker writes ``meta/.<log>.parquet.tmp-<host>-<pid>-<rand>`` (and ``occ/.<log>.zarr.tmp-...``):
   names starting with ``.`` and containing ``.tmp-`` are temporaries, invisible to readers;
2. :func:`commit_log_files` fsyncs every file, computes its sha256, renames it into place
   (``meta/<log>.parquet``, ``occ/<log>.zarr``) and fsyncs the folders;
3. the client (the only process that owns ``manifest.json``) records the entry with
   :func:`~driveengine.store.manifest.save_manifest`. The manifest entry is the commit point.

A crash at any step leaves either temporaries (removed by :func:`clean_stale_temporaries` at the next
start, under the lock; the manifest's own ``.manifest.json.<hex>.tmp`` included) or renamed files
without a manifest entry (redone by the next run).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from driveengine.errors import DriveEngineError
from driveengine.store.manifest import ATOMIC_TMP_RE, LogEntry, fsync_dir

LOCK_NAME = ".collect.lock"
TMP_MARK = ".tmp-"
META_DIR = "meta"
OCC_DIR = "occ"


class CollectLockedError(DriveEngineError):
    """Another ``collect`` is writing to the same output folder."""


class CommitError(DriveEngineError):
    """A log's files could not be committed."""


def meta_relpath(log_name: str) -> str:
    """``meta/<log>.parquet``, relative to the split folder."""
    return f"{META_DIR}/{log_name}.parquet"


def occ_relpath(log_name: str) -> str:
    """``occ/<log>.zarr``, relative to the split folder."""
    return f"{OCC_DIR}/{log_name}.zarr"


def temporary_path(final: Path) -> Path:
    """A unique temporary sibling of ``final`` (``.<name>.tmp-<host>-<pid>-<rand>``), invisible to readers."""
    return (
        final.parent / f".{final.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`temporary_path`'s or an atomic write's (``.<name>.<hex>.tmp``)."""
    return name.startswith(".") and (TMP_MARK in name or ATOMIC_TMP_RE.fullmatch(name) is not None)


class CollectLock:
    """An exclusive ``fcntl.flock`` on ``<split_dir>/.collect.lock`` holding ``{"pid", "host"}``.

    Use as a context manager. The lock dies with the process (kill -9 included), so a crashed run
    never blocks the next one.

    Raises:
        CollectLockedError: another process holds the lock (its pid and host are in the message).
    """

    def __init__(self, split_dir: str | os.PathLike[str]) -> None:
        self.path = Path(split_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise CollectLockedError(
                f"{self.path.parent}: another `driveengine collect` is writing here "
                f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}); wait for it to finish, "
                "or stop it and run again (finished logs are kept)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CollectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_stale_temporaries(split_dir: str | os.PathLike[str]) -> list[str]:
    """Remove the temporaries of crashed runs in ``meta/`` and ``occ/``; call only under :class:`CollectLock`.

    Returns:
        The removed paths, relative to ``split_dir``.
    """
    split_dir = Path(split_dir)
    removed = []
    for sub in (META_DIR, OCC_DIR, "."):
        folder = split_dir / sub
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if not is_temporary(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed.append(os.path.relpath(entry.path, split_dir))
    return sorted(removed)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """``"sha256:<hex>"`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def sha256_tree(root: str | os.PathLike[str]) -> str:
    """``"sha256:<hex>"`` of a folder: the hash of the sorted lines ``<relative path> <sha256 of the file>``."""
    root = Path(root)
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        lines.append(f"{path.relative_to(root).as_posix()} {sha256_file(path)}\n")
    return f"sha256:{hashlib.sha256(''.join(lines).encode()).hexdigest()}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing folder at ``final`` is first moved aside and removed."""
    if final.is_dir() and not final.is_symlink():
        aside = temporary_path(final)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


def commit_log_files(
    split_dir: str | os.PathLike[str], files: dict[str, Path], may_commit: Callable[[], bool] | None = None
) -> dict[str, str]:
    """fsync, checksum and rename a log's temporaries into place (steps 2 of the protocol).

    Args:
        split_dir: the split folder.
        files: final path relative to ``split_dir`` (e.g. ``"meta/<log>.parquet"``) -> its temporary
            (a file, or a folder such as a Zarr store).
        may_commit: asked right before the renames; False (the collect process that owns the run is
            gone) leaves the temporaries and raises instead.

    Returns:
        Final relative path -> ``"sha256:<hex>"`` (a folder's is :func:`sha256_tree`).

    Raises:
        CommitError: a temporary is missing, or ``may_commit`` said no.
    """
    split_dir = Path(split_dir)
    checksums: dict[str, str] = {}
    for rel, tmp in sorted(files.items()):
        if not tmp.exists():
            raise CommitError(f"{tmp}: temporary output of {rel} vanished before its commit")
        if tmp.is_dir():
            _fsync_tree(tmp)
            checksums[rel] = sha256_tree(tmp)
        else:
            _fsync_file(tmp)
            checksums[rel] = sha256_file(tmp)
    if may_commit is not None and not may_commit():
        raise CommitError(
            f"{split_dir}: {', '.join(sorted(files))} not committed, the collect process is gone"
        )
    for rel, tmp in sorted(files.items()):
        final = split_dir / rel
        _replace(tmp, final)
        fsync_dir(final.parent)
    return checksums


def source_fingerprint(paths: list[Path]) -> str:
    """A fingerprint of input files and folders from their sizes and mtimes (not their bytes: cheap).

    A folder contributes its own mtime, which changes when files are added to or removed from it.
    Missing paths contribute ``missing``.
    """
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size if not Path(path).is_dir() else 0}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:32]


def config_hash(config: dict[str, Any]) -> str:
    """Hash of every setting that changes a log's output (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_files_present(split_dir: str | os.PathLike[str], entry: LogEntry) -> bool:
    """Whether every file a manifest entry names exists (cheap check used to decide a skip)."""
    split_dir = Path(split_dir)
    return all((split_dir / rel).exists() for rel in entry.checksums)
