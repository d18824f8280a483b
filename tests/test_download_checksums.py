"""Checksum files, streaming hashes, the md5 command and the release manifest."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.download.checksums import (
    StreamHasher,
    lookup,
    md5_file,
    parse_checksum_lines,
    read_checksum_file,
)
from driveengine.download.errors import ChecksumFileError, DownloadError, ReleaseError
from driveengine.download.fetch import FetchOptions
from driveengine.download.release import (
    format_shards,
    load_manifest,
    parse_shards,
    resolve_base_url,
    resolve_source,
    select_files,
)

MD5 = "6f92f38d5f03ed852da7872a7122bdd2"
SHA = "a" * 64


def test_parses_md5sum_sha256sum_bsd_and_navsim_styles(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "# comment",
            f"{MD5}  openscene-v1.1/openscene_metadata_mini.tgz",
            f"{MD5.upper()} *bin.tgz",
            f"{SHA}  openscene-v1.1/openscene_metadata_mini.tgz",
            f"MD5 (bsd.tgz) = {MD5}",
            f"navtrain_current_1.tgz {MD5}",
            "",
        ]
    )
    path = tmp_path / "sums.md5"
    path.write_text(text)
    table = read_checksum_file(path)
    assert table["openscene-v1.1/openscene_metadata_mini.tgz"].md5 == MD5
    assert table["openscene-v1.1/openscene_metadata_mini.tgz"].sha256 == SHA
    assert table["bin.tgz"].md5 == MD5  # binary-mode marker stripped, hex lowercased
    assert table["bsd.tgz"].md5 == MD5
    assert table["navtrain_current_1.tgz"].md5 == MD5
    # lookup by release path falls back to the base name
    assert lookup(table, "somewhere/bin.tgz").md5 == MD5
    assert lookup(table, "other.tgz") is None


def test_bad_checksum_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.md5"
    path.write_text(f"{MD5}  ok.tgz\nnot a checksum line at all\n")
    with pytest.raises(ChecksumFileError, match=r"bad\.md5:2"):
        read_checksum_file(path)
    with pytest.raises(ChecksumFileError):
        parse_checksum_lines(["abc123  short.tgz"])


def test_stream_hasher_resumed_equals_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = StreamHasher(sha256=True)
    assert h.update_from_file(path, limit=1_234_567) == 1_234_567
    h.update(memoryview(data)[1_234_567:])
    assert h.md5 == hashlib.md5(data).hexdigest()
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert md5_file(path) == hashlib.md5(data).hexdigest()


def test_md5_command_matches_md5sum(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(1000 * (i + 1)))
        files.append(str(p))
    result = CliRunner().invoke(app, ["md5", "--jobs", "2", *files])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines == [f"{hashlib.md5(Path(f).read_bytes()).hexdigest()}  {f}" for f in files]
    # md5sum -c accepts the output as is
    (tmp_path / "sums").write_text(result.output)
    if sys.platform.startswith("linux"):
        check = subprocess.run(["md5sum", "-c", str(tmp_path / "sums")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_md5_command_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["md5", str(tmp_path / "nope")])
    assert result.exit_code != 0


def test_release_selection() -> None:
    files = select_files("mini", ["metadata", "lidar"], [0, 3])
    assert [f.name for f in files] == [
        "openscene-v1.1/openscene_metadata_mini.tgz",
        "openscene-v1.1/openscene_sensor_mini_lidar/openscene_sensor_mini_lidar_0.tgz",
        "openscene-v1.1/openscene_sensor_mini_lidar/openscene_sensor_mini_lidar_3.tgz",
    ]
    assert files[0].size == 509_600_000 and not files[0].size_exact
    assert len(select_files("trainval", ["camera"])) == 200
    assert len(select_files("test")) == 1 + 32 + 32
    navtrain = select_files("navtrain", ["current"], [1])
    assert navtrain[0].md5 == MD5  # published checksum shipped with the manifest
    with pytest.raises(ReleaseError, match="0-31"):
        select_files("mini", ["lidar"], [32])
    with pytest.raises(ReleaseError, match="unknown split"):
        select_files("minnie")
    with pytest.raises(ReleaseError, match="no modality"):
        select_files("mini", ["radar"])


def test_mirrors_and_base_url(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert resolve_base_url("mini") == "https://huggingface.co/datasets/OpenDriveLab/OpenScene/resolve/main/"
    assert resolve_base_url("mini", "modelscope").startswith("https://www.modelscope.cn/")
    assert resolve_base_url("mini", base_url="http://127.0.0.1:9/x") == "http://127.0.0.1:9/x/"
    assert resolve_base_url("mini", base_url=str(tmp_path)) == tmp_path.as_uri() + "/"
    assert resolve_base_url("navtrain").startswith("https://s3.")
    with pytest.raises(ReleaseError):
        resolve_base_url("mini", "nowhere")
    with pytest.raises(ReleaseError):
        resolve_base_url("mini", base_url="ftp://example.org/")


def test_shard_specs_round_trip() -> None:
    assert parse_shards("0-3,7, 5") == [0, 1, 2, 3, 5, 7]
    assert parse_shards(None) is None and parse_shards("all") is None
    assert format_shards([0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7-8"
    with pytest.raises(ReleaseError):
        parse_shards("3-1")
    with pytest.raises(ReleaseError):
        parse_shards("a")


def test_hf_endpoint_and_token_apply_to_the_hugging_face_mirror_only(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "https://hf-mirror.example/", "HF_TOKEN": " hf_abc "}
    hf = resolve_source("mini", environ=env)
    assert hf.base_url == "https://hf-mirror.example/datasets/OpenDriveLab/OpenScene/resolve/main/"
    assert hf.mirror == "huggingface" and hf.authorization == "Bearer hf_abc"
    assert "hf_abc" not in repr(hf)  # never printed with the source
    assert resolve_source("mini", "modelscope", environ=env).authorization is None
    assert resolve_source("navtrain", environ=env).authorization is None
    other = resolve_source("mini", base_url="https://hf-mirror.example/x", environ=env)
    assert other.authorization is None and other.mirror is None
    assert resolve_source("mini", environ={}).base_url.startswith("https://huggingface.co/datasets/")
    with pytest.raises(ReleaseError, match="HF_ENDPOINT"):
        resolve_source("mini", environ={"HF_ENDPOINT": "hf-mirror.example"})
    with pytest.raises(ReleaseError, match="HF_TOKEN"):
        resolve_source("mini", environ={"HF_TOKEN": "abc\r\nX-Injected: 1"})


@pytest.mark.parametrize(
    ("entry", "value"), [("size", -5), ("size", 1.5), ("extract_ratio", 0), ("size_tolerance", float("nan"))]
)
def test_manifest_numbers_are_checked(entry: str, value: float) -> None:
    import json

    manifest = json.loads(json.dumps(load_manifest()))
    manifest["splits"]["mini"]["modalities"]["metadata"][entry] = value
    with pytest.raises(ReleaseError, match=f"mini.metadata.{entry}"):
        select_files("mini", ["metadata"], manifest=manifest)


@pytest.mark.parametrize(
    "options",
    [
        {"deadline_s": float("nan")},
        {"min_speed_bps": -1.0},
        {"timeout_s": 0.0},
        {"speed_window_s": float("inf")},
    ],
)
def test_fetch_limits_must_be_finite(options: dict[str, float]) -> None:
    with pytest.raises(DownloadError, match="finite"):
        FetchOptions(**options)
