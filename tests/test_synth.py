"""The synthetic nuPlan world: files in nuPlan's schema, exact geometry, ground truth, faults."""

from __future__ import annotations

import io
import pickle
import re
import sqlite3
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from driveengine.schemas.classes import BACKGROUND, FREE
from driveengine.schemas.grid import GRID
from PIL import Image

from driveengine.geometry import invert_transform, make_transform, quaternion_to_matrix, transform_points
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES, CATEGORY_TO_CLASS
from driveengine.sources.pcd import read_pcd
from driveengine.synth import Faults, synthesize, world_for_log
from driveengine.synth.sensors import CLASS_COLOURS, GROUND_COLOUR, SKY_COLOUR
from driveengine.synth.world import EGO_Z_M

SECONDS = 1.5
RAYS = 2000
IMAGE_SIZE = (96, 54)
FAULTS = Faults(
    missing_pcd=(3, 7), missing_jpg=(("CAM_F0", 2), ("CAM_B0", 0)), camera_gap=("CAM_L2", 0.5, 1.0)
)

#: The nuPlan schema as reference §1 lists it (written out here independently of the writer).
REFERENCE_TABLES = {
    "log": "token vehicle_name date timestamp logfile location map_version",
    "ego_pose": "token timestamp x y z qw qx qy qz vx vy vz acceleration_x acceleration_y acceleration_z "
    "angular_rate_x angular_rate_y angular_rate_z epsg log_token",
    "camera": "token log_token channel model translation rotation intrinsic distortion width height",
    "image": "token next_token prev_token ego_pose_token camera_token filename_jpg timestamp",
    "lidar": "token log_token channel model translation rotation",
    "lidar_pc": "token next_token prev_token ego_pose_token lidar_token scene_token filename timestamp",
    "lidar_box": "token lidar_pc_token track_token next_token prev_token x y z width length height vx vy vz "
    "yaw confidence",
    "track": "token category_token width length height",
    "category": "token name description",
    "scene": "token log_token name goal_ego_pose_token roadblock_ids",
    "scenario_tag": "token lidar_pc_token type agent_track_token",
    "traffic_light_status": "token lidar_pc_token lane_connector_id status",
}


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    logs = synthesize(out, logs=1, seconds=SECONDS, seed=7, points=RAYS, image_size=IMAGE_SIZE, faults=FAULTS)
    return out, logs[0]


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _sweeps(conn: sqlite3.Connection) -> list[tuple]:
    """(timestamp, filename, global_from_ego (4x4)) per lidar_pc in time order, pose from the linked ego_pose."""
    rows = conn.execute(
        "SELECT lp.timestamp, lp.filename, e.x, e.y, e.z, e.qw, e.qx, e.qy, e.qz FROM lidar_pc lp "
        "JOIN ego_pose e ON e.token = lp.ego_pose_token ORDER BY lp.timestamp"
    ).fetchall()
    return [(r[0], r[1], make_transform(r[5:9], r[2:5])) for r in rows]


# -- independent geometry helpers (numpy, not the numba ray caster) ---------------------------------


def _to_box_frames(points: np.ndarray, centers: np.ndarray, yaws: np.ndarray) -> np.ndarray:
    """(P, B, 3) points in every box frame."""
    d = points[:, None, :] - centers[None, :, :]
    c, s = np.cos(yaws)[None], np.sin(yaws)[None]
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2]], axis=-1)


def _segments_hit_boxes(a: np.ndarray, b: np.ndarray, centers, sizes, yaws) -> np.ndarray:
    """(P, B) whether the open segment a->b (P, 3) passes through the interior of each box."""
    la = _to_box_frames(a, centers, yaws)
    lb = _to_box_frames(b, centers, yaws)
    d = lb - la
    half = 0.5 * sizes[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - la) / d
        t2 = (half - la) / d
    inside_slab = np.abs(la) < half
    lo = np.where(d == 0, np.where(inside_slab, -np.inf, np.inf), np.minimum(t1, t2))
    hi = np.where(d == 0, np.where(inside_slab, np.inf, -np.inf), np.maximum(t1, t2))
    t_in = np.maximum(lo.max(axis=-1), 0.0)
    t_out = np.minimum(hi.min(axis=-1), 1.0)
    return t_out - t_in > 1e-6


