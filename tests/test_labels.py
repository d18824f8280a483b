"""Invariants of the label generator (driveengine/collect/labels.py) on small hand-made worlds.

The world is defined in the global frame (ground points, a wall, boxes with points inside them); each
sweep's points are expressed in that sweep's ego frame, as a LiDAR reports them.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from driveengine.schemas import FREE, GRID
from driveengine.schemas.classes import BACKGROUND
from driveengine.schemas.occ import OCC_ARRAYS

from driveengine.geometry import invert_transform, make_transform, transform_points, yaw_to_quaternion
from driveengine.labels.generator import (
    LabelConfig,
    LabelError,
    LabelGenerator,
    label_sweep_set,
    write_log_labels,
)
from driveengine.sources.logdata import LogData
from driveengine.sources.nuplan import NuplanSource
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES, CATEGORY_CLASS
from driveengine.store.occ import OccStorage, open_occ

UTM = np.array([664_000.0, 3_997_000.0, 0.0])  # far from the origin, like real nuPlan poses


def make_log(
    ts_us: np.ndarray,
    global_from_ego: np.ndarray,
    boxes: list[list[dict]],
    ego_from_lidar: np.ndarray | None = None,
) -> LogData:
    """A LogData with the given sweeps, poses (N, 4, 4) and boxes (per sweep: dicts of track, cat,
    center, size, yaw, vel); cameras absent."""
    n, c = len(ts_us), 8
    off = np.zeros(n + 1, np.int64)
    off[1:] = np.cumsum([len(b) for b in boxes])
    flat = [b for bs in boxes for b in bs]
    m = len(flat)
    from driveengine.geometry import matrix_to_quaternion

    def col(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.array([b[key] for b in flat], dtype=float).reshape(shape)

    lidar = np.eye(4) if ego_from_lidar is None else ego_from_lidar
    return LogData(
        source="test", path="/test/log.db", log_name="log", log_token="00" * 8, vehicle_name="v",
        location="x", map_version="m", lidar_token="11" * 8, ego_from_lidar=lidar,
        sweep_token=np.array([f"{i:016x}" for i in range(n)]), sweep_timestamp_us=np.asarray(ts_us, np.int64),
        sweep_lidar_path=np.array([f"log/MergedPointCloud/{i:016x}.pcd" for i in range(n)]),
        sweep_scene=np.zeros(n, np.int32), ego_translation=global_from_ego[:, :3, 3].copy(),
        ego_rotation=matrix_to_quaternion(global_from_ego[:, :3, :3]),
        ego_velocity=np.zeros((n, 3)), ego_acceleration=np.zeros((n, 3)), ego_angular_rate=np.zeros((n, 3)),
        camera_token=np.array([""] * c), camera_translation=np.zeros((c, 3)),
        camera_rotation=np.tile([1.0, 0, 0, 0], (c, 1)), camera_intrinsic=np.tile(np.eye(3), (c, 1, 1)),
        camera_distortion=np.zeros((c, 5)), camera_size=np.zeros((c, 2), np.int32),
        image_path=np.full((n, c), ""), image_timestamp_us=np.full((n, c), -1, np.int64),
        box_offsets=off, box_token=np.array([f"{i:016x}" for i in range(m)], dtype=str).reshape(m),
        box_track_token=np.array([b["track"] for b in flat], dtype=str).reshape(m),
        box_category=np.array([CATEGORIES.index(b["cat"]) for b in flat], np.int8).reshape(m),
        box_center=col("center", (m, 3)), box_size=col("size", (m, 3)), box_yaw=col("yaw", (m,)),
        box_velocity=col("vel", (m, 3)), box_confidence=np.ones(m),
        scene_token=np.array(["22" * 8]), scene_name=np.array(["s"]), scene_roadblock_ids=[[]],
        traffic_light_offsets=np.zeros(n + 1, np.int64), traffic_light_lane_connector_id=np.zeros(0, np.int64),
        traffic_light_status=np.zeros(0, np.int8), tag_offsets=np.zeros(n + 1, np.int64),
        tag_type=np.zeros(0, str), tag_agent_track_token=np.zeros(0, str),
        camera_channels=CAMERA_CHANNELS, categories=CATEGORIES,
        category_class=np.array(CATEGORY_CLASS, dtype=np.uint8),
    )  # fmt: skip


class World:
    """A hand-made world: ego driving and turning, ground/wall points, cars with points inside them.

    Args:
        n: sweeps (2 Hz, all key frames unless the test picks fewer).
        cars: list of (track, start centre (3,), velocity (3,), yaw, first sweep, last sweep).
        ground, wall: include static ground / wall points.
        world_from_global: a rigid motion applied to the whole world (poses, boxes, velocities).
    """

    def __init__(
        self,
        n: int = 9,
        cars: list[tuple] | None = None,
        ground: bool = True,
        wall: bool = True,
        points_per_car: int = 800,
        world_from_global: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        self.n = n
        self.ts = np.arange(n, dtype=np.int64) * 500_000 + 1_600_000_000_000_000
        t = np.arange(n) * 0.5
        yaw = 0.05 * t
        pos = UTM + np.stack([4.0 * t, 0.5 * t**2 * 0.2, np.full(n, 0.3)], axis=1)
        self.global_from_ego = make_transform(yaw_to_quaternion(yaw), pos)
        self.cars = (
            cars if cars is not None else [("aa" * 8, [12.0, -8.0, 0.75], [0.0, 3.0, 0.0], 1.2, 0, n - 1)]
        )
        self.size = np.array([4.0, 1.8, 1.5])
        rng = np.random.default_rng(seed)
        self.static_global = []
        if ground:
            g = rng.uniform([-30, -30, 0], [60, 30, 0], (6000, 3))
            self.static_global.append(g + UTM)
        if wall:
            w = np.stack([np.full(1500, 30.2), rng.uniform(-20, 20, 1500), rng.uniform(0.1, 3.0, 1500)], 1)
            self.static_global.append(w + UTM)
        self.points_per_car = points_per_car
        self.seed = seed
        self.w = np.eye(4) if world_from_global is None else world_from_global

    def box(self, car: int, k: int) -> dict | None:
        track, c0, v, yaw, first, last = self.cars[car]
        if not first <= k <= last:
            return None
        center = UTM + np.asarray(c0) + np.asarray(v) * 0.5 * k
        return {"track": track, "cat": "vehicle", "center": center, "size": self.size, "yaw": yaw, "vel": v}

    def log(self) -> LogData:
        w = self.w
        boxes = []
        for k in range(self.n):
            row = []
            for c in range(len(self.cars)):
                b = self.box(c, k)
                if b is not None:
                    b = dict(b)
                    b["center"] = transform_points(w, np.asarray(b["center"])[None])[0]
                    b["vel"] = np.asarray(b["vel"]) @ w[:3, :3].T
                    b["yaw"] = b["yaw"] + np.arctan2(w[1, 0], w[0, 0])
                    row.append(b)
            boxes.append(row)
        return make_log(self.ts, w @ self.global_from_ego, boxes)

    def points(self, k: int) -> np.ndarray:
        """Sweep k's points in its ego frame (independent of ``world_from_global``)."""
        parts = list(self.static_global)
        for c in range(len(self.cars)):
            b = self.box(c, k)
            if b is not None:
                rng = np.random.default_rng([self.seed, c, k])  # new returns every sweep
                local = rng.uniform(-0.5, 0.5, (self.points_per_car, 3)) * self.size * 0.98
                gb = make_transform(yaw_to_quaternion(b["yaw"]), b["center"])
                parts.append(transform_points(gb, local))
        glob = np.concatenate(parts) if parts else np.zeros((0, 3))
        return transform_points(invert_transform(self.global_from_ego[k]), glob).astype(np.float32)


