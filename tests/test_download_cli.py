"""``driveengine download`` end to end: a synthetic OpenScene release served over 127.0.0.1, downloaded
with the real CLI (typer's CliRunner), with injected network faults."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from download_server import FileServer, cached_release, write_release_json
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.download.errors import InsufficientSpaceError

LIDAR0 = "openscene-v1.1/openscene_sensor_mini_lidar/openscene_sensor_mini_lidar_0.tgz"
CAMERA0 = "openscene-v1.1/openscene_sensor_mini_camera/openscene_sensor_mini_camera_0.tgz"
CAMERA1 = "openscene-v1.1/openscene_sensor_mini_camera/openscene_sensor_mini_camera_1.tgz"
META = "openscene-v1.1/openscene_metadata_mini.tgz"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return cached_release(tmp_path_factory)


@pytest.fixture
def server(release):
    with FileServer(release["server"]) as srv:
        yield srv


def _download(server: FileServer, release: dict, out: Path, *extra: str):
    args = ["download", "--split", "mini", "--shards", "0-1", "--out", str(out), "--base-url", server.url]
    args += ["--release-json", str(release["release_json"]), "--backoff", "0.001", "--jobs", "3", *extra]
    return CliRunner().invoke(app, args)


def test_download_with_faults_resumes_extracts_and_is_idempotent(server, release, tmp_path) -> None:
    out = tmp_path / "data"
    server.add_faults(LIDAR0, "drop:3000")
    server.add_faults(CAMERA1, "500")
    result = _download(server, release, out)
    assert result.exit_code == 0, result.output
    assert "5 of 5 archives complete" in result.output
    # the dropped transfer resumed at the byte where the first response ended
    assert server.ranges(LIDAR0)[-1] == "bytes=3000-"
    # the OpenScene layout is there, archives are gone, every extracted file is traced to its archive
    rel = Path("openscene-v1.1")
    for log, blobs in release["blobs"].items():
        assert (out / rel / "meta_datas/mini" / f"{log}.pkl").is_file()
        for blob in blobs:
            assert (out / rel / "sensor_blobs/mini" / blob).is_file()
    assert not list(out.rglob("*.tgz")) and not list(out.rglob("*.part"))
    files_txt = (
        (out / ".driveengine/archives/openscene_sensor_mini_lidar_0.tgz.files.txt").read_text().split()
    )
    log0 = release["logs"][0]
    assert files_txt and all(
        f.startswith(f"openscene-v1.1/sensor_blobs/mini/{log0}/MergedPointCloud/") for f in files_txt
    )
    # checksums.md5 holds the MD5 of what was served
    sums = (out / ".driveengine/checksums.md5").read_text()
    served_md5 = hashlib.md5((release["server"] / LIDAR0).read_bytes()).hexdigest()
    assert f"{served_md5}  {LIDAR0}" in sums

    # the same command again: nothing to do, no request at all
    before = len(server.requests)
    again = _download(server, release, out)
    assert again.exit_code == 0, again.output
    assert "5 of 5 archives already downloaded and extracted" in again.output
    assert len(server.requests) == before


def test_failed_verification_redownloads_once_then_reports_and_exits_nonzero(
    server, release, tmp_path
) -> None:
    out = tmp_path / "data"
    md5 = tmp_path / "sums.md5"
    md5.write_text(
        f"{hashlib.md5((release['server'] / CAMERA0).read_bytes()).hexdigest()}  {CAMERA0}\n"
        f"{hashlib.md5((release['server'] / META).read_bytes()).hexdigest()} *{Path(META).name}\n"
    )
    server.add_faults(CAMERA0, "wrong-bytes", "wrong-bytes")
    result = _download(server, release, out, "--md5-file", str(md5))
    assert result.exit_code == 1, result.output
    assert "1 of 5 archives FAILED" in result.output
    assert f"{CAMERA0}: MD5 mismatch" in result.output
    assert "driveengine download --split mini" in result.output  # how to retry
    assert server.ranges(CAMERA0) == [None, None]  # downloaded twice from zero
    assert not (out / CAMERA0).exists() and not (out / (CAMERA0 + ".part")).exists()
    log0, log1 = release["logs"]
    blobs = out / "openscene-v1.1/sensor_blobs/mini"
    assert not (blobs / log0 / "CAM_F0").exists()  # nothing extracted from the failed archive
    assert (blobs / log1 / "CAM_F0").is_dir()  # the others are complete

    # the server is fixed: the same command finishes the job
    result = _download(server, release, out, "--md5-file", str(md5))
    assert result.exit_code == 0, result.output
    assert "4 of 5 archives already downloaded and extracted" in result.output


def test_corrupt_archive_without_checksum_is_downloaded_again(server, release, tmp_path) -> None:
    out = tmp_path / "data"
    server.add_faults(LIDAR0, "wrong-bytes")  # right size, garbage: only extraction can tell
    result = _download(server, release, out, "--modality", "lidar", "--shards", "0")
    assert result.exit_code == 0, result.output
    assert server.ranges(LIDAR0) == [None, None]
    assert (out / ".driveengine/archives/openscene_sensor_mini_lidar_0.tgz.extracted.json").is_file()


def test_keep_archives_and_no_extract(server, release, tmp_path) -> None:
    out = tmp_path / "data"
    result = _download(server, release, out, "--modality", "metadata", "--no-extract")
    assert result.exit_code == 0, result.output
    assert (out / META).read_bytes() == (release["server"] / META).read_bytes()
    assert not (out / "openscene-v1.1/meta_datas").exists()
    # md5sum -c accepts the recorded checksums
    check = subprocess.run(
        ["md5sum", "-c", ".driveengine/checksums.md5"], cwd=out, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # now extract the verified archive that is present, keeping it: no new request
    before = len(server.requests)
    result = _download(server, release, out, "--modality", "metadata", "--keep-archives")
    assert result.exit_code == 0, result.output
    assert len(server.requests) == before
    assert (out / META).is_file() and (out / "openscene-v1.1/meta_datas/mini").is_dir()


def test_dry_run_lists_files_and_sizes_and_downloads_nothing(server, release, tmp_path) -> None:
    out = tmp_path / "data"
    result = _download(server, release, out, "--dry-run")
    assert result.exit_code == 0, result.output
    total = (
        sum((release["server"] / n).stat().st_size for n in (META, LIDAR0, CAMERA0, CAMERA1))
        + (release["server"] / LIDAR0.replace("_0.tgz", "_1.tgz")).stat().st_size
    )
    assert "5 files, total" in result.output
    assert CAMERA1 in result.output and "needed on disk" in result.output
    assert not out.exists() or not any(out.rglob("*.tgz*"))
    assert all(r == "bytes=0-0" for _, r in server.requests)  # only size probes
    assert total > 0


def test_not_enough_disk_space_is_refused_before_any_byte(server, release, tmp_path, monkeypatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(
        "driveengine.download.download.shutil.disk_usage", lambda p: real(p)._replace(free=1000)
    )
    result = _download(server, release, tmp_path / "data")
    assert isinstance(result.exception, InsufficientSpaceError)
    message = str(result.exception)
    assert str(tmp_path) in message and "need" in message and "1,000 bytes" in message
    assert all(r == "bytes=0-0" for _, r in server.requests)


def test_unknown_shard_and_dead_mirror(server, tmp_path) -> None:
    result = CliRunner().invoke(
        app, ["download", "--split", "mini", "--shards", "40", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "0-31" in str(result.exception)
    # a base URL that has none of the files: every archive fails with the HTTP status, exit 1
    result = CliRunner().invoke(
        app,
        [
            "download",
            "--split",
            "mini",
            "--modality",
            "lidar",
            "--shards",
            "5",
            "--out",
            str(tmp_path / "d"),
            "--base-url",
            server.url + "nowhere/",
            "--backoff",
            "0.001",
        ],
    )
    assert result.exit_code == 1
    assert "404" in result.output


def test_ctrl_c_keeps_part_files_says_how_to_continue_and_the_same_command_resumes(tmp_path) -> None:
    import os
    import signal
    import sys
    import time

    srv = tmp_path / "srv"
    (srv / "openscene-v1.1").mkdir(parents=True)
    payload = os.urandom(3 << 20)
    (srv / META).write_bytes(payload)
    out = tmp_path / "data"
    manifest = write_release_json(tmp_path / "release.json", "mini", {"metadata": len(payload)})
    cmd = [sys.executable, "-m", "driveengine.cli", "download", "--split", "mini", "--modality", "metadata"]
    cmd += ["--out", str(out), "--no-extract", "--backoff", "0.001", "--release-json", str(manifest)]
    with FileServer(srv) as server:
        server.add_faults(META, "slow")
        proc = subprocess.Popen(  # SIGINT as at a terminal, even where the tests run with it ignored
            [*cmd, "--base-url", server.url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        part = out / (META + ".part")
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, output
        assert "to continue, run the same command again" in output
        assert "driveengine download --split mini --modality metadata" in output
        size = part.stat().st_size
        assert 0 < size < len(payload) and part.read_bytes() == payload[:size]
        assert not (out / META).exists()

        again = subprocess.run([*cmd, "--base-url", server.url], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert server.ranges(META)[-1] == f"bytes={size}-"
    assert (out / META).read_bytes() == payload
