"""Generated labels against the exact ground truth of the synthetic world (driveengine/synth).

The log is a real nuPlan-schema SQLite database read by ``sources.nuplan_db``; sweeps are the synthetic
LiDAR's (ray cast against the world), handed to the generator in memory, except in the last test,
which reads real ``.pcd`` files.

Scores are computed inside ``mask_lidar`` (voxels a ray of the frame's own sweep passed through or
ended in), per OpenScene: IoU = TP / (TP + FP + FN).

About the thresholds. The task asks for IoU >= 0.9 (static structures and ground) and >= 0.8 (moving
objects). Below them, for reasons of definition, not of quality (figures: this log, frame 120, 32k-ray
sweeps at 4 Hz, +-6 s; other seeds in the report):

* The truth marks every voxel a solid overlaps with *positive volume*, and gives a voxel shared by an
  object and the ground to the object. LiDAR labels come from surface returns, and the mask holds the
  voxels the frame's rays *passed through*. So (1) a voxel that a solid only partly fills and that a
  ray crossed through its empty part is observed, truly occupied, and labelled only if some other
  return fell into it: every missed moving-object voxel above the ground layer is of this kind
  (their centres lie a median 0.23 m outside the box; no false positives at all), giving 0.76 here
  and 0.73-0.92 over seeds 0-3; (2) rays that reach the ground obliquely cross several voxels of the
  ground layer above the plane before they end: static IoU 0.87 with 32k-ray sweeps, 0.92 with
  full-size 150k-ray sweeps (density, not definition: the static test uses full-size sweeps and
  asserts the 0.9 asked for); (3) in the ground layer the majority vote
  (OpenScene's rule) gives a voxel shared with an object to the ground's many points where the truth
  gives it to the object: moving objects over the whole mask 0.68.
* The synthetic world puts surfaces parallel to the road exactly at multiples of 0.5 m from the ego,
  i.e. on the faces of the default grid, where the half-open voxel rule puts a surface's returns in
  the voxel *outside* the solid. Real surfaces never sit exactly on a voxel face, so the comparison
  uses a grid shifted by 0.13 m (same size and resolution).

Whole-track objects (generator version 2, the shipped recipes) answer (1): each object's points from every
sweep of its track, accumulated in 0.1 m box-frame cells whose cubes (clipped to the box) claim the voxels
they overlap, fill the partly filled voxels: with every sweep of the log for the objects
(``track_sweep_step=1``) moving objects reach 0.86 above the ground layer and 0.82 over the whole mask here
(seed 0: 0.86 / 0.82; without whole-track 0.73 / 0.63), with still no false object voxel. The version 1
figures are kept as a test of ``whole_track=False``. The shipped ``openscene`` recipe takes the objects'
points from the label sweep set only (the 2 Hz key-frame sweeps, ``track_sweep_step=0``): labelling every
key frame of this log, frame 120 reaches 0.78 / 0.71 with 32k-ray sweeps and 0.81 / 0.72 with full-size
ones under the plain majority vote; ``track_sweep_step=5`` (4 Hz) 0.81 / 0.76 and 0.83 / 0.77;
``track_sweep_step=1`` 0.84 / 0.83. The whole-mask shortfall is (3): with ``object_priority`` (generator
version 3, the shipped recipes) background points do not vote in voxels that an object claims, so the
object keeps the ground-layer voxels it shares with the ground, as the truth has them: 0.78 / 0.80 with
32k-ray sweeps, 0.81 / 0.83 with full-size ones (``track_sweep_step=5``: 0.83 / 0.85), static IoU unchanged
(0.815 vs 0.813), still no false object voxel above the ground layer.

The moving-object tests therefore assert the figures above with a small margin, plus what must hold exactly: no
false object voxels, flow EPE, zero flow in a static world.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import BACKGROUND, FREE

from driveengine.labels.generator import LabelConfig, LabelGenerator, write_log_labels
from driveengine.sources.nuplan import NuplanSource
from driveengine.store.occ import OccStorage

pytest.importorskip("driveengine.synth.sensors")
from driveengine.sources.nuplan.reader import read_nuplan_log
from driveengine.synth import synthesize
from driveengine.synth.sensors import lidar_sweep

SHIFT = 0.13
GRID = VoxelGrid((-50 + SHIFT, -50 + SHIFT, -4 + SHIFT), (50 + SHIFT, 50 + SHIFT, 4 + SHIFT), 0.5)
RAYS = 32_768
FULL_SIZE_RAYS = 150_016  # a real MergedPointCloud sweep
GROUND_LAYER = int(np.floor((-0.3 - GRID.range_min_m[2]) / GRID.voxel_size_m))  # ground at ego z = -0.3


#: Whole-track objects from every sweep of the log (``track_sweep_step=1``; the shipped recipes use
#: ``track_sweep_step=0``, the label sweep set: see the module docstring for their figures).
WHOLE_TRACK = {"whole_track": True, "track_sweep_step": 1}


def _label(
    tmp: Path, static_only: bool, key: int = 120, window_s: float = 6.0, rays: int = RAYS, seconds: float = 12.0,
    seed: int = 3, **settings: object,
):  # fmt: skip
    synth = synthesize(tmp, logs=1, seconds=seconds, seed=seed, blobs=False, static_only=static_only)[0]
    log = read_nuplan_log(synth.db_path)

    def load(k: int) -> np.ndarray:
        return lidar_sweep(synth.world, int(log.sweep_timestamp_us[k]), rays, k).xyz

    cfg = LabelConfig(window_s=window_s, sweep_step=5, grid=GRID, **settings)  # type: ignore[arg-type]
    gen = LabelGenerator(log, np.array([key]), load, cfg)
    sem, flow, mask = (a.copy() for a in next(gen.frames())[:3])
    ts = int(log.sweep_timestamp_us[key])
    return sem, flow, mask, synth.world.occupancy(ts, GRID), synth.world.flow(ts, GRID), gen.stats


def _iou(pred: np.ndarray, true: np.ndarray, where: np.ndarray) -> float:
    pred, true = pred & where, true & where
    union = np.count_nonzero(pred | true)
    return np.count_nonzero(pred & true) / union if union else 1.0


@pytest.fixture(scope="module")
def moving(tmp_path_factory: pytest.TempPathFactory):
    return _label(tmp_path_factory.mktemp("moving"), static_only=False, **WHOLE_TRACK)


@pytest.fixture(scope="module")
def moving_v1(tmp_path_factory: pytest.TempPathFactory):
    return _label(tmp_path_factory.mktemp("moving_v1"), static_only=False)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory):
    return _label(tmp_path_factory.mktemp("full"), static_only=False, rays=FULL_SIZE_RAYS, whole_track=True)


def test_static_structures_and_ground_match_the_truth(full_size) -> None:
    sem, _, mask, true, _, _ = full_size
    iou = _iou(sem == BACKGROUND, true == BACKGROUND, mask)
    assert iou >= 0.9, iou  # full-size sweeps: 0.92 (0.87 with 32k-ray sweeps; see the module docstring)
    # nothing is labelled where the truth is free except surface returns of unannotated objects
    assert np.count_nonzero((sem != FREE) & (true == FREE) & mask) < 0.02 * np.count_nonzero(sem != FREE)


@pytest.fixture(scope="module")
def full_size_cells(tmp_path_factory: pytest.TempPathFactory):
    """As ``full_size``, with the static points merged into the shipped recipes' quarter-voxel cells."""
    return _label(
        tmp_path_factory.mktemp("full_cells"),
        static_only=False,
        rays=FULL_SIZE_RAYS,
        whole_track=True,
        static_cell_voxels=0.25,
    )


