"""stats, the OpenScene-compatible export and the process_data/ scripts on a collected synthetic split."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from driveengine.schemas.classes import CAMERA_CHANNELS
from driveengine.schemas.frame import FRAME_SCHEMA
from test_collect_e2e import _touch_blobs
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.collect.runner import CollectConfig, collect
from driveengine.sources.openscene import load_openscene_pickle
from driveengine.stats import compute_stats, format_stats
from driveengine.store.frames import read_split_frames
from driveengine.store.manifest import load_manifest
from driveengine.synth import synthesize

REPO = Path(__file__).resolve().parents[1]

#: OpenScene v1.1's frame keys (reference §3).
OPENSCENE_KEYS = {
    "token", "frame_idx", "timestamp", "log_name", "log_token", "scene_name", "scene_token", "map_location",
    "roadblock_ids", "vehicle_name", "can_bus", "lidar_path", "lidar2ego_translation", "lidar2ego_rotation",
    "ego2global_translation", "ego2global_rotation", "ego_dynamic_state", "traffic_lights", "driving_command",
    "cams", "sample_prev", "sample_next", "ego2global", "lidar2ego", "lidar2global", "anns",
}  # fmt: skip


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "process_data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    root = tmp_path_factory.mktemp("nuplan")
    logs = synthesize(root, logs=2, seconds=3.0, seed=11, split="mini", blobs=False)
    first_key = logs[0].plan.sweep_filename  # drop some lidar files: frames dropped, counted
    _touch_blobs(logs, root / "sensor_blobs", skip=set(first_key[:40]))
    out = tmp_path_factory.mktemp("out")
    summary = collect(
        CollectConfig(source="nuplan", root=root, out=out, labels=False, progress=False), echo=lambda _: None
    )
    assert summary.ok
    return root, out / "mini", logs


def test_stats_count_what_the_shards_hold(collected) -> None:
    _, split_dir, logs = collected
    stats = compute_stats(split_dir)
    rows = read_split_frames(split_dir).to_pylist()
    assert stats["logs"] == len(logs) and stats["frames"] == len(rows)
    assert stats["boxes_per_class"] == dict(Counter(n for r in rows for n in r["anns"]["gt_names"]))
    manifest = load_manifest(split_dir)
    assert stats["dropped"] == dict(sum((Counter(e["dropped"]) for e in manifest.logs.values()), Counter()))
    assert stats["dropped"]["missing_lidar"] == 4  # key frames 0, 10, 20, 30 of log 0
    assert stats["duration_s"] == 0.5 * len(rows)
    text = format_stats(stats)
    assert "missing_lidar" in text and "vehicle" in text


def test_export_writes_openscene_metadata(collected, tmp_path: Path) -> None:
    _, split_dir, logs = collected
    result = subprocess.run(
        [sys.executable, "-m", "driveengine.cli", "export", str(split_dir), "--out", str(tmp_path), "--format", "openscene"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "meta_datas" / "mini").glob("*.pkl"))
    assert [f.stem for f in files] == sorted(log.log_name for log in logs)
    manifest = load_manifest(split_dir)
    for f in files:
        frames = load_openscene_pickle(f)
        assert len(frames) == manifest.logs[f.stem]["frames"]
        for fr in frames:
            assert set(fr) == OPENSCENE_KEYS
            assert list(fr["cams"]) == list(CAMERA_CHANNELS)
            assert fr["can_bus"].shape == (18,) and fr["ego2global"].shape == (4, 4)
            assert fr["anns"]["gt_boxes"].shape[1] == 7 and fr["anns"]["gt_names"].dtype.kind == "U"
            assert isinstance(fr["lidar2ego_rotation"], list) and fr["driving_command"].sum() == 1


def test_process_data_scripts(collected, tmp_path: Path) -> None:
    root, split_dir, logs = collected
    out = tmp_path / "meta_datas" / "mini"
    code = _script("create_openscene_metadata").main(
        ["--nuplan-db-path", str(root / "splits" / "mini"), "--nuplan-sensor-path", str(root / "sensor_blobs"),
         "--out-dir", str(out), "--split", "mini", "--thread-num", "1"]
    )  # fmt: skip
    assert code == 0
    files = sorted(out.glob("*.pkl"))
    assert [f.stem for f in files] == sorted(log.log_name for log in logs)
    # The same frames as `driveengine export` of the collected split.
    export = tmp_path / "export"
    from driveengine.store.legacy import export_openscene_metadata

    for a, b in zip(files, export_openscene_metadata(split_dir, export), strict=True):
        fa, fb = load_openscene_pickle(a), load_openscene_pickle(b)
        assert [x["token"] for x in fa] == [x["token"] for x in fb]
        np.testing.assert_array_equal(
            np.stack([x["can_bus"] for x in fa]), np.stack([x["can_bus"] for x in fb])
        )
    merge = _script("collect_data")
    merge_args = [
        "--meta-dir", str(out), "--out", str(tmp_path / "train.pkl"),
        "--val-out", str(tmp_path / "val.pkl"), "--val-fraction", "0.5",
    ]  # fmt: skip
    assert merge.main(merge_args) == 0
    train = pickle.loads((tmp_path / "train.pkl").read_bytes())
    val = pickle.loads((tmp_path / "val.pkl").read_bytes())
    assert {f["log_name"] for f in train} == {files[0].stem} and {f["log_name"] for f in val} == {
        files[1].stem
    }
    assert [f["timestamp"] for f in train] == sorted(f["timestamp"] for f in train)
    first = (tmp_path / "train.pkl").read_bytes()
    merge.main(merge_args)
    assert (tmp_path / "train.pkl").read_bytes() == first  # deterministic


def test_cli_schema_splits_stats(collected) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["schema"])
    assert out.exit_code == 0
    lines = out.output.splitlines()
    assert all(any(line.startswith(f"{f.name} ") for line in lines) for f in FRAME_SCHEMA)
    assert "version 1" in lines[0]
    out = runner.invoke(app, ["splits"])
    assert out.exit_code == 0 and "navtrain" in out.output and "103288 key frames" in out.output
    _, split_dir, _ = collected
    out = runner.invoke(app, ["stats", str(split_dir), "--json"])
    assert out.exit_code == 0
    assert json.loads(out.output)["frames"] == compute_stats(split_dir)["frames"]