def _boxes_overlap_2d(c1, s1, y1, c2, s2, y2, margin: float = 0.0) -> np.ndarray:
    """Separating-axis overlap of oriented rectangles (arrays broadcast), with a clearance margin."""
    overlap = np.ones(np.broadcast_shapes(np.shape(y1), np.shape(y2)), dtype=bool)
    d = c2 - c1
    for yaw in (y1, y2):
        for axis in (0.0, np.pi / 2):
            u = np.stack([np.cos(yaw + axis), np.sin(yaw + axis)], axis=-1)
            proj = np.abs((d * u).sum(-1))
            r1 = 0.5 * (
                s1[..., 0] * np.abs(np.cos(y1 - yaw - axis)) + s1[..., 1] * np.abs(np.sin(y1 - yaw - axis))
            )
            r2 = 0.5 * (
                s2[..., 0] * np.abs(np.cos(y2 - yaw - axis)) + s2[..., 1] * np.abs(np.sin(y2 - yaw - axis))
            )
            overlap &= proj < r1 + r2 + margin
    return overlap


# -- the database ---------------------------------------------------------------------------------


def test_every_reference_table_and_column_exists_with_token_indexes(synth_run) -> None:
    _, log = synth_run
    conn = _connect(log.db_path)
    for table, columns in REFERENCE_TABLES.items():
        got = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        assert got == columns.split(), table
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] > 0, f"{table} is empty"
        indexed: set[str] = set()
        for (index_name,) in conn.execute(
            f"SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='{table}'"
        ):
            indexed |= {r[2] for r in conn.execute(f"PRAGMA index_info({index_name})")}
        for col in columns.split():
            if col == "token" or col.endswith("_token"):
                assert col in indexed, f"{table}.{col} has no index"
    assert [r[0] for r in conn.execute("SELECT name FROM category ORDER BY name")] == sorted(CATEGORIES)
    assert conn.execute("SELECT channel FROM lidar").fetchall() == [("MergedPointCloud",)]


def test_tokens_names_paths_and_rates(synth_run) -> None:
    _, log = synth_run
    conn = _connect(log.db_path)
    assert re.fullmatch(r"\d{4}\.\d\d\.\d\d\.\d\d\.\d\d\.\d\d_veh-\d+_\d{5}_\d{5}", log.log_name)
    assert conn.execute("SELECT logfile FROM log").fetchone()[0] == log.log_name
    for table in REFERENCE_TABLES:
        types = conn.execute(f"SELECT DISTINCT typeof(token), length(token) FROM {table}").fetchall()
        assert types == [("blob", 8)], table
    sweeps = conn.execute("SELECT timestamp, filename, token FROM lidar_pc ORDER BY timestamp").fetchall()
    ts = np.array([s[0] for s in sweeps])
    assert len(ts) == round(SECONDS * 20)
    assert np.all(np.diff(ts) == 50_000) and 1.6e15 < ts[0] < 1.7e15
    for _, filename, token in sweeps:
        assert filename == f"{log.log_name}/MergedPointCloud/{token.hex()}.pcd"
    for filename, token, channel in conn.execute(
        "SELECT i.filename_jpg, i.token, c.channel FROM image i JOIN camera c ON c.token = i.camera_token"
    ):
        assert filename == f"{log.log_name}/{channel}/{token.hex()}.jpg"
    # the linked ego pose is close in time but not at the same timestamp
    dt = np.array(
        conn.execute(
            "SELECT lp.timestamp - e.timestamp FROM lidar_pc lp JOIN ego_pose e ON e.token = lp.ego_pose_token"
        ).fetchall()
    ).ravel()
    assert np.all(np.abs(dt) <= 5_000) and np.all(dt != 0)
    # every even sweep has all eight cameras within +-50 ms, except CAM_L2 during its gap
    cameras = []
    for t in ts[::2]:
        n = conn.execute(
            "SELECT COUNT(DISTINCT camera_token) FROM image WHERE ABS(timestamp - ?) <= 50000", (int(t),)
        ).fetchone()[0]
        sec = (t - ts[0]) / 1e6
        assert n == 8 or (n == 7 and 0.45 <= sec <= 1.05), (sec, n)
        cameras.append(n)
    assert 7 in cameras


