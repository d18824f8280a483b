"""Per-log atomic commit and the collect lock (driveengine.store.commit) on real files and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from driveengine.store.commit import (
    CollectLock,
    CollectLockedError,
    clean_stale_temporaries,
    commit_log_files,
    config_hash,
    is_temporary,
    sha256_file,
    sha256_tree,
    source_fingerprint,
    temporary_path,
)

HOLD_LOCK = """
import sys, time
from driveengine.store.commit import CollectLock
lock = CollectLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(60)
"""


def test_lock_names_the_holder_and_dies_with_it(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CollectLockedError, match=f"pid {proc.pid} on host"):
            CollectLock(tmp_path).acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with CollectLock(tmp_path):  # a killed holder leaves no stale lock
        pass


def test_commit_renames_into_place_with_checksums(tmp_path: Path) -> None:
    final_meta = tmp_path / "meta" / "log.parquet"
    final_meta.parent.mkdir()
    tmp_meta = temporary_path(final_meta)
    tmp_meta.write_bytes(b"rows")
    old_occ = tmp_path / "occ" / "log.zarr"
    (old_occ / "a").mkdir(parents=True)
    (old_occ / "a" / "old").write_bytes(b"old")
    tmp_occ = temporary_path(old_occ)
    (tmp_occ / "b").mkdir(parents=True)
    (tmp_occ / "b" / "new").write_bytes(b"new")
    assert is_temporary(tmp_meta.name) and is_temporary(tmp_occ.name) and not is_temporary(final_meta.name)
    expected_tree = sha256_tree(tmp_occ)
    sums = commit_log_files(tmp_path, {"meta/log.parquet": tmp_meta, "occ/log.zarr": tmp_occ})
    assert final_meta.read_bytes() == b"rows" and not tmp_meta.exists()
    assert sorted(p.relative_to(old_occ).as_posix() for p in old_occ.rglob("*")) == ["b", "b/new"]  # replaced
    assert sums == {"meta/log.parquet": sha256_file(final_meta), "occ/log.zarr": expected_tree}
    assert sums["occ/log.zarr"] == sha256_tree(old_occ)
    assert not [p for p in tmp_path.rglob("*") if is_temporary(p.name)]


def test_stale_temporaries_are_cleaned_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    (tmp_path / "occ" / "log.zarr").mkdir(parents=True)
    keep = [tmp_path / "meta" / "log.parquet", tmp_path / "meta" / ".hidden_but_not_tmp"]
    for p in keep:
        p.write_bytes(b"x")
    stale_file = temporary_path(tmp_path / "meta" / "other.parquet")
    stale_file.write_bytes(b"half")
    stale_dir = temporary_path(tmp_path / "occ" / "other.zarr")
    (stale_dir / "c").mkdir(parents=True)
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(os.path.relpath(p, tmp_path) for p in (stale_file, stale_dir))
    assert all(p.exists() for p in keep) and (tmp_path / "occ" / "log.zarr").is_dir()
    assert not stale_file.exists() and not stale_dir.exists()


def test_fingerprint_follows_sizes_and_mtimes_and_config_hash_is_order_free(tmp_path: Path) -> None:
    db, blobs = tmp_path / "log.db", tmp_path / "blobs"
    db.write_bytes(b"1")
    blobs.mkdir()
    first = source_fingerprint([db, blobs])
    assert source_fingerprint([db, blobs]) == first
    time.sleep(0.01)
    (blobs / "new.pcd").write_bytes(b"")  # a blob appears: the folder's mtime changes
    second = source_fingerprint([db, blobs])
    assert second != first
    db.write_bytes(b"12")
    assert source_fingerprint([db, blobs]) != second
    assert source_fingerprint([tmp_path / "missing"]) != source_fingerprint([db])
    assert (
        config_hash({"a": 1, "b": [1, 2]})
        == config_hash({"b": [1, 2], "a": 1})
        != config_hash({"a": 2, "b": [1, 2]})
    )
