"""Key frames and frame rows (driveengine.collect.frames) on hand-made LogData with known geometry."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from driveengine.schemas.frame import FINITE_COLUMNS, FINITE_MARK, describe_schema, frame_schema
from PIL import Image

from driveengine.collect.frames import (
    FrameOptions,
    FrameSelection,
    NonFiniteError,
    build_frame_table,
    check_finite,
    driving_commands,
    jpeg_defect,
    select_frames,
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
from driveengine.sources.nuplan import NuplanSource, openscene_key_frames
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES, CATEGORY_CLASS
from driveengine.sources.pcd import pcd_defect, write_pcd

FRAME_SCHEMA = frame_schema(CAMERA_CHANNELS)  # nuPlan's frame rows


def nuplan_select(log: LogData, options: FrameOptions, blob_root: Path | None, **kw) -> FrameSelection:
    """``select_frames`` with the nuPlan source's key-frame rule and sweep-file check."""
    source = NuplanSource()
    return select_frames(
        log,
        options,
        blob_root,
        candidates=source.key_frame_candidates(log, options.sample_interval),
        lidar_defect=source.lidar_defect,
        **kw,
    )


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
        camera_channels=CAMERA_CHANNELS,
        categories=CATEGORIES,
        category_class=np.array(CATEGORY_CLASS, dtype=np.uint8),
    )


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (90, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


#: A whole JPEG (2x2 pixels) and a whole binary PCD (one point): placeholders that pass collect's blob check.
TINY_JPEG = _tiny_jpeg()
TINY_PCD = (
    b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1\nHEIGHT 1\n"
    b"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 1\nDATA binary\n" + np.zeros(3, np.float32).tobytes()
)


def placeholder_blob(path: Path) -> None:
    """Write a tiny whole ``.pcd`` or ``.jpg`` at ``path`` (by its suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(TINY_PCD if path.suffix == ".pcd" else TINY_JPEG)


def write_blobs(log: LogData, root: Path, skip: set[str] = frozenset()) -> None:
    """Create tiny whole sensor files for every path the log names (except those in ``skip``)."""
    for p in set(log.sweep_lidar_path.tolist()) | set(log.image_path[log.image_path != ""].tolist()):
        if p not in skip:
            placeholder_blob(root / p)


def test_key_frames_start_at_first_full_frame_aligned_to_cam_f0() -> None:
    log = make_log(60, first_full=3)
    # Sweep 3's CAM_F0 image (shared with sweep 2) is 50 ms early; sweep 4 has its own, 0 ms: start at 4.
    keys = openscene_key_frames(log, 10)
    assert keys[0] == 4
    assert np.all(np.diff(keys) == 10)
    log = make_log(60, first_full=2)  # sweep 2 has an exact image, sweep 3 one 50 ms off: start at 2
    assert openscene_key_frames(log, 10)[0] == 2


def test_no_frame_with_all_cameras_gives_an_empty_reported_log() -> None:
    log = make_log(40, first_full=40)
    options = FrameOptions(split="mini", check_blobs=False)
    sel = nuplan_select(log, options, None)
    assert sel.key_sweeps.size == 0
    assert sel.dropped == {"no_frame_with_all_cameras": 4}
    assert sel.notes
    table = build_frame_table(log, sel, options)
    assert table.num_rows == 0 and table.schema == FRAME_SCHEMA


def test_rows_match_the_geometry(tmp_path: Path) -> None:
    log = make_log(80)
    write_blobs(log, tmp_path)
    options = FrameOptions(split="mini")
    sel = nuplan_select(log, options, tmp_path)
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
    keys = openscene_key_frames(log, 10)
    write_blobs(log, tmp_path, skip={log.sweep_lidar_path[keys[2]]})
    sel = nuplan_select(log, FrameOptions(split="x"), tmp_path)
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
    keys = openscene_key_frames(log, 10)
    log.image_path[keys[1], 3] = ""
    write_blobs(log, tmp_path, skip={log.image_path[keys[4], 5]})
    sel = nuplan_select(log, FrameOptions(split="x"), tmp_path)
    assert sel.dropped == {"no_camera_image": 1, "missing_camera": 1}
    assert sel.key_sweeps.tolist() == [k for j, k in enumerate(keys.tolist()) if j not in (1, 4)]


def test_test_split_has_null_anns_and_filter_instance_drops_static_classes() -> None:
    log = make_log(40, boxes_per_sweep=7)
    opts = FrameOptions(split="test", is_test=True, check_blobs=False)
    table = build_frame_table(log, nuplan_select(log, opts, None), opts)
    assert table.column("anns").null_count == table.num_rows > 0
    opts = FrameOptions(split="x", filter_instance=True, check_blobs=False)
    rows = build_frame_table(log, nuplan_select(log, opts, None), opts).to_pylist()
    names = {n for r in rows for n in r["anns"]["gt_names"]}
    assert names == {"vehicle", "bicycle", "pedestrian"}


def test_split_tokens_restrict_rows() -> None:
    log = make_log(100)
    keys = openscene_key_frames(log, 10)
    wanted = log.sweep_token[keys[[0, 3]]].tolist()
    sel = nuplan_select(log, FrameOptions(split="x", check_blobs=False), None, tokens=wanted)
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
    table = build_frame_table(log, nuplan_select(log, opts, None), opts)
    assert pa.types.is_fixed_size_list(table.schema.field("ego2global").type)
    assert table.schema.metadata[b"driveengine.format_version"] == b"2"


def test_a_log_without_any_sensor_folder_is_an_error_not_an_empty_log(tmp_path: Path) -> None:
    log = make_log(40)
    with pytest.raises(SourceError, match="no sensor blobs") as info:
        nuplan_select(log, FrameOptions(split="x"), tmp_path)
    assert str(tmp_path / log.log_name) in str(info.value) and "--blob-root" in str(info.value)


# -- bad inputs: ego poses, broken blobs, non-finite rows -----------------------------------------------


def test_frames_with_a_non_finite_or_zero_ego_pose_are_dropped_and_the_command_ignores_them() -> None:
    log = make_log(80)
    options = FrameOptions(split="mini", check_blobs=False)
    good = build_frame_table(log, nuplan_select(log, options, None), options)
    log.ego_translation[20, 0] = np.nan
    log.ego_translation[40, 2] = np.inf
    log.ego_rotation[60] = 0.0
    sel = nuplan_select(log, options, None)
    assert sel.dropped == {"bad_ego_pose": 3}
    table = build_frame_table(log, sel, options)
    assert table.num_rows == good.num_rows - 3
    assert 20 not in sel.key_sweeps and 40 not in sel.key_sweeps and 60 not in sel.key_sweeps
    check_finite(table, "x.db", log.log_name)  # nothing non-finite reached the rows
    # The command of a kept frame is computed over the path without the bad poses.
    kept = good.filter(pa.compute.is_in(good.column("token"), table.column("token")))
    assert table.column("driving_command").to_pylist() == kept.column("driving_command").to_pylist()


def test_non_finite_rows_are_refused_naming_file_log_column_row_and_token() -> None:
    log = make_log(60)
    options = FrameOptions(split="mini", check_blobs=False)
    sel = nuplan_select(log, options, None)
    second = int(sel.key_sweeps[1])
    log.box_velocity[log.boxes(second).start + 1, 0] = np.nan  # one box of the second row
    table = build_frame_table(log, sel, options)
    token = log.sweep_token[second]
    with pytest.raises(NonFiniteError) as err:
        check_finite(table, "/data/x.db", log.log_name)
    message = str(err.value)
    assert message.startswith(
        f"/data/x.db: log {log.log_name}: column anns.gt_velocity_3d holds nan at row 1"
    )
    assert f"(token {token})" in message and "\n" not in message
    log = make_log(60)
    log.camera_intrinsic[3, 0, 0] = np.inf  # calibration the reader let through
    table = build_frame_table(log, sel, options)
    with pytest.raises(
        NonFiniteError, match=f"column cams.{CAMERA_CHANNELS[3]}.cam_intrinsic holds inf at row 0"
    ):
        check_finite(table, "/data/x.db", log.log_name)


def _float_leaves(dtype: pa.DataType, prefix: str) -> list[str]:
    if pa.types.is_struct(dtype):
        return [leaf for f in dtype for leaf in _float_leaves(f.type, f"{prefix}.{f.name}")]
    while pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype):
        dtype = dtype.value_type
    return [prefix] if pa.types.is_floating(dtype) else []


def test_every_float_column_is_declared_finite_once_and_the_schema_output_says_so() -> None:
    leaves = [leaf for f in FRAME_SCHEMA for leaf in _float_leaves(f.type, f.name)]
    leaves = sorted({re.sub(r"^cams\.CAM_\w+\.", "cams.*.", leaf) for leaf in leaves})
    assert sorted(FINITE_COLUMNS) == leaves
    described = {name: doc for name, _, doc in describe_schema()}
    assert described["anns.gt_velocity_3d"].endswith(FINITE_MARK)
    assert described["cams.<CAM_*>.cam_intrinsic"].endswith(FINITE_MARK)
    assert not described["token"].endswith(FINITE_MARK)


def test_jpeg_defects_from_the_head_and_tail_only(tmp_path: Path) -> None:
    cases = {
        "whole.jpg": TINY_JPEG,
        "padded.jpg": TINY_JPEG + b"\0" * 16,  # a little padding after the end marker is tolerated
        "trailer.jpg": TINY_JPEG + b"trailing bytes",
        "empty.jpg": b"",
        "tiny.jpg": b"\xff\xd8",
        "truncated.jpg": TINY_JPEG[:-40],
        "png.jpg": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    }
    found = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        found[name] = jpeg_defect(tmp_path / name)
    assert found["whole.jpg"] is None and found["padded.jpg"] is None and found["trailer.jpg"] is None
    assert "too short" in found["empty.jpg"] and "too short" in found["tiny.jpg"]
    assert "end marker" in found["truncated.jpg"] and "start marker" in found["png.jpg"]
    assert "cannot open" in jpeg_defect(tmp_path / "absent.jpg")
    # A real photo-like JPEG cut anywhere in its image data is never taken for whole.
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=92)
    data = buf.getvalue()
    for cut in range(len(data) // 4, len(data) - 2, 97):
        (tmp_path / "cut.jpg").write_bytes(data[:cut])
        assert jpeg_defect(tmp_path / "cut.jpg") is not None, cut


def test_pcd_defects_from_the_header_and_the_size(tmp_path: Path) -> None:
    xyz = {"x": np.arange(50, dtype=np.float32), "y": np.ones(50, np.float32), "z": np.zeros(50, np.float32)}
    for encoding in ("binary", "binary_compressed", "ascii"):
        whole = tmp_path / f"{encoding}.pcd"
        write_pcd(whole, xyz, encoding=encoding)
        assert pcd_defect(whole) is None, encoding
        data = whole.read_bytes()
        header_len = data.index(b"DATA") + data[data.index(b"DATA") :].index(b"\n") + 1
        cut = tmp_path / f"cut-{encoding}.pcd"
        cut.write_bytes(data[:header_len] if encoding == "ascii" else data[: header_len + 30])
        assert "truncated" in pcd_defect(cut), encoding
    (tmp_path / "trailing.pcd").write_bytes((tmp_path / "binary.pcd").read_bytes() + b"\0" * 7)  # as nuPlan's
    assert pcd_defect(tmp_path / "trailing.pcd") is None
    (tmp_path / "garbage.pcd").write_bytes(b"\x00\x01garbage" * 10)
    (tmp_path / "empty.pcd").write_bytes(b"")
    assert pcd_defect(tmp_path / "garbage.pcd") and pcd_defect(tmp_path / "empty.pcd")


def test_broken_blobs_drop_their_frames_with_counted_reasons(tmp_path: Path) -> None:
    log = make_log(80)
    write_blobs(log, tmp_path)
    options = FrameOptions(split="mini")
    keys = nuplan_select(log, options, tmp_path).key_sweeps
    (tmp_path / log.sweep_lidar_path[keys[1]]).write_bytes(TINY_PCD[:-5])  # truncated sweep
    (tmp_path / log.image_path[keys[2], 4]).write_bytes(b"")  # zero-byte image
    (tmp_path / log.image_path[keys[3], 0]).write_bytes(TINY_JPEG[: len(TINY_JPEG) // 2])  # truncated image
    (tmp_path / log.image_path[keys[3], 1]).write_bytes(b"")  # same frame, second broken image
    sel = nuplan_select(log, options, tmp_path)
    assert sel.dropped == {"broken_lidar": 1, "broken_image": 2}
    assert sel.key_sweeps.tolist() == [k for i, k in enumerate(keys.tolist()) if i not in (1, 2, 3)]
    assert len(sel.broken) == 4 and str(tmp_path / log.sweep_lidar_path[keys[1]]) in sel.broken[0]
    assert (
        "1 broken sweep file(s), their frames dropped" in sel.notes
        and "3 broken .jpg file(s), their frames dropped" in sel.notes
    )
    # Without blob checks nothing is read.
    assert nuplan_select(log, FrameOptions(split="mini", check_blobs=False), None).dropped == {}