def test_rows_are_inserted_shuffled(synth_run) -> None:
    _, log = synth_run
    conn = _connect(log.db_path)
    for table, col in (("lidar_pc", "timestamp"), ("ego_pose", "timestamp"), ("image", "timestamp")):
        values = [r[0] for r in conn.execute(f"SELECT {col} FROM {table} ORDER BY rowid")]
        assert values != sorted(values), f"{table} rows are in time order"


def test_lidar_boxes_match_ground_truth(synth_run) -> None:
    _, log = synth_run
    conn = _connect(log.db_path)
    world = log.world
    for ts in world.lidar_timestamps_us[[0, -1]].tolist():
        rows = conn.execute(
            "SELECT b.track_token, b.x, b.y, b.z, b.length, b.width, b.height, b.yaw, b.vx, b.vy, c.name "
            "FROM lidar_box b JOIN lidar_pc lp ON lp.token = b.lidar_pc_token "
            "JOIN track t ON t.token = b.track_token JOIN category c ON c.token = t.category_token "
            "WHERE lp.timestamp = ?",
            (ts,),
        ).fetchall()
        truth = world.boxes_at(ts, max_range_m=60.0)
        assert len(rows) == len(truth) > 5
        by_token = {r[0].hex(): r for r in rows}
        for i, token in enumerate(truth.track_token):
            r = by_token[token]
            np.testing.assert_allclose(r[1:4], truth.center[i], atol=1e-9)
            np.testing.assert_allclose(r[4:7], truth.size[i], atol=1e-12)
            np.testing.assert_allclose(r[8:10], truth.velocity[i, :2], atol=1e-9)
            assert r[10] == truth.category[i]
    # partial tracks exist: some track has boxes in only part of the log
    per_track = conn.execute("SELECT COUNT(*) FROM lidar_box GROUP BY track_token").fetchall()
    assert min(c for (c,) in per_track) < len(world.lidar_timestamps_us)


def test_ego_pose_rows_are_consistent_with_their_motion(synth_run) -> None:
    _, log = synth_run
    conn = _connect(log.db_path)
    rows = np.array(
        conn.execute(
            "SELECT timestamp, x, y, z, qw, qx, qy, qz, vx, vy, angular_rate_z, acceleration_x FROM ego_pose "
            "ORDER BY timestamp"
        ).fetchall()
    )
    t = rows[:, 0] / 1e6
    xyz, q = rows[:, 1:4], rows[:, 4:8]
    assert np.allclose(xyz[:, 2], EGO_Z_M)
    r = quaternion_to_matrix(q)
    v_global = np.gradient(xyz, t, axis=0)
    v_ego = np.einsum("nji,nj->ni", r, v_global)  # R^T v
    np.testing.assert_allclose(v_ego[2:-2, :2], rows[2:-2, 8:10], atol=0.05)
    np.testing.assert_allclose(np.gradient(rows[:, 8], t)[2:-2], rows[2:-2, 11], atol=0.05)
    yaw = np.unwrap(np.arctan2(r[:, 1, 0], r[:, 0, 0]))
    np.testing.assert_allclose(np.gradient(yaw, t)[2:-2], rows[2:-2, 10], atol=0.02)


# -- the LiDAR ----------------------------------------------------------------------------------