def run(world: World, config: LabelConfig | None = None, keys: np.ndarray | None = None, load=None, log=None):
    log = world.log() if log is None else log
    keys = np.arange(world.n) if keys is None else keys
    gen = LabelGenerator(log, keys, load or world.points, config or LabelConfig(window_s=10.0))
    frames = [tuple(a.copy() for a in f[:3]) for f in gen.frames()]
    return frames, gen.stats


def voxel_centres_of(mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask)
    return np.asarray(GRID.range_min_m) + (ijk + 0.5) * GRID.voxel_size_m


# -- the algorithm -----------------------------------------------------------------------------------


def test_a_single_box_yields_voxels_only_inside_it_all_of_its_class_with_its_velocity() -> None:
    world = World(ground=False, wall=False, points_per_car=100)
    frames, stats = run(world)
    single = int(np.count_nonzero(run(world, LabelConfig(window_s=0.0, whole_track=False))[0][4][0] != FREE))
    for k, (sem, flow, _mask) in enumerate(frames):
        occupied = sem != FREE
        assert occupied.any()
        assert np.all(sem[occupied] == 0)  # vehicle
        # every occupied voxel overlaps the car's box at t (centre within half a voxel diagonal)
        b = world.box(0, k)
        ego_from_box = invert_transform(world.global_from_ego[k]) @ make_transform(
            yaw_to_quaternion(b["yaw"]), b["center"]
        )
        q = transform_points(invert_transform(ego_from_box), voxel_centres_of(occupied))
        assert np.all(np.abs(q) <= world.size / 2 + np.sqrt(3) * GRID.voxel_size_m / 2 + 1e-6)
        # its velocity, rotated into ego_t
        v_ego = (invert_transform(world.global_from_ego[k])[:3, :3] @ np.asarray(b["vel"]))[:2]
        np.testing.assert_allclose(flow[occupied], np.broadcast_to(v_ego, flow[occupied].shape), atol=2e-3)
        assert not flow[~occupied].any()
    # aggregation: the window fills more of the box than one sweep
    assert np.count_nonzero(frames[4][0] != FREE) > single
    assert stats.object_points + stats.ground_band_points == world.n * 100
    assert stats.ground_band_points > 0 and stats.object_points_dropped == 0


