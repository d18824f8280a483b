"""``driveengine download`` against hostile or broken mirrors, each served over 127.0.0.1 and downloaded by
a real ``driveengine`` process (bounded by a timeout): archives that escape the output folder, forge
DriveEngine's records or expand without end, files of the wrong size, servers that trickle, answer
late or not at all, and the Hugging Face mirror's ``HF_ENDPOINT`` / ``HF_TOKEN``."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from download_server import FileServer, cached_release, symlink_chain_escape_tar

CAMERA0 = "openscene-v1.1/openscene_sensor_mini_camera/openscene_sensor_mini_camera_0.tgz"
CAMERA1 = "openscene-v1.1/openscene_sensor_mini_camera/openscene_sensor_mini_camera_1.tgz"
META = "openscene-v1.1/openscene_metadata_mini.tgz"
HF_PREFIX = "datasets/OpenDriveLab/OpenScene/resolve/main/"  # the mirror's path under HF_ENDPOINT


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return cached_release(tmp_path_factory)


def _download(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run ``driveengine download ARGS`` in its own process; returns ``(exit status, stdout + stderr)``."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_TOKEN")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "driveengine.cli", "download", "--split", "mini", "--backoff", "0.001", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _entries(folder: Path) -> set[str]:
    """Every path under ``folder`` (links not followed), relative, '/'-separated."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            out.add((Path(dirpath) / name).relative_to(folder).as_posix())
    return out


def _only_records_left(out: Path, archive: str) -> None:
    """``out`` holds DriveEngine's records, the (empty) folder the ``archive`` was downloaded to, and
    nothing of any archive: no file, no link, no folder of its contents."""
    download_folders = {p.as_posix() for p in Path(archive).parents if p != Path(".")}
    leftovers = {p for p in _entries(out) if not p.startswith(".driveengine")} - download_folders
    assert leftovers == set(), leftovers
    assert not any((out / p).is_symlink() for p in _entries(out))
    assert not any((out / ".driveengine/staging").iterdir())
    records = {p.name for p in (out / ".driveengine/archives").iterdir()}
    assert records == {f"{Path(archive).name}.download.json"}  # no extraction marker, no file list


def _failure_lines(output: str, name: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"  {name}: ")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- archives ---------------------------------------------------------------------------------------


def test_symlink_chain_archive_from_a_mirror_writes_nothing_outside_and_leaves_nothing(tmp_path) -> None:
    """CVE-2025-4517 served as a camera shard: on Python 3.11.7 tarfile's ``data`` filter let it overwrite
    ``flag`` and create ``newfile`` next to the download folder, and half the archive stayed."""
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    flag = tmp_path / "a" / "flag"
    flag.write_text("original")
    srv = tmp_path / "srv"
    # aimed at the staging folder the archive is extracted into: 4 levels up from it is tmp/a
    dest = out / ".driveengine/staging" / Path(CAMERA0).name
    symlink_chain_escape_tar(srv / CAMERA0, dest, levels_up=4)
    with FileServer(srv) as server:
        code, output = _download(
            "--modality", "camera", "--shards", "0", "--out", str(out), "--base-url", server.url
        )
    assert flag.read_text() == "original"
    assert not (tmp_path / "a" / "newfile").exists()
    assert _entries(tmp_path / "a") - {"flag"} == {"out", *(f"out/{p}" for p in _entries(out))}
    _only_records_left(out, CAMERA0)
    assert not (out / CAMERA0).exists()  # the refused archive is not kept either
    assert code == 1, output
    [line] = _failure_lines(output, CAMERA0)
    assert "UnsafeArchiveError" in line and "symbolic link" in line and "(member 'a')" in line
    assert len(line) < 600, line  # not the 4 KB path the link chain expands to
    assert server.ranges(CAMERA0) == [None]  # refused for what it holds: not downloaded again


