"""``driveengine inspect``: summaries of a synthetic nuPlan log, a PCD file, a frame shard, a label group and
OpenScene metadata (a hostile pickle refused without running it), text and JSON, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from collected_fixture import Collected, collected_split
from typer.testing import CliRunner

from driveengine import cli
from driveengine.errors import SourceError
from driveengine.inspect import format_summary, inspect_path
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES


@pytest.fixture
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    return collected_split(tmp_path_factory)


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


def test_inspect_unknown_kind_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(SourceError, match=r"cannot inspect a \.txt file.*\.parquet, \.pcd, \.pkl, \.zarr"):
        inspect_path(path)
    with pytest.raises(SourceError, match=r"missing\.parquet: no such file or folder"):
        inspect_path(tmp_path / "missing.parquet")


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


# -- DriveEngine's own files and OpenScene metadata ---------------------------------------------------


def _cli_json(path: Path) -> dict:
    result = CliRunner().invoke(cli.app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_inspect_frame_shard(collected: Collected) -> None:
    import pyarrow.parquet as pq

    shard = collected.split_dir / "meta" / f"{collected.log}.parquet"
    table = pq.read_table(shard, columns=["timestamp", "scene_token"])
    summary = inspect_path(shard)
    assert summary["kind"] == "frame_shard" and summary["frame_shard"] is True
    assert summary["format_version"] == 2 and summary["rows"] == table.num_rows >= 4
    assert summary["logs"] == 1 and summary["frames_per_log"] == {collected.log: table.num_rows}
    assert summary["cameras"] == list(CAMERA_CHANNELS)
    assert "frame_index" in summary["columns"] and summary["frame_index"] == "0 .. T-1 in row order"
    ts = table.column("timestamp").to_pylist()
    assert (summary["first_timestamp_us"], summary["last_timestamp_us"]) == (min(ts), max(ts))
    assert summary["first_utc"].endswith("+00:00")
    assert summary["first_local_time"].endswith("(America/Los_Angeles)")  # us-nv-las-vegas-strip
    assert summary["scenes"] == len(set(table.column("scene_token").to_pylist()))
    assert summary["boxes"] == sum(summary["boxes_by_category"].values()) > 0
    assert _cli_json(shard) == json.loads(json.dumps(summary))
    text = format_summary(summary)
    assert text.splitlines()[0] == f"DriveEngine frame shard: {shard}"
    # a Parquet file that is not a frame shard is summarised as such; a damaged one is one clear error
    import pyarrow as pa

    other = shard.parent.parent / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), other)
    plain = inspect_path(other)
    assert plain["frame_shard"] is False and plain["rows"] == 3 and plain["columns"] == ["a"]
    other.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(SourceError, match=r"other\.parquet: not a readable Parquet file"):
        inspect_path(other)
    other.unlink()


def test_inspect_label_group(collected: Collected) -> None:
    from driveengine.schemas.occ import COORDINATE_ARRAYS, REQUIRED_ARRAYS

    from driveengine.store.occ import open_occ

    group = collected.split_dir / "occ" / f"{collected.log}.zarr"
    occ = open_occ(group)
    summary = inspect_path(group)
    assert summary["kind"] == "label_group" and summary["frames"] == occ.num_frames
    assert summary["grid"] == occ.grid.describe() and summary["class_table"] == "openscene"
    assert summary["classes"]["7"] == "pedestrian" and summary["free"] == 16
    assert [a["name"] for a in summary["arrays"]] == [*REQUIRED_ARRAYS, "mask_camera"] == list(occ.arrays)
    flow = summary["arrays"][1]
    assert flow["dtype"] == "float16" and flow["shape"] == [occ.num_frames, 200, 200, 16, 2]
    assert flow["chunks"] == [1, 200, 200, 16, 2]
    assert set(summary["coordinate_arrays"]) == set(COORDINATE_ARRAYS)
    assert summary["generator"] == occ.attrs["generator"] and "voxel_size_m" in json.dumps(
        summary["generator"]
    )
    assert summary["first_timestamp_us"] == occ.attrs["timestamps_us"][0]
    assert _cli_json(group) == json.loads(json.dumps(summary))
    assert format_summary(summary).splitlines()[0] == f"DriveEngine label group: {group}"


def test_inspect_damaged_label_group_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    group = tmp_path / "x.zarr"
    group.mkdir()
    (group / "zarr.json").write_text("{not json")
    monkeypatch.setattr(sys, "argv", ["driveengine", "inspect", str(group)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "zarr.json: malformed group metadata" in err and "Traceback" not in err


def test_inspect_openscene_metadata(collected: Collected, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from driveengine.export.openscene import export_split

    list(export_split(collected.split_dir, tmp_path / "export", occupancy=False))
    (pkl,) = (tmp_path / "export").rglob("*.pkl")
    rows = pq.read_table(collected.split_dir / "meta" / f"{collected.log}.parquet", columns=["timestamp"])
    summary = inspect_path(pkl)
    n = rows.num_rows
    assert summary["kind"] == "openscene_metadata" and summary["frames"] == n
    assert summary["logs"] == {collected.log: n}
    assert summary["cameras"] == {c: n for c in sorted(CAMERA_CHANNELS)}
    assert {"token", "timestamp", "cams", "anns", "ego2global_translation"} <= set(summary["keys"])
    assert summary["first_timestamp_us"] == min(rows.column("timestamp").to_pylist())
    assert summary["frames_with_boxes"] == n and summary["boxes"] > 0
    assert _cli_json(pkl) == json.loads(json.dumps(summary))


class _Payload:
    """Pickles as a call of os.system: what a hostile metadata file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_inspect_refuses_a_hostile_pickle_without_running_it(tmp_path: Path, monkeypatch, capsys) -> None:
    import pickle

    from driveengine.errors import UnsafePickleError

    marker = tmp_path / "pwned"
    pkl = tmp_path / "log.pkl"
    pkl.write_bytes(pickle.dumps([{"token": "a", "x": _Payload(marker)}]))
    with pytest.raises(UnsafePickleError, match="os"):
        inspect_path(pkl)
    monkeypatch.setattr(sys, "argv", ["driveengine", "inspect", str(pkl), "--json"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(pkl) in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()  # nothing ran
    # a pickle of the wrong shape is a clear error too
    pkl.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(SourceError, match="expected a list of frame dicts"):
        inspect_path(pkl)
