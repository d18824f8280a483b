"""``driveengine verify``: a downloaded synthetic release is complete; deleted or damaged blobs are found,
named with the archive that holds them, and the printed command repairs them."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
from download_server import FileServer, cached_release
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.download.verify import check_jpeg, load_shard_map, verify_release

LIDAR1 = "openscene-v1.1/openscene_sensor_mini_lidar/openscene_sensor_mini_lidar_1.tgz"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return cached_release(tmp_path_factory)


@pytest.fixture(scope="module")
def downloaded(release, tmp_path_factory):
    """The release downloaded once (archives kept) into a pristine folder; tests work on copies."""
    out = tmp_path_factory.mktemp("downloaded") / "data"
    with FileServer(release["server"]) as server:
        args = ["download", "--split", "mini", "--shards", "0-1", "--out", str(out), "--base-url", server.url]
        args += ["--release-json", str(release["release_json"])]  # the synthetic release's sizes
        result = CliRunner().invoke(app, [*args, "--keep-archives"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def data(downloaded, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(downloaded, out, symlinks=True)
    return out


def _verify(root: Path, *extra: str):
    return CliRunner().invoke(app, ["verify", str(root), "--split", "mini", *extra])


def test_complete_download_verifies(data, release) -> None:
    result = _verify(data)
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    report = verify_release(data, "mini")
    assert report.ok
    assert report.metadata_files == len(release["logs"])
    assert report.blobs == sum(len(b) for b in release["blobs"].values())
    # the kept archives were re-hashed against their download records
    assert len(report.archives) == 5 and all(a.ok and "download record" in a.detail for a in report.archives)


def test_deleted_blob_is_named_with_its_archive_and_the_fix_command_works(data, release) -> None:
    log1 = release["logs"][1]
    victim = next(b for b in release["blobs"][log1] if b.endswith(".pcd"))
    (data / "openscene-v1.1/sensor_blobs/mini" / victim).unlink()

    result = _verify(data)
    assert result.exit_code == 1
    assert f"{victim}: missing; in {LIDAR1} (recorded)" in result.output
    assert f"{log1}: 1 missing, 0 unreadable" in result.output
    fix = f"driveengine download --split mini --modality lidar --shards 1 --out {data}"
    assert fix in result.output

    report = json.loads(_verify(data, "--json").output)
    assert report["ok"] is False
    assert [(p["path"], p["archive"], p["shard"]) for p in report["problems"]] == [(victim, LIDAR1, 1)]

    # run the printed command (against the loopback mirror): the blob comes back, verify passes
    with FileServer(release["server"]) as server:
        args = [*shlex.split(fix)[1:], "--base-url", server.url]
        repaired = CliRunner().invoke(app, args)
        assert repaired.exit_code == 0, repaired.output
        assert server.ranges(LIDAR1) == []  # the archive was still on disk (kept, verified): no download
    assert (data / "openscene-v1.1/sensor_blobs/mini" / victim).is_file()
    assert _verify(data).exit_code == 0


def test_truncated_and_corrupt_blobs_are_unreadable(data, release) -> None:
    log0 = release["logs"][0]
    jpg = next(b for b in release["blobs"][log0] if b.endswith(".jpg"))
    pcd = next(b for b in release["blobs"][log0] if b.endswith(".pcd"))
    blobs = data / "openscene-v1.1/sensor_blobs/mini"
    raw = (blobs / jpg).read_bytes()
    os.unlink(blobs / jpg)  # break the hard link before writing
    (blobs / jpg).write_bytes(raw[: len(raw) // 2])
    raw = (blobs / pcd).read_bytes()
    os.unlink(blobs / pcd)
    (blobs / pcd).write_bytes(raw[: len(raw) - 100])
    report = verify_release(data, "mini")
    problems = {p.path: p.problem for p in report.problems}
    assert "truncated JPEG" in problems[jpg]
    assert "truncated" in problems[pcd]
    assert not report.ok
    # presence-only mode does not open the files
    assert verify_release(data, "mini", check_content=False, check_archives=False).ok


def test_shard_map_names_the_archive_when_nothing_was_recorded(data, release, tmp_path) -> None:
    shutil.rmtree(data / ".driveengine")
    for tgz in data.rglob("*.tgz"):
        tgz.unlink()
    log0, log1 = release["logs"]
    victim = next(b for b in release["blobs"][log0] if b.endswith(".jpg"))
    (data / "openscene-v1.1/sensor_blobs/mini" / victim).unlink()
    report = verify_release(data, "mini")
    assert report.problems[0].archive is None and report.problems[0].attribution == "unknown"
    assert "shard unknown" in report.fixes[0]

    shard_map = tmp_path / "map.json"
    shard_map.write_text(json.dumps({"0": [log0], "1": [log1]}))
    assert load_shard_map(shard_map) == {log0: 0, log1: 1}
    result = _verify(data, "--shard-map", str(shard_map))
    assert result.exit_code == 1
    assert "openscene_sensor_mini_camera_0.tgz (shard-map)" in result.output
    assert "--modality camera --shards 0" in result.output


def test_corrupt_archive_on_disk_is_reported(data) -> None:
    archive = data / LIDAR1
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    os.unlink(archive)
    archive.write_bytes(bytes(raw))
    report = verify_release(data, "mini")
    bad = [a for a in report.archives if not a.ok]
    assert [a.name for a in bad] == [LIDAR1] and "download record" in bad[0].detail
    assert any("--modality lidar --shards 1" in f for f in report.fixes)


def test_malicious_metadata_pickle_is_refused_without_running_it(data, tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    meta = data / "openscene-v1.1/meta_datas/mini/evil.pkl"
    meta.write_bytes(pickle.dumps([{"lidar_path": "x.pcd", "cams": {}, "payload": Evil()}]))
    result = _verify(data)
    assert result.exit_code == 1
    assert "METADATA" in result.output and "evil.pkl" in result.output
    assert not marker.exists()


def test_missing_metadata_says_what_to_download(tmp_path) -> None:
    result = _verify(tmp_path)
    assert result.exit_code == 1
    assert "--modality metadata" in result.output


def test_jpeg_check(tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(path, format="JPEG")
    assert check_jpeg(path) is None
    path.write_bytes(b"\x89PNG" + b"0" * 100)
    assert "SOI" in check_jpeg(path)