def test_forged_extraction_marker_is_refused_and_cannot_make_a_later_download_skip(release, tmp_path) -> None:
    srv = tmp_path / "srv"
    (srv / CAMERA1).parent.mkdir(parents=True)
    shutil.copy(release["server"] / CAMERA1, srv / CAMERA1)
    forged = ".driveengine/archives/openscene_sensor_mini_camera_1.tgz"
    _tgz(
        srv / CAMERA0,
        {
            "openscene-v1.1/sensor_blobs/mini/log/CAM_F0/x.jpg": b"jpeg",
            f"{forged}.files.txt": b"",
            f"{forged}.extracted.json": b'{"name": "forged", "files": 0, "bytes": 0, "md5": null}',
        },
    )
    out = tmp_path / "out"
    common = ["--modality", "camera", "--out", str(out)]
    with FileServer(srv) as server:
        code, output = _download(*common, "--shards", "0", "--base-url", server.url)
        assert code == 1, output
        [line] = _failure_lines(output, CAMERA0)
        assert ".driveengine/ is reserved" in line and f"{forged}.files.txt" in line
        _only_records_left(out, CAMERA0)
        assert not (out / f"{forged}.extracted.json").exists()

        code, output = _download(*common, "--shards", "1", "--base-url", server.url)
        assert code == 0, output
        assert server.ranges(CAMERA1) == [None]  # downloaded, not "skipped" on a forged marker
    log1 = release["logs"][1]
    assert any(
        b.endswith(".jpg") and (out / "openscene-v1.1/sensor_blobs/mini" / b).is_file()
        for b in release["blobs"][log1]
    )


def test_decompression_bomb_is_stopped_and_the_limit_is_configurable(tmp_path) -> None:
    srv = tmp_path / "srv"
    blob = "openscene-v1.1/sensor_blobs/mini/log/CAM_F0/zeros.jpg"
    _tgz(srv / CAMERA0, {blob: bytes(8 << 20)})  # 8 MiB of zeros in about 8 KiB
    assert (srv / CAMERA0).stat().st_size < 64 << 10
    out = tmp_path / "out"
    args = ["--modality", "camera", "--shards", "0", "--out", str(out)]
    with FileServer(srv) as server:
        code, output = _download(*args, "--base-url", server.url)  # default limit: 5 x 1.05, at least 1 MiB
        assert code == 1, output
        [line] = _failure_lines(output, CAMERA0)
        assert "decompression bomb" in line and "--max-extract-ratio" in line and blob in line
        _only_records_left(out, CAMERA0)
        code, output = _download(*args, "--base-url", server.url, "--max-extract-ratio", "5000")
        assert code == 0, output
    assert (out / blob).stat().st_size == 8 << 20


# -- sizes ------------------------------------------------------------------------------------------


def test_file_far_from_the_manifest_size_fails_without_a_checksum(release, tmp_path) -> None:
    """The packaged release.json says the mini metadata archive is about 509.6 MB; a mirror serving a
    small archive under that name, with a matching Content-Length, is not "verified size"."""
    out = tmp_path / "out"
    with FileServer(release["server"]) as server:
        code, output = _download("--modality", "metadata", "--out", str(out), "--base-url", server.url)
    assert code == 1, output
    [line] = _failure_lines(output, META)
    served = (release["server"] / META).stat().st_size
    assert f"size {served:,} bytes, expected about 509,600,000 (within 10%)" in line
    assert not (out / META).exists() and not (out / "openscene-v1.1/meta_datas").exists()


# -- slow, silent and unreachable servers --------------------------------------------------------


def test_server_trickling_one_byte_every_two_seconds_is_cut_off(release, tmp_path) -> None:
    out = tmp_path / "out"
    with FileServer(release["server"]) as server:
        server.add_faults(CAMERA0, "trickle")  # 1 byte every 2 s: no read ever times out
        args = ["--modality", "camera", "--shards", "0", "--out", str(out), "--no-extract"]
        args += ["--min-speed", "100", "--speed-window", "2", "--retries", "0"]
        code, output = _download(*args, "--base-url", server.url, timeout=60)
    assert code == 1, output
    [line] = _failure_lines(output, CAMERA0)
    assert "too slow" in line and "below the minimum of 100 B/s (--min-speed" in line
    part = out / (CAMERA0 + ".part")  # kept for resuming
    assert (
        0 < part.stat().st_size
        and part.read_bytes() == (release["server"] / CAMERA0).read_bytes()[: part.stat().st_size]
    )


