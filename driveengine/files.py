"""Atomic file writes: a reader of the target sees the old file or the whole new one, never a part.

The files that replace an earlier version of themselves — manifests, pickles, download records,
checkpoints, exported labels and backbones, the filter cache — go through :func:`atomic_path` (or
:func:`atomic_write_bytes`). (Collect's shards and label groups have their own commit,
:mod:`driveengine.store.commit`; downloads resume from ``.part`` files.) The data goes to a temporary
sibling ``.<name>.<12 hex>.tmp``: random, so concurrent writers never share one; hidden from ``ls``; and
never what a reader looks for, as readers list their own names. It is renamed onto the target when the
write succeeded and removed when it failed (any exception, Ctrl-C included); a killed writer leaves it
behind, and :data:`ATOMIC_TMP_RE` recognises it (collect and ``pretrain`` remove such leftovers in the
folders they own, :func:`remove_stale_temporaries`). ``durable=True`` also fsyncs the file before the
rename (an error there fails the write: the target is kept) and its folder after it, so a power cut
keeps the old file or the new one: for records other runs rely on (manifests, checkpoints, download
state). Outputs that a rerun rebuilds (exports, caches) skip the fsyncs.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: Names of :func:`atomic_path`'s temporaries: ``.<name>.<12 hex>.tmp``.
ATOMIC_TMP_RE = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it survive a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a written file's data to disk (errors propagate: the data may not be there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_atomic_temporary(name: str) -> bool:
    return ATOMIC_TMP_RE.fullmatch(name) is not None


def remove_stale_temporaries(
    folder: str | os.PathLike[str],
    is_temporary: Callable[[str], bool] = _is_atomic_temporary,
    folders: bool = False,
) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder`` (not below); returns them. Only for a
    folder one process writes at a time (a live writer's temporary looks the same).

    Args:
        folder: where to look (a missing folder has none).
        is_temporary: which names are temporaries (default: :func:`atomic_path`'s).
        folders: also remove folders of such names, with their contents (default: files only).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not is_temporary(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            if not folders:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it onto ``path`` when the block ends
    normally, remove it when the block raises (the error propagates).

    Args:
        path: the target; its folder is created.
        durable: fsync the written file before the rename and the folder after it (module doc).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
        if durable:  # an error here (EIO, ENOSPC) fails the write; the target keeps its old content
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); the file's mode follows the umask."""
    with atomic_path(path, durable=durable) as tmp:
        # O_EXCL: the random name is ours alone; 0o666 lets the umask decide (mkstemp would force 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