def test_static_cells_keep_the_static_labels(full_size, full_size_cells) -> None:
    """Merging each sweep's static points into quarter-voxel world cells (their mean, their count) before
    voxelising (``static_cell_voxels``): static IoU against the truth 0.918 (per point: 0.919), the occupied
    voxels those of per-point voxelisation but for a few on voxel faces, and several points per cell."""
    sem, _, mask, true, _, stats = full_size_cells
    per_point = _iou(full_size[0] == BACKGROUND, true == BACKGROUND, mask)
    iou = _iou(sem == BACKGROUND, true == BACKGROUND, mask)
    assert iou >= 0.9 and iou >= per_point - 0.005, (iou, per_point)
    everywhere = np.ones(GRID.shape, bool)
    assert _iou(sem != FREE, full_size[0] != FREE, everywhere) >= 0.98
    assert np.count_nonzero((sem != FREE) & (true == FREE) & mask) < 0.02 * np.count_nonzero(sem != FREE)
    assert 0 < 2 * stats.static_cells < full_size[5].aggregated_points  # >= 2 points a cell
    assert full_size[5].static_cells == 0 and stats.far_static_points == 0


def _moving_ious(result) -> tuple[float, float]:
    sem, _, mask, true, true_flow, _ = result
    speed = np.linalg.norm(true_flow, axis=-1)
    pred = (sem < BACKGROUND) & (sem == true) & (speed > 0.2)
    truth = (true < BACKGROUND) & (speed > 0.2)
    above = np.zeros(GRID.shape, bool)
    above[:, :, GROUND_LAYER + 1 :] = True
    assert np.count_nonzero(truth & mask & above) > 100  # the scene has moving objects in view
    # no object class where the truth has none (no ghost trails, no wrong classes)
    assert not np.any((sem < BACKGROUND) & (true != sem) & mask & above)
    return _iou(pred, truth, mask & above), _iou(pred, truth, mask)