def _read_sweep(out: Path, log, index: int):
    conn = _connect(log.db_path)
    ts, filename, global_from_ego = _sweeps(conn)[index]
    cloud = read_pcd(out / "sensor_blobs" / filename)
    xyz = np.column_stack([cloud.fields["x"], cloud.fields["y"], cloud.fields["z"]]).astype(np.float64)
    return ts, global_from_ego, xyz, cloud


def test_points_lie_on_real_surfaces_and_nothing_is_seen_through_solids(synth_run) -> None:
    out, log = synth_run
    world = log.world
    for index in (0, 20):
        ts, global_from_ego, xyz, cloud = _read_sweep(out, log, index)
        assert 0.5 * RAYS < len(xyz) <= RAYS + 64
        assert set(np.unique(cloud.fields["ring"]).astype(int)) <= set(range(64))
        p = transform_points(global_from_ego, xyz)
        solids = world.solids_at(ts)
        local = _to_box_frames(p, solids.center, solids.yaw)
        half = 0.5 * solids.size[None]
        inside = np.all(np.abs(local) <= half + 0.01, axis=-1)
        on_face = np.any(np.abs(np.abs(local) - half) <= 0.01, axis=-1)
        on_solid = (inside & on_face).any(axis=1)
        on_ground = np.abs(p[:, 2]) <= 0.01
        assert np.all(on_solid | on_ground), f"{np.sum(~(on_solid | on_ground))} points float in the air"
        assert on_solid.sum() > 20 and on_ground.sum() > 20
        # occlusion: the segment from the sensor to each point (stopping 2 cm short) crosses no solid
        origin = transform_points(global_from_ego @ world.ego_from_lidar, np.zeros((1, 3)))
        ray = p - origin
        end = origin + ray * (1.0 - 0.02 / np.linalg.norm(ray, axis=1, keepdims=True))
        blocked = _segments_hit_boxes(
            np.broadcast_to(origin, p.shape), end, solids.center, solids.size, solids.yaw
        )
        assert not blocked.any(), f"{blocked.any(axis=1).sum()} points are seen through a solid"
        assert np.all(end[:, 2] > -1e-6)  # and never through the ground
        # hidden faces: a point on a box face whose outward normal points away from the sensor is impossible
        owner = np.where(inside & on_face, np.arange(len(solids))[None], -1).max(axis=1)
        has = owner >= 0
        lp = local[np.flatnonzero(has), owner[has]]
        face = np.argmax(np.abs(lp) / half[0, owner[has]], axis=1)
        normal_local = np.zeros_like(lp)
        normal_local[np.arange(len(lp)), face] = np.sign(lp[np.arange(len(lp)), face])
        yaw = solids.yaw[owner[has]]
        n_global = np.column_stack(
            [
                np.cos(yaw) * normal_local[:, 0] - np.sin(yaw) * normal_local[:, 1],
                np.sin(yaw) * normal_local[:, 0] + np.cos(yaw) * normal_local[:, 1],
                normal_local[:, 2],
            ]
        )
        assert np.all((n_global * (origin - p[has])).sum(axis=1) > 0), (
            "points on faces turned away from the sensor"
        )


def test_intensity_and_lidar_calibration(synth_run) -> None:
    out, log = synth_run
    _, _, xyz, cloud = _read_sweep(out, log, 0)
    assert set(cloud.fields) >= {"x", "y", "z", "intensity", "ring", "lidar_info"}
    ground = np.abs(xyz[:, 2] + EGO_Z_M) < 0.01  # the ground is at ego z = -0.3
    assert ground.sum() > 100
    assert len(np.unique(cloud.fields["intensity"][~ground])) > 1


# -- ground truth ----------------------------------------------------------------------------------