def test_static_points_are_moved_into_the_key_frames_ego_frame() -> None:
    world = World(cars=[], ground=False, wall=True)
    frames, _ = run(world)
    for k in (0, 4, 8):
        sem = frames[k][0]
        assert np.all(sem[sem != FREE] == BACKGROUND)
        # the wall is the global plane x = 30.2: voxels hold it iff they straddle it
        centres = transform_points(world.global_from_ego[k], voxel_centres_of(sem != FREE)) - UTM
        assert np.all(np.abs(centres[:, 0] - 30.2) <= np.sqrt(2) * GRID.voxel_size_m / 2 + 1e-6)
        assert len(centres) > 100


def test_a_static_world_has_zero_flow_and_parked_cars_keep_their_class() -> None:
    world = World(cars=[("bb" * 8, [10.0, 5.0, 0.75], [0.0, 0.0, 0.0], 0.3, 0, 8)])
    frames, _ = run(world)
    for sem, flow, _mask in frames:
        assert not flow.any()
        assert np.count_nonzero(sem == 0) > 10 and np.count_nonzero(sem == BACKGROUND) > 100


def test_object_points_of_tracks_without_a_box_at_t_are_dropped() -> None:
    # the car exists for sweeps 0..3 only; later frames must not show a ghost of it
    world = World(cars=[("cc" * 8, [12.0, -8.0, 0.75], [0.0, 3.0, 0.0], 1.2, 0, 3)], ground=False, wall=False)
    frames, stats = run(world)
    assert all(np.count_nonzero(f[0] != FREE) > 0 for f in frames[:4])
    assert all(np.count_nonzero(f[0] != FREE) == 0 for f in frames[4:])
    assert stats.object_points + stats.ground_band_points == 4 * 800
    assert stats.object_points_dropped == 5 * stats.object_points  # sweeps 0..3 seen by frames 4..8


def test_point_order_and_box_order_do_not_change_the_labels() -> None:
    cars = [
        ("aa" * 8, [12.0, -8.0, 0.75], [0.0, 3.0, 0.0], 1.2, 0, 8),
        ("dd" * 8, [13.5, -8.5, 0.75], [0.0, 3.0, 0.0], 1.2, 0, 8),  # overlaps the first one
        ("ee" * 8, [-10.0, 4.0, 0.75], [-2.0, 0.0, 0.0], 0.0, 2, 8),
    ]
    world = World(cars=cars)
    ref, _ = run(world)
    rng = np.random.default_rng(3)

    def shuffled(k: int) -> np.ndarray:
        p = world.points(k)
        return p[rng.permutation(len(p))]

    log = world.log()
    # reverse the boxes within every sweep
    for k in range(log.num_sweeps):
        s = log.boxes(k)
        for name in ("box_token", "box_track_token", "box_category", "box_center", "box_size", "box_yaw",
                     "box_velocity", "box_confidence"):  # fmt: skip
            getattr(log, name)[s] = getattr(log, name)[s][::-1].copy()
    got, _ = run(world, load=shuffled, log=log)
    for (s0, f0, m0), (s1, f1, m1) in zip(ref, got, strict=True):
        assert np.array_equal(s0, s1) and np.array_equal(m0, m1)
        np.testing.assert_allclose(f0, f1, atol=1e-6)


