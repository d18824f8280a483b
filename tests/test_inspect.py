"""``driveengine inspect``: summaries of a synthetic nuPlan log and of a PCD file, text and JSON, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from driveengine import cli
from driveengine.errors import SourceError
from driveengine.inspect import format_summary, inspect_path
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES


@pytest.fixture(scope="module")
def synth_log(tmp_path_factory: pytest.TempPathFactory):
    from driveengine.synth import synthesize

    (log,) = synthesize(tmp_path_factory.mktemp("synth"), logs=1, seconds=2.5, seed=3, blobs=False)
    return log


def test_inspect_log_counts_match_what_was_written(synth_log) -> None:
    world = synth_log.world
    summary = inspect_path(synth_log.db_path)
    n = synth_log.counts["lidar_pc"]
    assert summary["kind"] == "nuplan_log"
    assert summary["log_name"] == world.log_name and summary["vehicle"] == world.vehicle_name
    assert summary["lidar_pc_frames"] == n == 50
    assert summary["key_frames"] == 5  # every 10th sweep: 0, 10, 20, 30, 40
    ts = world.lidar_timestamps_us
    assert summary["duration_s"] == pytest.approx((ts[-1] - ts[0]) / 1e6)
    assert summary["boxes"] == synth_log.counts["lidar_box"] == sum(summary["boxes_by_category"].values())
    assert list(summary["boxes_by_category"]) == list(CATEGORIES)
    assert summary["scenes"] == synth_log.counts["scene"]
    assert summary["traffic_light_rows"] == synth_log.counts["traffic_light_status"]
    assert summary["scenario_tags"] == synth_log.counts["scenario_tag"]
    assert list(summary["sweeps_with_image_per_camera"]) == list(CAMERA_CHANNELS)
    assert all(0 < k <= n for k in summary["sweeps_with_image_per_camera"].values())
    assert summary["cameras_missing"] == []
    # tracks = distinct annotated objects seen in the log
    assert 0 < summary["tracks"] <= len(world.tracks.token)
    json.dumps(summary)  # JSON-ready


def test_format_summary_is_one_screen(synth_log) -> None:
    text = format_summary(inspect_path(synth_log.db_path))
    lines = text.splitlines()
    assert lines[0] == f"nuPlan log: {synth_log.db_path}"
    assert len(lines) < 50
    assert any(line.split() == ["lidar_pc_frames", "50"] for line in lines)
    assert any(line.split()[:1] == ["CAM_F0"] for line in lines)


def test_inspect_pcd(tmp_path: Path) -> None:
    from driveengine.sources.pcd import write_pcd

    path = tmp_path / "sweep.pcd"
    xyz = np.array([[1.0, -2.0, 0.5], [3.0, 4.0, -1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    write_pcd(
        path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "intensity": np.arange(3, dtype=np.uint8)}
    )
    summary = inspect_path(path)
    assert summary["kind"] == "pcd" and summary["points"] == 3
    assert summary["xyz_min"] == [0.0, -2.0, -1.0] and summary["xyz_max"] == [3.0, 4.0, 0.5]
    assert format_summary(summary).startswith(f"PCD point cloud: {path}")


def test_inspect_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(SourceError, match=r"cannot inspect a \.txt file"):
        inspect_path(path)


def test_cli_inspect_json(synth_log) -> None:
    result = CliRunner().invoke(cli.app, ["inspect", str(synth_log.db_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(json.dumps(inspect_path(synth_log.db_path)))


def test_cli_inspect_bad_file_prints_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "fake.db"
    path.write_text("not sqlite at all\n")
    monkeypatch.setattr(sys, "argv", ["driveengine", "inspect", str(path)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "nuPlan log database" in err
    assert "Traceback" not in err
