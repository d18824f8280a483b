"""Atomic file writes: a reader of the target sees the old file or the whole new one, never a part.

Every file DriveEngine writes in place of another goes through :func:`atomic_path` (or
:func:`atomic_write_bytes`): the data goes to a temporary sibling ``.<name>.<12 hex>.tmp`` (random, so
concurrent writers never share one; a leading dot, so listings skip it; :data:`ATOMIC_TMP_RE` recognises
the leftovers of a killed writer), which is renamed onto the target when the write succeeded and removed
when it failed (any exception, Ctrl-C included). ``durable=True`` also fsyncs the file before the rename
and its folder after it, so a power cut keeps the old file or the new one: for records other runs rely
on (manifests, checkpoints, download state). Outputs that a rerun rebuilds (exports, caches) skip the
fsyncs.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Names of :func:`atomic_path`'s temporaries: ``.<name>.<12 hex>.tmp``.
ATOMIC_TMP_RE = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it survive a crash (no-op where unsupported)."""
    _fsync(path)


def _fsync(path: str | os.PathLike[str]) -> None:
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
        if durable:
            _fsync(tmp)
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