def test_moving_objects_match_the_truth(moving) -> None:
    above, whole = _moving_ious(moving)
    assert above >= 0.8, above  # whole-track objects: 0.84 (see the module docstring)
    assert whole >= 0.8, whole  # the ground layer included: 0.81
    assert moving[5].object_points_dropped > 0  # tracks that leave the log were seen and dropped
    assert moving[5].tracks > 10 and moving[5].track_cells > 1000


def test_window_only_objects_of_generator_version_1(moving_v1, moving) -> None:
    above, whole = _moving_ious(moving_v1)
    assert above >= 0.72 and whole >= 0.62  # partly filled voxels, ground layer: see the module docstring
    assert _moving_ious(moving)[0] >= above + 0.05  # whole-track objects are better
    assert moving_v1[5].tracks == 0 and moving_v1[5].object_points_dropped > 0


def test_whole_track_objects_beat_the_window_on_a_long_log(tmp_path: Path) -> None:
    """40 s log, +-3 s window: the window sees a passing object from one side, its track from all sides."""
    window = _label(tmp_path / "w", static_only=False, key=400, window_s=3.0, seconds=40.0)
    track = _label(tmp_path / "t", static_only=False, key=400, window_s=3.0, seconds=40.0, whole_track=True)
    (w_above, w_whole), (t_above, t_whole) = _moving_ious(window), _moving_ious(track)
    assert t_above >= 0.85 and t_whole >= 0.84, (t_above, t_whole)  # 0.88 / 0.85
    assert t_above >= w_above + 0.02 and t_whole >= w_whole + 0.03, (w_above, w_whole, t_above, t_whole)
    # static labels do not change
    assert np.array_equal(window[0] >= BACKGROUND, track[0] >= BACKGROUND) or (
        _iou(window[0] == BACKGROUND, track[0] == BACKGROUND, window[2]) > 0.99
    )


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory):
    """Frame 120 of every key frame (every 10th sweep) labelled with the shipped ``openscene`` recipe (on the
    shifted grid, without mask_camera) from full-size sweeps, with and without ``object_priority``."""
    from dataclasses import replace

    from driveengine.labels.recipe import RECIPES

    synth = synthesize(tmp_path_factory.mktemp("shipped"), logs=1, seconds=12.0, seed=3, blobs=False)[0]
    log = read_nuplan_log(synth.db_path)
    keys = np.arange(0, log.num_sweeps, 10)
    sweeps = {
        int(k): lidar_sweep(synth.world, int(log.sweep_timestamp_us[k]), FULL_SIZE_RAYS, int(k)).xyz
        for k in keys
    }
    ts = int(log.sweep_timestamp_us[120])
    truth = synth.world.occupancy(ts, GRID), synth.world.flow(ts, GRID)
    out = {}
    for priority in (True, False):
        cfg = replace(RECIPES["openscene"], grid=GRID, camera_mask=False, object_priority=priority)
        assert RECIPES["openscene"].object_priority  # the shipped recipe has it
        gen = LabelGenerator(log, keys, sweeps.get, cfg)
        for i, frame in enumerate(gen.frames()):
            if keys[i] == 120:
                out[priority] = (*(a.copy() for a in frame[:3]), *truth, gen.stats)
    return out