def test_deadline_bounds_a_download_that_is_fast_enough_but_never_ends(release, tmp_path) -> None:
    out = tmp_path / "out"
    with FileServer(release["server"]) as server:
        server.add_faults(CAMERA0, "trickle:0.2")
        args = ["--modality", "camera", "--shards", "0", "--out", str(out), "--no-extract"]
        args += ["--min-speed", "0", "--deadline", "1"]
        code, output = _download(*args, "--base-url", server.url, timeout=60)
    assert code == 1, output
    [line] = _failure_lines(output, CAMERA0)
    assert "not complete within the deadline of 1 s (--deadline" in line and ".part file is kept" in line


def test_size_probe_honours_timeout(tmp_path) -> None:
    srv = tmp_path / "srv"
    _tgz(srv / CAMERA0, {"x": b"x"})
    with FileServer(srv, latency_s=3.0) as server:  # answers, but only after 3 s
        args = ["--modality", "camera", "--shards", "0", "--out", str(tmp_path / "out"), "--dry-run"]
        code, output = _download(*args, "--timeout", "0.5", "--base-url", server.url)
    assert code == 0, output
    assert f"{server.url}: unreachable: no answer within 0.5 s (--timeout)" in output
    assert "unknown" in output


def test_offline_dry_run_says_unreachable_once_and_download_stops_with_one_line(tmp_path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {"HF_ENDPOINT": endpoint}
    code, output = _download("--out", str(tmp_path / "out"), "--dry-run", env=env)
    assert code == 0, output
    mirror = f"mirror huggingface ({endpoint}/{HF_PREFIX})"
    offline = [line for line in output.splitlines() if "unreachable" in line]
    assert offline == [
        f"[offline] {mirror}: unreachable: cannot connect: [Errno 111] Connection refused; "
        "the size of 65 archives is unknown"
    ], output
    assert "[size?]" not in output and "65 files" in output

    code, output = _download("--out", str(tmp_path / "out"), env=env)
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {mirror}: unreachable (cannot connect: [Errno 111] Connection refused); nothing was "
        "downloaded (check the network or proxy settings, raise --timeout, or choose another --mirror or "
        "--base-url)"
    ], output
    assert not (tmp_path / "out" / "openscene-v1.1").exists()


# -- the Hugging Face mirror: HF_ENDPOINT, HF_TOKEN -------------------------------------------------


def test_hf_endpoint_and_token_reach_the_mirror_and_nowhere_else(release, tmp_path) -> None:
    hub_root = tmp_path / "hub"
    (hub_root / HF_PREFIX / CAMERA0).parent.mkdir(parents=True)
    shutil.copy(release["server"] / CAMERA0, hub_root / HF_PREFIX / CAMERA0)
    args = ["--modality", "camera", "--shards", "0", "--no-extract"]
    # the hub checks the token and redirects to its CDN, which must not see the token
    with FileServer(hub_root) as cdn, FileServer(hub_root, bearer="hf_test", redirect_to=cdn.url) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}
        code, output = _download(*args, "--out", str(tmp_path / "a"), env=env)
        assert code == 0, output
        assert (tmp_path / "a" / CAMERA0).read_bytes() == (release["server"] / CAMERA0).read_bytes()
        assert hub.authorizations and set(hub.authorizations) == {"Bearer hf_test"}
        assert cdn.authorizations and set(cdn.authorizations) == {None}

        # no token: the hub refuses, and the error says what to set
        code, output = _download(*args, "--out", str(tmp_path / "b"), env={"HF_ENDPOINT": hub.url})
        assert code == 1, output
        [line] = _failure_lines(output, CAMERA0)
        assert "HTTP 401" in line and "HF_TOKEN" in line

        # another source (--base-url) never gets the token
        before = len(cdn.authorizations)
        code, output = _download(
            *args, "--out", str(tmp_path / "c"), "--base-url", cdn.url + HF_PREFIX, env=env
        )
        assert code == 0, output
        assert len(cdn.authorizations) > before and set(cdn.authorizations) == {None}
