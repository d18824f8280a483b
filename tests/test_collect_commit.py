"""Per-log atomic commit, the collect lock (driveengine.store.commit) and manifest validation, on real files and processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from driveengine.store.commit import (
    CollectLock,
    CollectLockedError,
    CommitError,
    clean_stale_temporaries,
    commit_log_files,
    config_hash,
    is_temporary,
    sha256_file,
    sha256_tree,
    source_fingerprint,
    temporary_path,
)
from driveengine.store.manifest import Manifest, ManifestError, load_manifest, save_manifest

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


def test_manifest_temporaries_of_a_crash_are_cleaned_at_the_next_start(tmp_path: Path) -> None:
    save_manifest(tmp_path, Manifest(split="mini"))
    stale = tmp_path / ".manifest.json.0123456789ab.tmp"  # what atomic_write_bytes leaves when killed
    stale.write_bytes(b'{"half": ')
    keep = tmp_path / ".manifest.json.notes"
    keep.write_bytes(b"x")
    assert clean_stale_temporaries(tmp_path) == [stale.name]
    assert not stale.exists() and keep.exists() and (tmp_path / "manifest.json").exists()


def _manifest_with(tmp_path: Path, entry: object, **top: object) -> Path:
    data = Manifest(split="mini").to_json()
    data["logs"] = {"log-a": entry}
    data.update(top)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path / "manifest.json"


GOOD_ENTRY = {
    "frames": 3,
    "meta": "meta/log-a.parquet",
    "occ": "occ/log-a.zarr",
    "checksums": {"meta/log-a.parquet": "sha256:00"},
    "source": {"kind": "nuplan", "path": "/data/log-a.db", "fingerprint": "f"},
    "dropped": {"missing_lidar": 1},
}


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"frames": "forty"}, "logs['log-a'].frames", "a non-negative integer"),
        ({"frames": -1}, "logs['log-a'].frames", "a non-negative integer"),
        ({"frames": True}, "logs['log-a'].frames", "a non-negative integer"),
        ({"meta": 7}, "logs['log-a'].meta", "a path relative to the split folder"),
        (
            {"checksums": {"meta/log-a.parquet": 12}},
            "logs['log-a'].checksums['meta/log-a.parquet']",
            "a string",
        ),
        ({"checksums": ["meta/log-a.parquet"]}, "logs['log-a'].checksums", "an object"),
        ({"source": "nuplan"}, "logs['log-a'].source", "an object"),
        ({"dropped": {"missing_lidar": "1"}}, "logs['log-a'].dropped['missing_lidar']", "an integer"),
    ],
)
def test_wrong_typed_manifest_fields_name_the_file_and_the_field(
    tmp_path: Path, change: dict, field: str, message: str
) -> None:
    path = _manifest_with(tmp_path, {**GOOD_ENTRY, **change})
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    assert str(err.value).startswith(f"{path}: {field} must be {message}, got ")


@pytest.mark.parametrize(
    ("top", "field"),
    [
        ({"logs": []}, "logs"),
        ({"split": 3}, "split"),
        ({"grid": "big"}, "grid"),
        ({"classes": [1]}, "classes"),
    ],
)
def test_wrong_typed_top_level_fields_name_the_field(tmp_path: Path, top: dict, field: str) -> None:
    path = _manifest_with(tmp_path, GOOD_ENTRY)
    data = json.loads(path.read_text())
    data.update(top)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(path))}: {field} must be "):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"logs\['log-a'\] must be an object"):
        Manifest.from_json({**Manifest(split="x").to_json(), "logs": {"log-a": [1]}}, path)


@pytest.mark.parametrize(
    "change",
    [
        {"meta": "../../etc/passwd"},
        {"meta": "/etc/passwd"},
        {"occ": "occ/../../../outside.zarr"},
        {"meta": "meta\\..\\..\\x.parquet"},
        {"checksums": {"../../etc/shadow": "sha256:00"}},
        {"meta": ""},
    ],
)
def test_manifest_paths_are_confined_to_the_split_folder(tmp_path: Path, change: dict) -> None:
    (tmp_path / "split").mkdir()
    _manifest_with(tmp_path / "split", {**GOOD_ENTRY, **change})
    with pytest.raises(ManifestError, match="must be a path inside the split folder"):
        load_manifest(tmp_path / "split")


def test_manifest_log_names_are_plain_file_names(tmp_path: Path) -> None:
    data = Manifest(split="mini").to_json()
    data["logs"] = {"../../evil": GOOD_ENTRY}
    with pytest.raises(ManifestError, match="a log name must be a plain file name"):
        Manifest.from_json(data, tmp_path / "manifest.json")
    data["logs"] = {"log-a": GOOD_ENTRY, "log-b": {**GOOD_ENTRY, "occ": None}}
    assert sorted(Manifest.from_json(data, tmp_path / "manifest.json").logs) == ["log-a", "log-b"]


def test_a_commit_refused_by_may_commit_renames_nothing(tmp_path: Path) -> None:
    final = tmp_path / "meta" / "log.parquet"
    final.parent.mkdir()
    tmp = temporary_path(final)
    tmp.write_bytes(b"rows")
    with pytest.raises(CommitError, match="not committed, the collect process is gone"):
        commit_log_files(tmp_path, {"meta/log.parquet": tmp}, may_commit=lambda: False)
    assert tmp.exists() and not final.exists()
    commit_log_files(tmp_path, {"meta/log.parquet": tmp}, may_commit=lambda: True)
    assert final.read_bytes() == b"rows"
