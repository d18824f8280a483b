"""Labels of nuScenes scenes with the same generator, on Occ3D-nuScenes' grid and class table:
the class-table generalisation of the kernels, points in boxes vs nuScenes-lidarseg classes vs
``others``, and broken lidarseg files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES, ClassTable
from driveengine.splits import load_split

from driveengine.collect.config import CollectConfig
from driveengine.collect.runner import collect
from driveengine.labels import voxel_ops as vo
from driveengine.labels.generator import LabelConfig, LabelError, LabelGenerator, source_point_loader
from driveengine.sources import get_source
from driveengine.sources.nuscenes.constants import OCC3D_GRID
from driveengine.store.dataset import open_split
from driveengine.synth.nuscenes import write_nuscenes

T = OCC3D_NUSCENES_CLASSES
NV = 64 * 40


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIVEENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "de-cache"))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ns_labels")
    scenes = write_nuscenes(
        root, scenes=1, seconds=3.0, seed=7, points=16_384, image_size=(32, 18), lidarseg=True
    )
    split = root / "all.yaml"
    split.write_text(yaml.safe_dump({"name": "all", "dataset": "nuscenes", "folder": "v1.0-mini"}))
    return root, scenes[0], split


def _bits(voxels: np.ndarray) -> np.ndarray:
    bits = np.zeros(vo.bitset_words(NV), np.uint64)
    vo.mark_voxels(np.asarray(voxels, np.int64), bits)
    return bits


def test_vote_on_the_occ3d_table_background_first_and_ties_to_the_lowest_id() -> None:
    static = np.zeros(NV, np.int32)
    static[[10, 20, 30]] = (2, 3, 1)
    # voxel 10: 2 'others' (background) vs 2 car -> others (id 0 < 4); 20: 3 others vs 1 car -> others;
    # 30: 1 others vs 2 sidewalk (13, a classed static point) -> sidewalk; 40: car 2, truck 2 -> car;
    # 50: a class id beyond the table -> ignored (the voxel stays free)
    vox = np.array([10, 10, 20, 30, 30, 40, 40, 40, 40, 50])
    cls = np.array([4, 4, 4, 13, 13, 4, 4, 10, 10, 200], np.uint8)
    vel = np.array([[1, 0], [1, 0], [2, 0], [0, 0], [0, 0], [1, 1], [3, 3], [5, 5], [5, 5], [9, 9]], float)
    sem = np.empty(NV, np.uint8)
    flow = np.empty((NV, 2), np.float32)
    ws = np.full(NV, -1, np.int32)
    counts = static.copy()
    n = vo.vote(_bits([10, 20, 30]), counts, vox, cls, vel, sem, flow, ws, T.background, T.free, T.free)
    assert n == 4 and np.all(ws == -1) and not counts[[10, 20, 30]].any()
    assert list(sem[[10, 20, 30, 40, 50, 0]]) == [0, 0, 13, 4, T.free, T.free]
    np.testing.assert_allclose(flow[[10, 20, 30, 40]], [[0, 0], [0, 0], [0, 0], [2, 2]])  # winners only


def test_place_static_appends_classed_points() -> None:
    lo, vs, shape = vo.grid_params(OCC3D_GRID)
    pts = np.array([[0.1, 0.1, 0.1], [100.0, 0, 0], [-0.1, 0.3, 2.0]], np.float32)
    cls = np.array([11, 12, 15], np.uint8)
    out_v, out_c, out_vel = np.full(5, -7, np.int64), np.zeros(5, np.uint8), np.full((5, 2), 9.0)
    end = vo.place_static(pts, cls, np.eye(3), np.zeros(3), lo, vs, shape, out_v, out_c, out_vel, 1)
    assert end == 3 and out_v[0] == -7 and list(out_c[1:3]) == [11, 15] and not out_vel[1:3].any()
    ref = vo.points_to_voxels(pts[[0, 2]], np.eye(3), np.zeros(3), lo, vs, shape)
    assert list(out_v[1:3]) == ref.tolist()


def test_a_table_without_background_is_refused_clearly() -> None:
    table = replace(T, name="no-background", background=None)

    class Src:
        name, class_table = "x", table

    with pytest.raises(LabelError, match="needs a class table with a background class"):
        LabelConfig().check(Src())  # type: ignore[arg-type]
    LabelConfig().check(get_source("nuscenes"))  # Occ3D's table: accepted now


def _reference(log, k: int, classes: np.ndarray, config: LabelConfig) -> dict[int, int]:
    """Independent majority vote of one sweep seen from its own frame (window 0): per voxel, the class
    with the most points (box class inside a grown box, the given per-point class outside)."""
    from driveengine.geometry import make_transform, yaw_to_quaternion

    pts = source_point_loader(get_source("nuscenes"), log, log._root, _Stats())(k)
    cls = classes.copy()
    b = log.boxes(k)
    ego = log.global_from_ego()[k]
    dropped = np.zeros(len(pts), bool)
    depth = np.full(len(pts), np.inf)
    m = config.box_margin_m
    for j in range(b.start, b.stop):
        box = make_transform(yaw_to_quaternion(log.box_yaw[j]), log.box_center[j])
        local = (pts - (np.linalg.inv(ego) @ box)[:3, 3]) @ (np.linalg.inv(ego) @ box)[:3, :3]
        half = log.box_size[j] / 2
        lo_b, hi_b = np.array([-half[0] - m, -half[1] - m, -half[2]]), half + m
        inside = np.all((local >= lo_b) & (local <= hi_b), axis=1)
        d = np.max(np.abs(local - (lo_b + hi_b) / 2) / ((hi_b - lo_b) / 2), axis=1)
        better = inside & (d < depth)
        depth[better] = d[better]
        band = local[:, 2] < -half[2] + config.box_ground_clearance_m
        cls[better] = log.category_class[log.box_category[j]]
        dropped[better] = band[better]
        dropped[better & ~band] = False
    keep = ~dropped
    lo = np.array(OCC3D_GRID.range_min_m)
    ijk = np.floor((pts[keep] - lo) / OCC3D_GRID.voxel_size_m).astype(int)
    ok = np.all((ijk >= 0) & (ijk < OCC3D_GRID.shape), axis=1)
    lin = np.ravel_multi_index(ijk[ok].T, OCC3D_GRID.shape)
    pairs, n = np.unique(np.stack([lin, cls[keep][ok]], axis=1), axis=0, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (v, c), count in zip(pairs.tolist(), n.tolist(), strict=True):
        if v not in best or count > best[v][1]:  # ascending class ids: ties keep the lowest
            best[v] = (c, count)
    return {v: c for v, (c, _) in best.items()}


class _Stats:
    sweeps_missing = sweeps_unreadable = 0
    notes: list[str] = []  # noqa: RUF012 - a throwaway stand-in


def _read(release):
    root, _scene, split = release
    source = get_source("nuscenes")
    (inp,) = source.find_logs(root, load_split(split))
    log = source.read_log(inp)
    log._root = root
    return source, log


def test_lidarseg_classes_points_in_boxes_and_others(release) -> None:
    root, _scene, _split = release
    source, log = _read(release)
    keys = source.key_frame_candidates(log, 10)
    k = int(keys[2])
    cfg = LabelConfig(window_s=0.0, grid=OCC3D_GRID)
    load = source_point_loader(source, log, root, _Stats())
    n = len(load(k))
    seg = source.point_classes(log, k, root, n)
    assert seg is not None and seg.shape == (n,) and set(np.unique(seg).tolist()) >= {11, 12, 13, 14, 15}
    gen = LabelGenerator(log, np.array([k]), load, cfg, classes=T,
                         load_point_classes=lambda kk, nn: source.point_classes(log, kk, root, nn))  # fmt: skip
    sem = next(gen.frames()).semantics.reshape(-1).copy()
    assert gen.stats.point_class_sweeps == 1
    ref = _reference(log, k, seg, cfg)
    occupied = np.flatnonzero(sem != T.free)
    assert set(occupied.tolist()) == set(ref)
    agree = np.mean([sem[v] == c for v, c in ref.items()])
    assert agree > 0.995, agree  # points exactly on box faces may go either way
    counts = np.bincount(sem[occupied], minlength=T.free)
    assert counts[T.id_of("driveable_surface")] > 100 and counts[T.id_of("sidewalk")] > 10
    assert counts[T.id_of("car")] > 10 and counts[T.id_of("manmade")] > 10
    # without lidarseg: the same points, every point in no box is 'others' (the table's background)
    plain = LabelGenerator(log, np.array([k]), load, cfg, classes=T)
    sem0 = next(plain.frames()).semantics.reshape(-1)
    ref0 = _reference(log, k, np.zeros(n, np.uint8), cfg)
    assert set(np.flatnonzero(sem0 != T.free).tolist()) == set(ref0)
    assert np.mean([sem0[v] == c for v, c in ref0.items()]) > 0.995
    assert set(np.unique(sem0).tolist()) <= {0, 1, 2, 4, 7, 8, T.free} and (sem0 == 4).sum() > 10


def test_unlabelled_sweeps_only_fill_voxels_no_labelled_point_reaches(release) -> None:
    """The key sweep has lidarseg labels, the 8 sweeps around it none; boxes only on the key sweep, so the
    other sweeps bring static points alone: they change no voxel the key sweep labels and fill others
    with 'others'."""
    root, _scene, _split = release
    source, full = _read(release)
    keys = source.key_frame_candidates(full, 10)
    k = int(keys[1])
    b = full.boxes(k)
    counts = np.zeros(full.num_sweeps, np.int64)
    counts[k] = b.stop - b.start
    offsets = np.concatenate([[0], np.cumsum(counts)])
    log = replace(full, box_offsets=offsets, **{f: getattr(full, f)[b] for f in (
        "box_token", "box_track_token", "box_category", "box_center", "box_size", "box_yaw", "box_velocity",
        "box_confidence")})  # fmt: skip
    log.validate()
    load = source_point_loader(source, log, root, _Stats())

    def classes(kk: int, nn: int):
        return source.point_classes(log, kk, root, nn)

    only_key = LabelGenerator(log, np.array([k]), load, LabelConfig(window_s=0.0, grid=OCC3D_GRID), classes=T,
                              load_point_classes=classes)  # fmt: skip
    a = next(only_key.frames()).semantics.copy()
    mixed = LabelGenerator(log, np.array([k]), load, LabelConfig(window_s=0.2, sweep_step=1, grid=OCC3D_GRID),
                           classes=T, load_point_classes=classes)  # fmt: skip
    c = next(mixed.frames()).semantics.copy()
    assert mixed.stats.sweeps_used == 9 and mixed.stats.point_class_sweeps == 1
    labelled = a != T.free
    assert np.array_equal(c[labelled], a[labelled])
    extra = (c != T.free) & ~labelled
    assert extra.sum() > 100 and set(np.unique(c[extra]).tolist()) == {T.background}


def test_broken_lidarseg_files_are_noted_and_the_points_kept(release, tmp_path: Path) -> None:
    root, _scene, _split = release
    source, log = _read(release)
    keys = source.key_frame_candidates(log, 10)
    seg_files = [root / str(log.sweep_lidarseg_path[k]) for k in keys[:2]]
    saved = [p.read_bytes() for p in seg_files]
    try:
        seg_files[0].write_bytes(saved[0][:-3])  # wrong size
        seg_files[1].write_bytes(bytes([200]) + saved[1][1:])  # an id no category has
        load = source_point_loader(source, log, root, _Stats())
        gen = LabelGenerator(log, keys[:2], load, LabelConfig(window_s=0.0, grid=OCC3D_GRID), classes=T,
                             load_point_classes=lambda kk, nn: source.point_classes(log, kk, root, nn))  # fmt: skip
        frames = [f.semantics.copy() for f in gen.frames()]
        assert gen.stats.point_class_unreadable == 2 and gen.stats.point_class_sweeps == 0
        assert any("bytes for a sweep of" in n for n in gen.stats.notes)
        assert any("class id 200 names no known category" in n for n in gen.stats.notes)
        assert all(set(np.unique(f).tolist()) <= {0, 1, 2, 4, 7, 8, T.free} for f in frames)
    finally:
        for p, data in zip(seg_files, saved, strict=True):
            p.write_bytes(data)


def test_collect_uses_occ3d_grid_and_table_by_default(release, tmp_path: Path) -> None:
    root, scene, split = release
    config = CollectConfig.from_options(source="nuscenes", root=root, out=tmp_path / "out", split=str(split),
                                        label_window_s=1.0, progress=False)  # fmt: skip
    assert config.labels.grid == OCC3D_GRID  # type: ignore[union-attr]
    summary = collect(config, echo=lambda _: None)
    assert summary.ok
    dataset = open_split(tmp_path / "out" / "all")
    assert dataset.grid == OCC3D_GRID and dataset.classes == T
    occ = dataset.logs[0].labels()
    assert (
        occ.grid.shape == (200, 200, 16) and occ.classes == T and occ.num_frames == len(scene.samples.token)
    )
    sem = occ.frame(2).semantics
    assert (sem == T.id_of("driveable_surface")).sum() > 100 and (sem == T.free).mean() > 0.5
    stats = dataset.logs[0].entry.labels
    assert stats["point_class_sweeps"] == stats["sweeps_used"] > 0
    assert ClassTable.from_dict(T.to_dict()) == T