def test_occupancy_contains_every_box_with_its_class_and_flow() -> None:
    world = world_for_log(7, 0, SECONDS)
    ts = int(world.lidar_timestamps_us[10])
    sem, flow = world.occupancy(ts), world.flow(ts)
    assert sem.shape == GRID.shape and sem.dtype == np.uint8 and flow.shape == (*GRID.shape, 2)
    ego_from_global = invert_transform(world.frame_pose(ts))
    boxes = world.boxes_at(ts)
    lattice = (np.stack(np.meshgrid(*[np.linspace(-0.45, 0.45, 5)] * 3, indexing="ij"), -1)).reshape(-1, 3)
    checked = 0
    for i in range(len(boxes)):
        c, s = np.cos(boxes.yaw[i]), np.sin(boxes.yaw[i])
        local = lattice * boxes.size[i]
        glob = boxes.center[i] + np.column_stack(
            [c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]]
        )
        ego = transform_points(ego_from_global, glob)
        ijk = np.floor((ego - np.array(GRID.range_min_m)) / GRID.voxel_size_m).astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.array(GRID.shape)), axis=1)
        if not ok.any():
            continue
        got = sem[tuple(ijk[ok].T)]
        cls = CATEGORY_TO_CLASS[boxes.category[i]]
        assert np.all(got <= cls), "a box voxel is free, background or of a higher class"
        assert np.mean(got == cls) > 0.5
        owned = got == cls
        v_ego = (ego_from_global[:3, :3] @ boxes.velocity[i])[:2]
        np.testing.assert_allclose(
            flow[tuple(ijk[ok][owned].T)], np.broadcast_to(v_ego, (owned.sum(), 2)), atol=1e-4
        )
        checked += 1
    assert checked > 10
    # conversely, every object voxel touches a box of its class: its centre is within the box grown by
    # half a voxel (x, y: half the voxel diagonal), in the box frame
    occupied = np.argwhere(sem < BACKGROUND)
    centres_ego = np.array(GRID.range_min_m) + (occupied + 0.5) * GRID.voxel_size_m
    centres = transform_points(world.frame_pose(ts), centres_ego)
    local = _to_box_frames(centres, boxes.center, boxes.yaw)
    grow = np.array([np.sqrt(0.5), np.sqrt(0.5), 0.5]) * GRID.voxel_size_m + 1e-9
    near = np.all(np.abs(local) <= 0.5 * boxes.size[None] + grow, axis=-1)
    same_class = sem[tuple(occupied.T)][:, None] == boxes.class_id[None, :]
    assert np.all((near & same_class).any(axis=1)), "object voxels away from every box of their class"
    # the ground layer (ego z = -0.3 lies in voxel layer 7 of [-4, 4)) is background wherever no object is
    layer = sem[:, :, 7]
    assert np.all((layer == BACKGROUND) | (layer < BACKGROUND))
    assert np.all(flow[sem >= BACKGROUND] == 0) and np.any(flow[sem < BACKGROUND] != 0)
    assert (sem == FREE).mean() > 0.5


def test_static_only_world_has_zero_flow_and_fixed_boxes() -> None:
    world = world_for_log(7, 0, SECONDS, static_only=True)
    ts = world.lidar_timestamps_us
    assert not np.any(world.flow(int(ts[-1])))
    a, b = world.boxes_at(int(ts[0])), world.boxes_at(int(ts[-1]))
    np.testing.assert_array_equal(a.track_token, b.track_token)
    np.testing.assert_allclose(a.center, b.center)
    assert np.linalg.norm(world.ego_pose(int(ts[-1]))[:3, 3] - world.ego_pose(int(ts[0]))[:3, 3]) > 1.0


def test_solids_never_overlap_each_other_or_the_ego() -> None:
    world = world_for_log(3, 1, 60.0)
    for ts in world.lidar_timestamps_us[::100].tolist():
        s = world.solids_at(ts)
        c, size, yaw = s.center[:, :2], s.size, s.yaw
        ov = _boxes_overlap_2d(c[:, None], size[:, None], yaw[:, None], c[None], size[None], yaw[None])
        np.fill_diagonal(ov, False)
        assert not ov.any(), f"overlapping solids at {ts}: {np.argwhere(ov)[:3]}"
        ego = world.ego_state(ts)
        # the ego body: 5 m x 2 m, rear axle 1 m from its back
        centre = ego.translation[0, :2] + 1.5 * np.array([np.cos(ego.yaw[0]), np.sin(ego.yaw[0])])
        hit = _boxes_overlap_2d(centre, np.array([5.0, 2.0]), ego.yaw[0], c, size, yaw, margin=0.2)
        assert not hit.any(), f"the ego hits a solid at {ts}"