@pytest.mark.parametrize("static_cell_voxels", [0.0, 0.25])
def test_a_rigid_motion_of_the_whole_world_leaves_the_labels_unchanged(static_cell_voxels: float) -> None:
    """Also with static cells: their lattice is the first pose's ego frame, which moves with the world."""
    world = World()
    cfg = LabelConfig(window_s=10.0, static_cell_voxels=static_cell_voxels)
    ref, stats = run(world, cfg)
    assert (stats.static_cells > 0) == (static_cell_voxels > 0)
    w = make_transform(yaw_to_quaternion(2.1), np.array([-1234.5, 987.25, 3.0]))
    moved = World(world_from_global=w)
    got, _ = run(moved, cfg)
    for (s0, f0, m0), (s1, f1, m1) in zip(ref, got, strict=True):
        assert np.array_equal(s0, s1)
        assert np.array_equal(m0, m1)
        np.testing.assert_allclose(f0, f1, atol=1e-5)


def test_visibility_covers_the_returns_and_stops_at_the_wall() -> None:
    world = World(cars=[], ground=True, wall=True)
    frames, _ = run(world, LabelConfig(window_s=0.0, ray_dedup=False))
    sem, _, mask = frames[0]
    assert np.all(mask[sem != FREE])  # with only its own sweep, every occupied voxel was hit
    # the voxels behind the wall (global x > 31, above the ground) are never observed
    centres = transform_points(world.global_from_ego[0], voxel_centres_of(np.ones(GRID.shape, bool))) - UTM
    behind = (
        (centres[:, 0] > 31.0) & (np.abs(centres[:, 1]) < 15) & (centres[:, 2] > 0.5) & (centres[:, 2] < 2.5)
    )
    assert behind.sum() > 100 and not mask.reshape(-1)[behind].any()
    # the sensor's own voxel is observed
    origin = np.floor((np.zeros(3) - GRID.range_min_m) / GRID.voxel_size_m).astype(int)
    assert mask[tuple(origin)]


def test_window_visibility_observes_more_than_the_frames_own_sweep() -> None:
    world = World()
    own, _ = run(world, LabelConfig(visibility="frame"))
    agg, stats = run(world, LabelConfig(visibility="window"))
    for (s0, _, m0), (s1, _, m1) in zip(own, agg, strict=True):
        assert np.array_equal(s0, s1)  # visibility never changes the semantics
        assert np.all(m1[m0]) and m1.sum() > m0.sum()
    assert stats.rays > 0


# -- configuration ---------------------------------------------------------------------------------------


def test_label_sweep_set_uses_every_nth_sweep_from_each_key_frame() -> None:
    log = make_log(
        np.arange(40) * 50_000, make_transform(np.tile([1.0, 0, 0, 0], (40, 1)), np.zeros((40, 3))), [[]] * 40
    )
    keys = np.array([3, 13, 27])  # irregular, as when frames are dropped
    assert list(label_sweep_set(log, keys, 0)) == [3, 13, 27]
    assert list(label_sweep_set(log, keys, 5)) == [3, 8, 13, 18, 23, 27, 32, 37]
    assert list(label_sweep_set(log, keys, 1)) == list(range(40))
    log.ego_translation[8] = np.nan  # a sweep whose pose is broken is never aggregated
    log.ego_rotation[18] = 0.0
    assert list(label_sweep_set(log, keys, 5)) == [3, 13, 23, 27, 32, 37]