def test_shipped_recipe_objects_keep_the_voxels_they_share_with_the_ground(shipped) -> None:
    """The shipped recipe (objects from the 2 Hz key-frame sweeps only) with ``object_priority``: moving
    objects >= 0.8 above the ground layer and over the whole mask; without it the ground's returns take the
    voxels at the objects' base (the whole-mask figure drops), and nothing else changes much."""
    above, whole = _moving_ious(shipped[True])  # also: no false object voxel above the ground layer
    plain_above, plain_whole = _moving_ious(shipped[False])
    assert above >= 0.8 and whole >= 0.8, (above, whole)  # 0.81 / 0.83 (plain vote: 0.81 / 0.72)
    assert whole >= plain_whole + 0.05 and above >= plain_above - 0.005, (
        above,
        whole,
        plain_above,
        plain_whole,
    )
    sem, flow, mask, true, true_flow, _ = shipped[True]
    plain = shipped[False][0]
    # background voxels stay background, except those the objects now take
    static = _iou(sem == BACKGROUND, true == BACKGROUND, mask)
    assert static >= _iou(plain == BACKGROUND, true == BACKGROUND, mask) - 0.005, static
    assert np.array_equal(sem == FREE, plain == FREE)  # priority moves voxels between classes, never to free
    both = (sem < BACKGROUND) & (true < BACKGROUND) & mask
    assert np.linalg.norm(flow[both] - true_flow[both], axis=-1).mean() <= 0.1
    assert not flow[sem >= BACKGROUND].any()


def test_flow_matches_the_truth_on_object_voxels(moving) -> None:
    sem, flow, mask, true, true_flow, _ = moving
    both = (sem < BACKGROUND) & (true < BACKGROUND) & mask
    assert np.count_nonzero(both) > 100
    epe = np.linalg.norm(flow[both] - true_flow[both], axis=-1)
    assert epe.mean() <= 0.1, epe.mean()
    assert np.linalg.norm(true_flow[both], axis=-1).max() > 1.0  # something moves
    assert not flow[sem >= BACKGROUND].any()


def test_a_world_with_nothing_moving_has_zero_flow(tmp_path: Path) -> None:
    sem, flow, mask, _, _, _ = _label(tmp_path, static_only=True, key=60, window_s=2.0)
    assert not flow.any()
    assert np.count_nonzero((sem < BACKGROUND) & mask) > 50  # parked objects are still labelled


def test_labels_from_real_pcd_files_with_a_missing_one(tmp_path: Path) -> None:
    synth = synthesize(
        tmp_path / "data", logs=1, seconds=3.0, seed=1, points=8192, image_size=(16, 9),
        key_frames_only=True, faults={"missing_pcd": (10,)},
    )[0]  # fmt: skip
    log = read_nuplan_log(synth.db_path)
    keys = np.arange(0, log.num_sweeps, 10)
    stats = write_log_labels(
        log, keys, tmp_path / "occ.zarr", LabelConfig(), source=NuplanSource(), blob_root=synth.sensor_root,
        storage=OccStorage(shard_frames=2),
    )  # fmt: skip
    assert stats["frames"] == len(keys) == 6
    assert stats["sweeps_missing"] == 1 and stats["sweeps_used"] == len(keys) - 1
    assert stats["frames_without_own_sweep"] == 1
    from driveengine.store.occ import open_occ

    occ = open_occ(tmp_path / "occ.zarr")
    assert not occ.frame(1).mask_lidar.any() and occ.frame(2).mask_lidar.any()
    assert np.count_nonzero(occ.frame(1).semantics == BACKGROUND) > 100  # labelled from its window
