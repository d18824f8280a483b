"""Atomic file writes (driveengine/files.py): the target is the old file or the whole new one, always.

Failures are real: an exception and Ctrl-C inside the block, and a writer process killed with SIGKILL
in the middle of its write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from driveengine import files
from driveengine.store.commit import is_temporary


def test_write_replaces_the_file_whole_with_the_umasks_mode(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "folder" / "record.json"
    files.atomic_write_bytes(target, b"old")
    old_umask = os.umask(0o027)
    try:
        files.atomic_write_bytes(target, b"new contents")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new contents"
    assert target.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]


@pytest.mark.parametrize(
    "error", [ValueError("the writer failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "labels.npy"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise error
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.npy"]


def test_a_writer_killed_mid_write_leaves_the_old_file_and_a_recognised_leftover(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    script = (
        "import os, signal, sys\n"
        "from driveengine.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'part of the new')\n"
        "        f.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "manifest.json"]
    assert len(leftovers) == 1 and files.ATOMIC_TMP_RE.fullmatch(leftovers[0]), leftovers
    assert is_temporary(leftovers[0])  # what collect's clean-up removes


@pytest.mark.parametrize("durable", [True, False])
def test_durable_writes_fsync_the_file_and_its_folder(tmp_path: Path, monkeypatch, durable: bool) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "last.pt"
    files.atomic_write_bytes(target, b"checkpoint", durable=durable)
    assert target.read_bytes() == b"checkpoint"
    if durable:  # the temporary file (before its rename), then the folder
        assert len(synced) == 2 and files.ATOMIC_TMP_RE.fullmatch(Path(synced[0]).name), synced
        assert synced[1] == str(tmp_path)
    else:
        assert synced == []


def test_a_failed_fsync_or_rename_keeps_the_old_file_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """A durable write whose fsync fails (EIO, ENOSPC) fails, before the rename; a rename that fails (the
    target is a folder) removes the temporary."""
    import errno

    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        files.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    files.atomic_write_bytes(target, b"new", durable=False)  # no fsync asked: written
    assert target.read_bytes() == b"new"
    monkeypatch.undo()

    folder = tmp_path / "a_folder"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        files.atomic_write_bytes(folder, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "manifest.json"]


def test_remove_stale_temporaries_removes_only_atomic_leftovers(tmp_path: Path) -> None:
    leftovers = [tmp_path / ".last.pt.0123456789ab.tmp", tmp_path / ".config.json.abcdef012345.tmp"]
    kept = [
        tmp_path / "last.pt",
        tmp_path / ".last.pt.tmp",
        tmp_path / "x.0123456789ab.tmp",
        tmp_path / ".hidden",
    ]
    for p in leftovers + kept:
        p.write_bytes(b"x")
    (tmp_path / ".dir.0123456789ab.tmp").mkdir()  # a folder of that name is not ours
    assert sorted(files.remove_stale_temporaries(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in kept] + [".dir.0123456789ab.tmp"]
    )
    assert files.remove_stale_temporaries(tmp_path / "missing") == []
