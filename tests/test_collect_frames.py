"""Key frames and frame rows (driveengine.collect.frames) on hand-made LogData with known geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from driveengine.schemas.classes import CAMERA_CHANNELS, CATEGORIES
from driveengine.schemas.frame import FRAME_SCHEMA

from driveengine.collect.frames import (
    FrameOptions,
    build_frame_table,
    driving_commands,
    select_frames,
    select_key_frames,
)
from driveengine.errors import SourceError
from driveengine.geometry import (
    invert_transform,
    make_transform,
    quaternion_to_matrix,
    transform_points,
    yaw_to_quaternion,
)
from driveengine.sources.logdata import LogData


def make_log(
    n: int = 60,
    *,
    seed: int = 0,
    log_name: str = "2021.05.12.22.00.38_veh-35_01008_01518",
    scenes: int = 2,
    yaw_rate: float = 0.3,
    speed: float = 8.0,
    boxes_per_sweep: int = 3,
    first_full: int = 0,
) -> LogData:
    """A small consistent log: the ego drives an arc at 20 Hz, boxes move in the global frame.

    Sweeps before ``first_full`` lack the CAM_B0 image (so key frames start at ``first_full``).
    """
    rng = np.random.default_rng(seed)
    c = len(CAMERA_CHANNELS)
    ts = 1_620_000_000_000_000 + np.arange(n, dtype=np.int64) * 50_000
    t = (ts - ts[0]) / 1e6
    yaw = 0.4 + yaw_rate * t
    if yaw_rate:
        x = speed / yaw_rate * (np.sin(yaw) - np.sin(yaw[0]))
        y = -speed / yaw_rate * (np.cos(yaw) - np.cos(yaw[0]))
    else:
        x, y = speed * t * np.cos(yaw), speed * t * np.sin(yaw)
    ego_t = np.stack([x + 664_000.0, y + 3_997_000.0, np.full(n, 0.5)], axis=1)
    ego_q = yaw_to_quaternion(yaw)
    tok = np.array([f"{i:016x}" for i in rng.integers(0, 2**62, n)])
    sweep_scene = (np.arange(n) * scenes // max(n, 1)).astype(np.int32)
    image_ts = np.repeat(ts[::2], 2)[:n][:, None] + np.arange(c)[None, :] * 1000
    image_path = np.array(
        [[f"{log_name}/{cam}/{(i // 2):016x}.jpg" for cam in CAMERA_CHANNELS] for i in range(n)], dtype=object
    ).astype(str)
    image_path[:first_full, 7] = ""
    image_ts = np.where(image_path != "", image_ts, -1)
    m = boxes_per_sweep * n
    box_offsets = np.arange(n + 1, dtype=np.int64) * boxes_per_sweep
    box_row = np.repeat(np.arange(n), boxes_per_sweep)
    track = np.tile(np.arange(boxes_per_sweep), n)
    center = ego_t[box_row] + np.stack([10.0 + 3 * track, -5.0 + 4 * track, np.zeros(m)], axis=1)
    box_yaw = np.pi - 0.05 + 0.02 * track  # near pi so that yaw - ego_yaw needs wrapping
    tl_offsets = np.concatenate([[0], np.cumsum(np.arange(n) % 2)]).astype(np.int64)
    k_tl = int(tl_offsets[-1])
    tag_offsets = np.concatenate([[0], np.cumsum((np.arange(n) % 3 == 0) * 2)]).astype(np.int64)
    k_tag = int(tag_offsets[-1])
    cam_q = yaw_to_quaternion(np.linspace(0, 2 * np.pi, c, endpoint=False))
    return LogData(
        source="nuplan",
        path=f"/data/{log_name}.db",
        log_name=log_name,
        log_token="00112233aabbccdd",
        vehicle_name="veh-35",
        location="las_vegas",
        map_version="us-nv-las-vegas-strip",
        lidar_token="aaaaaaaaaaaaaaaa",
        ego_from_lidar=make_transform(yaw_to_quaternion(0.01), [1.0, 0.0, 1.8]),
        sweep_token=tok,
        sweep_timestamp_us=ts,
        sweep_lidar_path=np.array([f"{log_name}/MergedPointCloud/{x}.pcd" for x in tok]),
        sweep_scene=sweep_scene,
        ego_translation=ego_t,
        ego_rotation=ego_q,
        ego_velocity=np.tile([speed, 0.1, 0.0], (n, 1)),
        ego_acceleration=np.tile([0.2, speed * yaw_rate, 0.0], (n, 1)),
        ego_angular_rate=np.tile([0.0, 0.0, yaw_rate], (n, 1)),
        camera_token=np.array([f"{i:016x}" for i in range(c)]),
        camera_translation=rng.normal(size=(c, 3)),
        camera_rotation=cam_q,
        camera_intrinsic=np.tile(np.array([[1000.0, 0, 960], [0, 1000.0, 540], [0, 0, 1]]), (c, 1, 1)),
        camera_distortion=rng.normal(size=(c, 5)) * 0.01,
        camera_size=np.tile(np.array([1920, 1080], dtype=np.int32), (c, 1)),
        image_path=image_path,
        image_timestamp_us=image_ts.astype(np.int64),
        box_offsets=box_offsets,
        box_token=np.array([f"b{i:015x}" for i in range(m)]),
        box_track_token=np.array([f"t{j:015x}" for j in track]),
        box_category=(track % len(CATEGORIES)).astype(np.int8),
        box_center=center,
        box_size=np.tile([4.5, 2.0, 1.6], (m, 1)),
        box_yaw=box_yaw,
        box_velocity=np.stack([np.full(m, 3.0), 1.0 + track, np.zeros(m)], axis=1),
        box_confidence=np.ones(m),
        scene_token=np.array([f"{i:016x}" for i in range(100, 100 + scenes)]),
        scene_name=np.array([f"scene-{i:04d}" for i in range(scenes)]),
        scene_roadblock_ids=[[str(1000 + i), str(2000 + i)] for i in range(scenes)],
        traffic_light_offsets=tl_offsets,
        traffic_light_lane_connector_id=np.arange(k_tl, dtype=np.int64) + 500,
        traffic_light_status=(np.arange(k_tl) % 4).astype(np.int8),
        tag_offsets=tag_offsets,
        tag_type=np.tile(["stationary", "high_lateral_acceleration"], k_tag // 2),
        tag_agent_track_token=np.array([""] * k_tag),
    )


def write_blobs(log: LogData, root: Path, skip: set[str] = frozenset()) -> None:
    """Create empty sensor files for every path the log names (except those in ``skip``)."""
    for p in set(log.sweep_lidar_path.tolist()) | set(log.image_path[log.image_path != ""].tolist()):
        if p in skip:
            continue
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")


def test_key_frames_start_at_first_full_frame_aligned_to_cam_f0() -> None:
    log = make_log(60, first_full=3)
    # Sweep 3's CAM_F0 image (shared with sweep 2) is 50 ms early; sweep 4 has its own, 0 ms: start at 4.
    keys = select_key_frames(log, 10)
    assert keys[0] == 4
    assert np.all(np.diff(keys) == 10)
    log = make_log(60, first_full=2)  # sweep 2 has an exact image, sweep 3 one 50 ms off: start at 2
    assert select_key_frames(log, 10)[0] == 2


def test_no_frame_with_all_cameras_gives_an_empty_reported_log() -> None:
    log = make_log(40, first_full=40)
    options = FrameOptions(split="mini", check_blobs=False)
    sel = select_frames(log, options, None)
    assert sel.key_sweeps.size == 0
    assert sel.dropped == {"no_frame_with_all_cameras": 4}
    assert sel.notes
    table = build_frame_table(log, sel, options)
    assert table.num_rows == 0 and table.schema == FRAME_SCHEMA


def test_rows_match_the_geometry(tmp_path: Path) -> None:
    log = make_log(80)
    write_blobs(log, tmp_path)
    options = FrameOptions(split="mini")
    sel = select_frames(log, options, tmp_path)
    assert sel.dropped == {}
    table = build_frame_table(log, sel, options)
    assert table.schema == FRAME_SCHEMA
    rows = table.to_pylist()
    s = sel.key_sweeps
    assert [r["token"] for r in rows] == log.sweep_token[s].tolist()
    assert [r["timestamp"] for r in rows] == log.sweep_timestamp_us[s].tolist()
    for r, i in zip(rows, s.tolist(), strict=True):
        g_from_e = make_transform(log.ego_rotation[i], log.ego_translation[i])
        np.testing.assert_allclose(np.array(r["ego2global"]), g_from_e)
        np.testing.assert_allclose(np.array(r["lidar2global"]), g_from_e @ log.ego_from_lidar)
        np.testing.assert_allclose(
            r["can_bus"][:7], np.concatenate([log.ego_translation[i], log.ego_rotation[i]])
        )
        # Boxes: global centres back into the ego frame, one box at a time (the slow, obvious way).
        e_from_g = invert_transform(g_from_e)
        sl = log.boxes(i)
        boxes = np.array(r["anns"]["gt_boxes"])
        np.testing.assert_allclose(boxes[:, :3], transform_points(e_from_g, log.box_center[sl]), atol=1e-9)
        np.testing.assert_allclose(boxes[:, 3:6], log.box_size[sl])
        assert np.all((boxes[:, 6] >= -np.pi) & (boxes[:, 6] < np.pi))
        rel = boxes[:, 6] + np.arctan2(g_from_e[1, 0], g_from_e[0, 0]) - log.box_yaw[sl]
        np.testing.assert_allclose(np.cos(rel), 1.0, atol=1e-12)
        vel = np.array(r["anns"]["gt_velocity_3d"])
        np.testing.assert_allclose(vel, log.box_velocity[sl] @ e_from_g[:3, :3].T, atol=1e-12)
        assert r["anns"]["instance_tokens"] == log.box_token[sl].tolist()
        assert r["anns"]["gt_names"] == [CATEGORIES[c] for c in log.box_category[sl]]
        # Cameras in the fixed order with the log's calibration.
        assert list(r["cams"]) == list(CAMERA_CHANNELS)
        for c, cam in enumerate(CAMERA_CHANNELS):
            assert r["cams"][cam]["data_path"] == log.image_path[i, c]
            np.testing.assert_allclose(
                np.array(r["cams"][cam]["sensor2lidar_rotation"]),
                quaternion_to_matrix(log.camera_rotation[c]),
            )
            np.testing.assert_allclose(r["cams"][cam]["sensor2lidar_translation"], log.camera_translation[c])
        tl = log.traffic_lights(i)
        assert [t["lane_connector_id"] for t in r["traffic_lights"]] == log.traffic_light_lane_connector_id[
            tl
        ].tolist()
        assert [t["is_red"] for t in r["traffic_lights"]] == (log.traffic_light_status[tl] == 2).tolist()
        assert r["scenario_tags"] == sorted(set(log.tag_type[log.tags(i)].tolist()))
        assert r["scene_name"] == f"{log.log_name}-{log.scene_name[log.sweep_scene[i]]}"
        assert r["source"] == "nuplan" and r["split"] == "mini"


def test_prev_next_and_frame_idx_stay_inside_scenes_without_gaps(tmp_path: Path) -> None:
    log = make_log(200, scenes=2)
    # Drop the third key frame's lidar file.
    keys = select_key_frames(log, 10)
    write_blobs(log, tmp_path, skip={log.sweep_lidar_path[keys[2]]})
    sel = select_frames(log, FrameOptions(split="x"), tmp_path)
    assert sel.dropped == {"missing_lidar": 1}
    rows = build_frame_table(log, sel, FrameOptions(split="x")).to_pylist()
    assert len(rows) == len(keys) - 1
    by_scene: dict[str, list[dict]] = {}
    for r in rows:
        by_scene.setdefault(r["scene_token"], []).append(r)
    assert len(by_scene) == 2
    for scene_rows in by_scene.values():
        assert [r["frame_idx"] for r in scene_rows] == list(range(len(scene_rows)))
        assert scene_rows[0]["sample_prev"] is None and scene_rows[-1]["sample_next"] is None
    first = next(iter(by_scene.values()))
    # Around the dropped frame the chain is broken (no 1 s jumps), elsewhere it links neighbours.
    assert first[1]["sample_next"] is None and first[2]["sample_prev"] is None
    assert first[0]["sample_next"] == first[1]["token"] and first[1]["sample_prev"] == first[0]["token"]
    tokens = {r["token"] for r in rows}
    assert all(r["sample_next"] in tokens for r in rows if r["sample_next"])


def test_missing_camera_file_and_missing_image_row_are_counted(tmp_path: Path) -> None:
    log = make_log(100)
    keys = select_key_frames(log, 10)
    log.image_path[keys[1], 3] = ""
    write_blobs(log, tmp_path, skip={log.image_path[keys[4], 5]})
    sel = select_frames(log, FrameOptions(split="x"), tmp_path)
    assert sel.dropped == {"no_camera_image": 1, "missing_camera": 1}
    assert sel.key_sweeps.tolist() == [k for j, k in enumerate(keys.tolist()) if j not in (1, 4)]


def test_test_split_has_null_anns_and_filter_instance_drops_static_classes() -> None:
    log = make_log(40, boxes_per_sweep=7)
    opts = FrameOptions(split="test", is_test=True, check_blobs=False)
    table = build_frame_table(log, select_frames(log, opts, None), opts)
    assert table.column("anns").null_count == table.num_rows > 0
    opts = FrameOptions(split="x", filter_instance=True, check_blobs=False)
    rows = build_frame_table(log, select_frames(log, opts, None), opts).to_pylist()
    names = {n for r in rows for n in r["anns"]["gt_names"]}
    assert names == {"vehicle", "bicycle", "pedestrian"}


def test_split_tokens_restrict_rows() -> None:
    log = make_log(100)
    keys = select_key_frames(log, 10)
    wanted = log.sweep_token[keys[[0, 3]]].tolist()
    sel = select_frames(log, FrameOptions(split="x", check_blobs=False), None, tokens=wanted)
    assert log.sweep_token[sel.key_sweeps].tolist() == wanted
    assert sel.dropped == {"not_in_split": len(keys) - 2}


@pytest.mark.parametrize(("yaw_rate", "expected"), [(0.0, 1), (0.3, 0), (-0.3, 2)])
def test_driving_command_follows_the_future_path(yaw_rate: float, expected: int) -> None:
    log = make_log(400, yaw_rate=yaw_rate, speed=10.0)
    cmd = driving_commands(log.ego_translation[::10], log.ego_rotation[::10])
    assert cmd.sum(axis=1).tolist() == [1] * len(cmd)
    # 10 m/s, 2 Hz grid: the last 20 m (4 frames) cannot look 20 m ahead.
    assert np.all(cmd[-4:, 3] == 1)
    assert np.all(cmd[:-5, expected] == 1)


def test_empty_columns_types_are_exact() -> None:
    log = make_log(30)
    opts = FrameOptions(split="x", check_blobs=False)
    table = build_frame_table(log, select_frames(log, opts, None), opts)
    assert pa.types.is_fixed_size_list(table.schema.field("ego2global").type)
    assert table.schema.metadata[b"driveengine.format_version"] == b"1"


def test_a_log_without_any_sensor_folder_is_an_error_not_an_empty_log(tmp_path: Path) -> None:
    log = make_log(40)
    with pytest.raises(SourceError, match="no sensor blobs") as info:
        select_frames(log, FrameOptions(split="x"), tmp_path)
    assert str(tmp_path / log.log_name) in str(info.value) and "--sensor-root" in str(info.value)