def test_ego_route_turns_stops_and_restarts() -> None:
    world = world_for_log(0, 0, 30.0)
    st = world.ego_state(world.lidar_timestamps_us)
    speed = st.velocity[:, 0]
    assert speed.max() > 8.0 and np.any(speed == 0.0)
    stopped = np.flatnonzero(speed == 0.0)
    assert speed[stopped[-1] + 1 :].max() > 1.0  # accelerates again
    assert np.abs(st.angular_rate[:, 2]).max() > 0.3  # turns
    # the reported derivatives are those of the trajectory itself (finite differences at 1 kHz)
    ts = world.t0_us + np.arange(0, 30_000_000, 1_000)
    fine = world.ego_state(ts)
    t = (ts - ts[0]) / 1e6
    r = quaternion_to_matrix(fine.rotation)
    v_ego = np.einsum("nji,nj->ni", r, np.gradient(fine.translation, t, axis=0))
    np.testing.assert_allclose(v_ego[1:-1], fine.velocity[1:-1], atol=2e-3)
    np.testing.assert_allclose(
        np.gradient(fine.velocity[:, 0], t)[1:-1], fine.acceleration[1:-1, 0], atol=2e-2
    )
    rate = fine.angular_rate[:, 2]
    smooth = np.zeros(len(rate), dtype=bool)  # skip the samples next to a curvature step
    smooth[1:-1] = np.abs(rate[2:] - rate[:-2]) < 0.01
    np.testing.assert_allclose(np.gradient(np.unwrap(fine.yaw), t)[smooth], rate[smooth], atol=0.01)
    assert smooth.mean() > 0.99
    np.testing.assert_allclose(fine.acceleration[:, 1], fine.velocity[:, 0] * fine.angular_rate[:, 2])


# -- cameras ---------------------------------------------------------------------------------------