def test_config_is_json_ready_and_validated() -> None:
    d = LabelConfig().to_dict()
    assert json.loads(json.dumps(d)) == json.loads(json.dumps(d))
    assert d["window_s"] == 10.0 and d["grid"]["shape"] == [200, 200, 16] and d["generator_version"] >= 1
    assert LabelConfig(window_s=5.0).to_dict() != d
    with pytest.raises(ValueError, match="visibility"):
        LabelConfig(visibility="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sweep_step"):
        LabelConfig(sweep_step=-1)
    for bad in (-0.1, 0.01, 2.0, float("nan")):
        with pytest.raises(ValueError, match="static_cell_voxels"):
            LabelConfig(static_cell_voxels=bad)
    # a record of generator version 5 has no static_cell_voxels: every point voxelised, as version 5 did
    old = {k: v for k, v in LabelConfig(window_s=5.0).to_dict().items() if k != "static_cell_voxels"}
    assert LabelConfig.from_dict({**old, "generator_version": 5}).static_cell_voxels == 0.0
    with pytest.raises(ValueError, match="static_cell_voxels must be a number"):
        LabelConfig.from_dict({**old, "static_cell_voxels": "fine"})
    from driveengine.labels.recipe import RECIPES

    for name in ("openscene", "occ3d", "fine"):  # the shipped recipes: a quarter voxel
        assert RECIPES[name].static_cell_voxels == 0.25
    assert RECIPES["openscene-v1"].static_cell_voxels == 0.0  # version 1, bit for bit


def test_sweep_step_adds_the_sweeps_between_key_frames() -> None:
    world = World(n=9, ground=False, wall=False)
    log = world.log()
    _, s0 = run(world, LabelConfig(sweep_step=0), keys=np.array([0, 4, 8]), log=log)
    _, s2 = run(world, LabelConfig(sweep_step=2), keys=np.array([0, 4, 8]), log=log)
    assert s0.sweeps_used == 3 and s2.sweeps_used == 5


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_points_empty_and_missing_sweeps_are_counted_not_fatal() -> None:
    world = World()

    def load(k: int) -> np.ndarray | None:
        if k == 2:
            return None  # missing .pcd
        if k == 3:
            return np.zeros((0, 3), np.float32)  # empty sweep
        p = world.points(k)
        p[:7, 0] = np.nan
        p[7:9, 2] = np.inf
        return p

    frames, stats = run(world, load=load)
    assert stats.bad_points == 7 * 9 and stats.frames == 9
    assert stats.frames_without_own_sweep == 1
    assert not frames[2][2].any()  # no own sweep: nothing observed
    assert frames[3][2].sum() == 0  # an empty sweep observes nothing either
    assert np.count_nonzero(frames[2][0] == 0) > 0  # ... but the window still labels frame 2
    assert all(np.isfinite(f[1]).all() for f in frames)


def test_zero_size_boxes_and_frames_without_boxes_still_get_labels() -> None:
    world = World()
    log = world.log()
    log.box_size[log.boxes(1)] = 0.0  # a degenerate annotation
    log.box_size[log.boxes(5)] = np.nan
    frames, stats = run(world, log=log)
    assert stats.degenerate_boxes == 2
    # without a valid box at t the car's points from other sweeps are dropped; its own become static
    assert np.count_nonzero(frames[1][0] == 0) == 0 and np.count_nonzero(frames[1][0] == BACKGROUND) > 0
    assert np.count_nonzero(frames[4][0] == 0) > 0
    nobox = World(cars=[])
    frames, stats = run(nobox)
    assert stats.object_points == 0 and all(np.count_nonzero(f[0] == BACKGROUND) > 0 for f in frames)


def test_bad_key_frames_are_rejected_with_the_log_path() -> None:
    world = World()
    with pytest.raises(LabelError, match=r"/test/log\.db"):
        LabelGenerator(world.log(), np.array([3, 1]), world.points, LabelConfig())
    with pytest.raises(LabelError, match="increasing"):
        LabelGenerator(world.log(), np.array([0, 99]), world.points, LabelConfig())


# -- Zarr ------------------------------------------------------------------------------------------------


def test_write_log_labels_writes_what_was_computed(tmp_path: Path) -> None:
    world = World(n=5)
    cfg = LabelConfig()
    calls: list[int] = []
    stats = write_log_labels(world.log(), np.arange(5), tmp_path / "log.zarr", cfg, progress=calls.append,
                             load_points=world.points, storage=OccStorage(shard_frames=2))  # fmt: skip
    assert sum(calls) == 5 and stats["frames"] == 5 and stats["sweeps_used"] == 5
    expected, _ = run(world, cfg)
    occ = open_occ(tmp_path / "log.zarr")
    assert occ.num_frames == 5
    assert occ.attrs["generator"] == json.loads(json.dumps(cfg.to_dict()))
    assert occ.attrs["stats"]["frames"] == 5
    assert occ.attrs["timestamps_us"] == [int(t) for t in world.ts]
    for name, spec in OCC_ARRAYS.items():
        arr = occ.group[name]
        assert arr.dtype == spec.dtype and arr.chunks[0] == 1 and arr.shards[0] == 2
    for i, (sem, flow, mask) in enumerate(expected):
        got = occ.frame(i)
        assert np.array_equal(got.semantics, sem) and np.array_equal(got.mask_lidar, mask)
        assert np.array_equal(got.flow, flow.astype(np.float16))


