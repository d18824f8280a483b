"""A collected split with a deleted or damaged file: every reader says which log and file, `verify` names it.

zarr reads a missing shard file as fill values (all free, zero flow, unobserved): without these checks
a deleted file is silently wrong labels in the loader, `evaluate` and `show`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from driveengine.collect.runner import CollectConfig, collect
from driveengine.data import FrameStream, StreamError
from driveengine.store.check import UNSAFE, _check_one, verify_split
from driveengine.store.manifest import load_manifest
from driveengine.synth import synthesize


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split collected with labels from a small synthetic world (2 logs); tests damage copies of it."""
    world = tmp_path_factory.mktemp("world")
    synthesize(world, logs=2, seconds=2.5, seed=5, split="mini", points=1024, image_size=(32, 18))
    out = tmp_path_factory.mktemp("out")
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=world, out=out, progress=False), echo=lambda _: None
    )
    assert summary.ok, summary.format()
    return out


@pytest.fixture
def split(pristine: Path, tmp_path: Path) -> tuple[Path, str, dict]:
    """(split folder of a fresh copy, the log that tests damage, its manifest entry)."""
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    manifest = load_manifest(out / "mini")
    victim = sorted(manifest.logs)[1]
    return out / "mini", victim, manifest.logs[victim]


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``driveengine ARGS`` in this process as the console script does: (exit code, stdout, stderr)."""
    from driveengine import cli

    monkeypatch.setattr("sys.argv", ["driveengine", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main()
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def _delete_shard(split_dir: Path, entry: dict, array: str = "semantics") -> Path:
    shard = split_dir / entry.occ / array / "c" / "0" / "0" / "0" / "0"
    if array == "flow":
        shard = shard / "0"
    assert shard.is_file()
    shard.unlink()
    return shard


def test_verify_passes_a_sound_split_and_names_a_deleted_shard(split, monkeypatch, capsys) -> None:
    split_dir, victim, entry = split
    code, out, _ = _cli(monkeypatch, capsys, "verify", str(split_dir))
    assert code == 0 and "OK: every committed file matches its sha256" in out
    shard = _delete_shard(split_dir, entry)
    code, out, _ = _cli(monkeypatch, capsys, "verify", str(split_dir))
    assert code == 1
    assert f"DIFFERS: {split_dir / entry.occ} (log {victim})" in out
    assert f"missing: {shard.relative_to(split_dir)} (semantics frames 0.." in out
    assert f"--overwrite --logs {victim}" in out
    # the dataset root with --split names the same split; --json for scripts
    code, out, _ = _cli(monkeypatch, capsys, "verify", str(split_dir.parent), "--split", "mini", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    (bad,) = [f for f in report["files"] if f["status"] != "ok"]
    assert bad["path"] == entry.occ and bad["log"] == victim and bad["status"] == "differs"
    # options of the release check do not apply to a collected split
    code, _, err = _cli(monkeypatch, capsys, "verify", str(split_dir), "--md5-file", str(split_dir / "x.md5"))
    assert code == 2 and "--shard-map and --md5-file apply to a download folder" in err


def test_verify_names_a_changed_or_missing_frame_shard_and_a_foreign_file(split) -> None:
    split_dir, victim, entry = split
    first = sorted(load_manifest(split_dir).logs)[0]
    meta = split_dir / load_manifest(split_dir).logs[first].meta
    meta.write_bytes(meta.read_bytes() + b"\0")
    (split_dir / entry.meta).unlink()
    (split_dir / entry.occ / "flow" / "c" / "notes.txt").write_text("x")
    result = verify_split(split_dir, workers=2)
    assert not result.ok
    problems = {(f.path, f.status) for f in result.problems}
    assert problems == {
        (f"meta/{first}.parquet", "differs"),
        (entry.meta, "missing"),
        (entry.occ, "differs"),
    }
    (occ,) = [f for f in result.problems if f.path == entry.occ]
    assert occ.details == [f"not part of a DriveEngine label group: {entry.occ}/flow/c/notes.txt"]
    assert result.damaged_logs() == sorted([first, victim])
    # a manifest path outside the split folder is reported, never opened
    outside = _check_one(split_dir, victim, "../../etc/passwd", "sha256:" + "0" * 64)
    assert outside.status == UNSAFE and outside.actual == ""


@pytest.mark.parametrize("fast_reads", [True, False])
def test_stream_names_the_log_and_the_missing_shard(split, fast_reads) -> None:
    split_dir, victim, entry = split
    shard = _delete_shard(split_dir, entry, "flow")
    stream = FrameStream(split_dir.parent, "mini", fields=("flow",), shuffle=False, fast_reads=fast_reads)
    with pytest.raises(StreamError) as exc:
        list(stream)
    message = str(exc.value)
    assert message.startswith(f"log {victim}: ") and str(shard) in message and "missing" in message
    assert "\n" not in message
    # the other log still streams
    others = [s for s in FrameStream(split_dir.parent, "mini", fields=("token",), shuffle=False)]
    assert {s["log_name"] for s in others} == set(load_manifest(split_dir).logs)


def test_evaluate_names_the_log_and_the_missing_shard(split, monkeypatch, capsys) -> None:
    split_dir, victim, entry = split
    code, out, err = _cli(
        monkeypatch, capsys, "evaluate", "--pred", str(split_dir), "--gt", str(split_dir), "--json"
    )
    assert code == 0 and json.loads(out)["miou"] > 0
    shard = _delete_shard(split_dir, entry, "mask_lidar")
    code, out, err = _cli(
        monkeypatch, capsys, "evaluate", "--pred", str(split_dir), "--gt", str(split_dir), "--json"
    )
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: log {victim}: {shard}: ") and "is missing" in line


def test_show_names_the_log_and_the_missing_or_corrupt_shard(split, monkeypatch, capsys, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    split_dir, victim, entry = split
    shard = _delete_shard(split_dir, entry)
    code, _, err = _cli(
        monkeypatch, capsys, "show", str(split_dir), "--log", victim, "--out", str(tmp_path / "f.png")
    )
    assert code == 2 and not (tmp_path / "f.png").exists()
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: log {victim}: {shard}: the shard file of semantics frames 0..")
    flow = split_dir / entry.occ / "flow" / "c" / "0" / "0" / "0" / "0" / "0"
    shard.write_bytes(flow.read_bytes())  # a file of the wrong array: does not decode here
    code, _, err = _cli(
        monkeypatch, capsys, "show", str(split_dir), "--log", victim, "--out", str(tmp_path / "f.png")
    )
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith(f"error: log {victim}: {shard}: semantics frames 0..0 do not decode")


def test_python_dash_m_and_version_flag() -> None:
    import subprocess

    from driveengine import __version__

    for cmd in (
        [sys.executable, "-m", "driveengine", "--version"],
        [str(Path(sys.executable).parent / "driveengine"), "--version"],
    ):
        if not Path(cmd[0]).exists():
            continue
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"driveengine {__version__} (format version 2)"
    result = subprocess.run(
        [sys.executable, "-m", "driveengine", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "python -m driveengine" in result.stdout and "verify" in result.stdout