class _Permissive(pickle.Unpickler):
    """Loads the devkit calibration types as this test's own list subclasses (nuplan-devkit absent)."""

    classes: ClassVar[dict[str, type]] = {
        name: type(name, (list,), {}) for name in ("Translation", "Rotation", "CameraIntrinsic")
    }

    def find_class(self, module: str, name: str):
        if module == "nuplan.database.common.data_types":
            return self.classes[name]
        if module in ("builtins", "copyreg"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _load(blob: bytes):
    return _Permissive(io.BytesIO(blob)).load()


def test_calibration_pickles_hold_the_devkit_types_and_values(synth_run) -> None:
    _, log = synth_run
    conn = _connect(log.db_path)
    assert "nuplan" not in sys.modules  # the fake devkit module only existed while pickling
    cams = {c.channel: c for c in log.world.cameras}
    rows = conn.execute(
        "SELECT channel, translation, rotation, intrinsic, distortion, width, height FROM camera"
    ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(CAMERA_CHANNELS)
    for ch, tr, rot, intr, dist, w, h in rows:
        t, q, k, d = _load(tr), _load(rot), _load(intr), _load(dist)
        assert type(t).__name__ == "Translation" and type(q).__name__ == "Rotation"
        assert type(k).__name__ == "CameraIntrinsic"
        np.testing.assert_allclose(t, cams[ch].translation)
        np.testing.assert_allclose(q, cams[ch].rotation)
        np.testing.assert_allclose(np.array(k), cams[ch].intrinsic)
        assert d == [0.0] * 5 and (w, h) == IMAGE_SIZE
        # camera frame: z (optical axis) column of R, x right / y down (OpenCV)
        r = quaternion_to_matrix(q)
        assert r[2, 1] < -0.99  # camera y (down) is ego -z
    lt, lq = conn.execute("SELECT translation, rotation FROM lidar").fetchone()
    ego_from_lidar = make_transform(_load(lq), _load(lt))
    np.testing.assert_allclose(ego_from_lidar, log.world.ego_from_lidar, atol=1e-12)
    assert not np.allclose(ego_from_lidar[:3, :3], np.eye(3))


def test_plain_list_calibration_option(tmp_path: Path) -> None:
    (log,) = synthesize(tmp_path, logs=1, seconds=0.2, blobs=False, calibration_pickle="list")
    blob = _connect(log.db_path).execute("SELECT intrinsic FROM camera").fetchone()[0]
    assert type(pickle.loads(blob)) is list


def _nearest_colour(rgb: np.ndarray) -> int | str:
    palette = {**CLASS_COLOURS, "ground": GROUND_COLOUR, "sky": SKY_COLOUR}
    v = rgb / max(np.linalg.norm(rgb), 1e-9)
    return max(palette, key=lambda k: float(np.dot(v, np.array(palette[k]) / np.linalg.norm(palette[k]))))


def test_a_visible_object_is_where_the_calibration_projects_it(synth_run) -> None:
    out, log = synth_run
    conn = _connect(log.db_path)
    world = log.world
    checked = 0
    rows = conn.execute(
        "SELECT c.channel, c.translation, c.rotation, c.intrinsic, i.filename_jpg, i.timestamp, "
        "e.x, e.y, e.z, e.qw, e.qx, e.qy, e.qz FROM image i JOIN camera c ON c.token = i.camera_token "
        "JOIN ego_pose e ON e.token = i.ego_pose_token ORDER BY i.timestamp"
    ).fetchall()
    for ch, tr, rot, intr, filename, ts, *pose in rows[::3]:
        path = out / "sensor_blobs" / filename
        if not path.exists():
            continue
        global_from_cam = make_transform(pose[3:7], pose[0:3]) @ make_transform(_load(rot), _load(tr))
        k = np.array(_load(intr))
        solids = world.solids_at(ts)
        objects = np.flatnonzero(solids.track_index >= 0)
        cam = transform_points(invert_transform(global_from_cam), solids.center[objects])
        origin = global_from_cam[:3, 3]
        image = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
        for j, p in zip(objects, cam, strict=True):
            if p[2] < 1.0:
                continue
            u, v = (k @ p)[:2] / p[2]
            size_px = k[0, 0] * solids.size[j, 1] / p[2]
            if not (3 <= u < IMAGE_SIZE[0] - 3 and 3 <= v < IMAGE_SIZE[1] - 3) or size_px < 6:
                continue
            # the centre is visible if the segment camera -> centre only enters this object
            blocked = _segments_hit_boxes(
                origin[None], solids.center[j][None], solids.center, solids.size, solids.yaw
            )[0]
            blocked[j] = False
            if blocked.any():
                continue
            patch = image[int(v) - 1 : int(v) + 2, int(u) - 1 : int(u) + 2].reshape(-1, 3).mean(axis=0)
            assert _nearest_colour(patch) == solids.class_id[j], (ch, ts, j, patch)
            checked += 1
    assert checked >= 3


# -- faults, determinism, command line ---------------------------------------------------------------


def test_faults_produce_missing_files_and_rows(synth_run) -> None:
    out, log = synth_run
    conn = _connect(log.db_path)
    sweeps = _sweeps(conn)
    for i, (_, filename, _) in enumerate(sweeps):
        assert (out / "sensor_blobs" / filename).exists() == (i not in FAULTS.missing_pcd)
    missing = {f for f in log.missing_files}
    assert len(missing) == len(FAULTS.missing_pcd) + len(FAULTS.missing_jpg)
    for ch, k in FAULTS.missing_jpg:
        files = [
            r[0]
            for r in conn.execute(
                "SELECT filename_jpg FROM image i JOIN camera c ON c.token = i.camera_token WHERE c.channel = ? "
                "ORDER BY i.timestamp",
                (ch,),
            )
        ]
        assert not (out / "sensor_blobs" / files[k]).exists() and files[k] in missing
        assert all((out / "sensor_blobs" / f).exists() for i, f in enumerate(files) if i != k)
    t0 = sweeps[0][0]
    gap = conn.execute(
        "SELECT COUNT(*) FROM image i JOIN camera c ON c.token = i.camera_token WHERE c.channel = 'CAM_L2' "
        "AND i.timestamp >= ? AND i.timestamp < ?",
        (t0 + 500_000, t0 + 1_000_000),
    ).fetchone()[0]
    outside = conn.execute(
        "SELECT COUNT(*) FROM image i JOIN camera c ON c.token = i.camera_token WHERE c.channel = 'CAM_L2'"
    ).fetchone()[0]
    assert gap == 0 and outside >= 8


def test_a_camera_gap_over_the_whole_log_empties_the_channel_and_collect_reports_it(tmp_path: Path) -> None:
    from driveengine.collect.runner import CollectConfig, collect

    faults = {"camera_gap": ("CAM_B0", 0.0, 100.0)}  # longer than the log: every CAM_B0 image is gone
    (log,) = synthesize(
        tmp_path / "in", logs=1, seconds=1.5, seed=2, points=256, image_size=(32, 18), faults=faults
    )
    conn = _connect(log.db_path)
    per_channel = dict(
        conn.execute(
            "SELECT c.channel, COUNT(i.token) FROM camera c LEFT JOIN image i ON i.camera_token = c.token "
            "GROUP BY c.channel"
        ).fetchall()
    )
    assert per_channel["CAM_B0"] == 0 and all(per_channel[ch] > 0 for ch in CAMERA_CHANNELS if ch != "CAM_B0")
    assert not (tmp_path / "in" / "sensor_blobs" / log.log_name / "CAM_B0").exists()
    summary = collect(
        CollectConfig.from_options(
            source="nuplan", root=tmp_path / "in", out=tmp_path / "out", labels=False, progress=False
        ),
        echo=lambda _: None,
    )
    assert summary.ok and list(summary.empty) == [log.log_name], summary.format()
    assert "all 8 cameras" in summary.empty[log.log_name]
    assert summary.dropped == {"no_frame_with_all_cameras": 3}


def _dump(db: Path) -> dict[str, list]:
    conn = _connect(db)
    return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in REFERENCE_TABLES}


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(logs=1, seconds=0.3, points=500, image_size=(32, 18), key_frames_only=True)
    a = synthesize(tmp_path / "a", seed=5, **kw)[0]
    b = synthesize(tmp_path / "b", seed=5, **kw)[0]
    c = synthesize(tmp_path / "c", seed=6, **kw)[0]
    assert _dump(a.db_path) == _dump(b.db_path)
    assert _dump(a.db_path) != _dump(c.db_path) and a.log_name != c.log_name
    pcds = sorted((tmp_path / "a" / "sensor_blobs").rglob("*.pcd"))
    assert len(pcds) == 1  # key frames only: sweep 0 of 6
    files = [f for f in sorted((tmp_path / "a" / "sensor_blobs").rglob("*")) if f.is_file()]
    assert len(files) == 1 + 8 * 3  # one sweep and 3 images per camera
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_cli_writes_logs_and_prints_a_summary(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from driveengine.cli import app

    result = CliRunner().invoke(
        app,
        ["synth", "--out", str(tmp_path), "--logs", "2", "--seconds", "0.5", "--no-blobs", "--split", "val"],
    )
    assert result.exit_code == 0, result.output
    dbs = sorted((tmp_path / "splits" / "val").glob("*.db"))
    assert len(dbs) == 2 and "10 sweeps" in result.output and "wrote 2 logs" in result.output
    bad = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--image-size", "wide"])
    assert bad.exit_code != 0