def test_missing_point_cloud_files_are_skipped_and_counted(tmp_path: Path) -> None:
    world = World(n=3)
    stats = write_log_labels(
        world.log(), np.arange(3), tmp_path / "x.zarr", LabelConfig(), source=NuplanSource(),
        blob_root=tmp_path / "no_blobs",
    )  # fmt: skip
    assert stats["sweeps_missing"] == 3 and stats["frames"] == 3
    assert "missing point cloud" in stats["notes"][0]
    occ = open_occ(tmp_path / "x.zarr")
    assert np.all(occ.semantics[:] == FREE) and not occ.mask_lidar[:].any()


def test_memory_is_bounded_by_one_shard_not_the_log_length(tmp_path: Path) -> None:
    def peak(n: int) -> int:
        world = World(n=n, ground=False, wall=False, points_per_car=50)
        cfg = LabelConfig(window_s=1.0)
        tracemalloc.start()
        write_log_labels(
            world.log(), np.arange(n), tmp_path / f"m{n}.zarr", cfg, load_points=world.points,
            storage=OccStorage(shard_frames=2),
        )  # fmt: skip
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    frame_bytes = GRID.num_voxels * (1 + 2 * 2 + 1)
    short, long = peak(4), peak(12)
    assert long - short < frame_bytes  # 8 more frames cost less than one more frame of memory


def test_sweeps_beyond_a_sweeps_size_are_skipped_unread_and_noted(tmp_path: Path, monkeypatch) -> None:
    """The label generator's point loader never reads a file larger than a sweep can be
    (``MAX_SWEEP_BYTES``), and nuScenes' reader refuses more points than a sweep holds (as nuPlan's
    does, tests/test_pcd.py): each such sweep is skipped, counted as unreadable and noted by file."""
    from types import SimpleNamespace

    from driveengine.errors import SourceError
    from driveengine.labels import generator
    from driveengine.labels.generator import LabelStats, source_point_loader
    from driveengine.sources.nuscenes import reader as nuscenes_reader
    from driveengine.sources.pcd import write_nuplan_pcd

    write_nuplan_pcd(tmp_path / "a.pcd", np.ones((100, 3), np.float32))
    log = SimpleNamespace(sweep_lidar_path=np.array(["a.pcd"]), ego_from_lidar=np.eye(4))
    stats = LabelStats()
    load = source_point_loader(NuplanSource(), log, tmp_path, stats)  # type: ignore[arg-type]
    assert load(0).shape == (100, 3)
    size = (tmp_path / "a.pcd").stat().st_size
    monkeypatch.setattr(generator, "MAX_SWEEP_BYTES", size - 1)
    assert load(0) is None
    assert stats.sweeps_unreadable == 1 and stats.notes == [
        f"{tmp_path / 'a.pcd'}: {size} bytes, more than a sweep's {size - 1}; skipped"
    ]

    monkeypatch.setattr(nuscenes_reader, "MAX_SWEEP_POINTS", 9)
    (tmp_path / "b.pcd.bin").write_bytes(np.zeros((10, 5), "<f4").tobytes())
    assert (
        nuscenes_reader.sweep_file_defect(tmp_path / "b.pcd.bin")
        == "10 points, more than the 9 a sweep may hold"
    )
    with pytest.raises(SourceError, match=r"b\.pcd\.bin: 10 points, more than the 9 a sweep may hold"):
        nuscenes_reader.points_ego(
            (tmp_path / "b.pcd.bin").read_bytes(), str(tmp_path / "b.pcd.bin"), np.eye(4)
        )
    assert nuscenes_reader.points_ego(bytes(9 * 20), "c.pcd.bin", np.eye(4)).shape == (9, 4)
