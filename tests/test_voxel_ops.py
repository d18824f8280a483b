"""The compiled label kernels against brute-force numpy references (driveengine/collect/voxel_ops.py)."""

from __future__ import annotations

import numpy as np
import pytest
from driveengine.schemas import FREE, GRID, VoxelGrid

from driveengine.labels import voxel_ops as vo

LO, VS, SHAPE = vo.grid_params(GRID)
NV = GRID.num_voxels
SMALL = VoxelGrid((-4.0, -3.0, -2.0), (4.0, 3.0, 2.0), 0.5)  # 16 x 12 x 8, for brute-force checks


def ref_voxels(points: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    """C-order voxel positions by plain numpy; -1 outside the half-open range."""
    lo = np.asarray(grid.range_min_m)
    ijk = np.floor((points.astype(np.float64) - lo) / grid.voxel_size_m)
    with np.errstate(invalid="ignore"):
        inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.shape)), axis=1)
    ijk = np.where(inside[:, None], ijk, 0).astype(np.int64)
    return np.where(inside, np.ravel_multi_index(ijk.T, grid.shape), -1)


# -- voxelisation ---------------------------------------------------------------------------------------


def test_points_to_voxels_matches_numpy_and_excludes_the_maximum() -> None:
    rng = np.random.default_rng(2)
    pts = rng.uniform(-60, 60, (20000, 3)) * [1, 1, 0.1]
    special = np.array(
        [
            [50.0, 0, 0],  # x at the maximum: outside
            [0, 50.0, 0],
            [0, 0, 4.0],
            [-50.0, -50.0, -4.0],  # the minimum corner: inside, voxel (0, 0, 0)
            [50.0 - 1e-9, 0, 0],  # just below the maximum: last voxel
            [np.nan, 0, 0],
            [np.inf, 0, 0],
            [1e30, 0, 0],
            [-1e30, 0, 0],
        ]
    )
    pts = np.concatenate([pts, special])
    got = vo.points_to_voxels(pts, np.eye(3), np.zeros(3), LO, VS, SHAPE)
    assert np.array_equal(got, ref_voxels(pts, GRID))
    s = got[-9:]
    assert list(s[[0, 1, 2, 5, 6, 7, 8]]) == [-1] * 7
    assert s[3] == 0
    assert np.unravel_index(s[4], GRID.shape)[0] == GRID.shape[0] - 1


def test_transform_and_counts_match_numpy() -> None:
    rng = np.random.default_rng(3)
    pts = (rng.uniform(-70, 70, (30000, 3)) * [1, 1, 0.1]).astype(np.float32)
    yaw = 0.7
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    trans = np.array([3.3, -7.1, 0.4])
    moved = pts.astype(np.float64) @ rot.T + trans
    ref = ref_voxels(moved, GRID)
    assert np.array_equal(vo.points_to_voxels(pts, rot, trans, LO, VS, SHAPE), ref)
    counts = np.zeros(NV, np.int32)
    inside = vo.accumulate_counts(pts, rot, trans, LO, VS, SHAPE, counts)
    assert inside == np.count_nonzero(ref >= 0)
    assert np.array_equal(counts, np.bincount(ref[ref >= 0], minlength=NV))


def test_place_objects_moves_points_to_their_tracks_box_and_drops_tracks_without_one() -> None:
    rng = np.random.default_rng(4)
    local = rng.uniform(-1, 1, (500, 3)).astype(np.float32)
    track = rng.integers(0, 3, 500)
    cls = np.where(track == 0, 0, 7).astype(np.uint8)
    track_slot = np.array([1, -1, 0])  # track 1 has no box at the target frame
    rots = np.stack([np.eye(3), np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])])
    trans = np.array([[10.0, 0, 0], [49.5, 5, 1]])  # slot 1 sits on the grid's edge: some points fall out
    vel = np.array([[1.0, 2.0], [3.0, 4.0]])
    cap = 600
    out_v, out_c, out_vel = np.full(cap, -7), np.zeros(cap, np.uint8), np.zeros((cap, 2))
    end, dropped = vo.place_objects(
        local, track, cls, track_slot, rots, trans, vel, LO, VS, SHAPE, out_v, out_c, out_vel, 50
    )
    assert dropped == np.count_nonzero(track == 1)
    slot = track_slot[track]
    keep = slot >= 0
    placed = np.einsum("nij,nj->ni", rots[slot[keep]], local[keep].astype(np.float64)) + trans[slot[keep]]
    ref = ref_voxels(placed, GRID)
    inside = ref >= 0
    assert 0 < np.count_nonzero(~inside) and end - 50 == np.count_nonzero(inside)
    assert np.array_equal(out_v[50:end], ref[inside]) and np.all(out_v[:50] == -7)
    assert np.array_equal(out_c[50:end], cls[keep][inside])
    assert np.array_equal(out_vel[50:end], vel[slot[keep][inside]])


# -- points in boxes ------------------------------------------------------------------------------------


def _box_frames(centers: np.ndarray, yaws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``box_from_points`` rotations and translations of yaw-rotated boxes."""
    c, s = np.cos(yaws), np.sin(yaws)
    rot = np.zeros((len(yaws), 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, s, -s, c, 1.0  # R(yaw)^T
    trans = -np.einsum("bij,bj->bi", rot, centers)
    return rot, trans


def test_points_in_boxes_matches_brute_force_with_overlaps() -> None:
    rng = np.random.default_rng(5)
    nb = 40
    centers = np.concatenate([rng.uniform(-30, 30, (nb, 2)), rng.uniform(-0.5, 0.5, (nb, 1))], axis=1)
    centers[1] = centers[0] + [0.8, 0.3, 0]  # overlapping pairs
    centers[3] = centers[2]
    yaws = rng.uniform(-np.pi, np.pi, nb)
    half = rng.uniform(0.3, 3.0, (nb, 3))
    half[5] = 0.0  # a degenerate box takes no point
    rot, trans = _box_frames(centers, yaws)
    pts = np.concatenate(
        [rng.uniform(-35, 35, (20000, 3)) * [1, 1, 0.1], centers[:4] + rng.normal(0, 0.5, (4, 3))]
    ).astype(np.float32)
    box_of, local = vo.points_in_boxes(pts, rot, trans, -half, half, 4.0)
    # brute force: every box, normalised L-inf depth, lowest index on ties
    q = np.einsum("bij,nj->nbi", rot, pts.astype(np.float64)) + trans[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.max(np.abs(q) / half[None], axis=2)
    inside = np.all(np.abs(q) <= half[None], axis=2) & np.all(half > 0, axis=1)[None]
    depth = np.where(inside, depth, np.inf)
    ref = np.where(inside.any(axis=1), np.argmin(depth, axis=1), -1)
    assert np.array_equal(box_of, ref)
    assert np.count_nonzero(ref >= 0) > 100 and not np.any(ref == 5)
    sel = ref >= 0
    np.testing.assert_allclose(local[sel], q[np.flatnonzero(sel), ref[sel]], atol=1e-4)
    # the order of the points does not matter
    perm = rng.permutation(len(pts))
    box_perm, _ = vo.points_in_boxes(pts[perm], rot, trans, -half, half, 4.0)
    assert np.array_equal(box_perm, box_of[perm])


# -- voting ---------------------------------------------------------------------------------------------


def bits_of(counts: np.ndarray) -> np.ndarray:
    """The voxel bitset of the non-zero entries of ``counts`` (bit v & 63 of word v >> 6)."""
    bits = np.zeros(vo.bitset_words(len(counts)), np.uint64)
    v = np.flatnonzero(counts)
    np.bitwise_or.at(bits, v >> 6, np.left_shift(np.uint64(1), (v & 63).astype(np.uint64)))
    return bits


def test_accumulate_static_marks_every_voxel_and_counts_the_contested_ones() -> None:
    rng = np.random.default_rng(13)
    pts = (rng.uniform(-70, 70, (30000, 3)) * [1, 1, 0.1]).astype(np.float32)
    pts[:5] = np.nan
    rot, trans = np.eye(3), np.array([0.3, -0.2, 0.1])
    ref = ref_voxels(pts.astype(np.float64) + trans, GRID)
    full = np.bincount(ref[ref >= 0], minlength=NV)
    contested_voxels = rng.choice(np.flatnonzero(full), 300, replace=False)
    contested = np.zeros(vo.bitset_words(NV), np.uint64)
    vo.mark_voxels(np.concatenate([contested_voxels, [-1]]), contested)
    assert np.array_equal(contested, bits_of(np.isin(np.arange(NV), contested_voxels)))
    occupied = np.zeros_like(contested)
    counts = np.zeros(NV, np.int32)
    inside = vo.accumulate_static(pts, rot, trans, LO, VS, SHAPE, occupied, contested, counts)
    assert inside == np.count_nonzero(ref >= 0)
    assert np.array_equal(occupied, bits_of(full))
    expected = np.zeros(NV, np.int64)
    expected[contested_voxels] = full[contested_voxels]
    assert np.array_equal(counts, expected)  # counted where objects compete, untouched elsewhere


@pytest.mark.parametrize("layout", ["C", "F"])
def test_accumulate_static_is_the_per_point_rule_in_any_layout_and_prefix(layout: str) -> None:
    """The blocked (vectorised) loop gives the voxels of the per-point rule (:func:`vo.points_to_voxels`)
    bit for bit, row-major or column-major, over several blocks and a partial last block, for points on
    voxel faces, on the grid's maximum (outside), far outside and NaN, and only for ``points[:stop]``."""
    rng = np.random.default_rng(5)
    n = 3 * vo._BLOCK + 17
    pts = (rng.uniform(-60, 60, (n, 3)) * [1, 1, 0.08]).astype(np.float32)
    pts[:200] = np.round(pts[:200] * 2) / 2  # on voxel faces (before the transform's rounding)
    pts[200] = [50.0, 0.0, 0.0]  # x on the maximum: outside
    pts[201] = [1e30, -1e30, 0.0]
    pts[202] = [np.nan, 1.0, 1.0]
    pts = np.asarray(pts, order=layout)
    yaw = 0.4
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0.01], [np.sin(yaw), np.cos(yaw), 0.0], [-0.01, 0.0, 1.0]])
    for r, t in ((np.eye(3), np.zeros(3)), (rot, np.array([0.31, -2.2, 0.17]))):
        for stop in (-1, n - 1000, 0):
            take = pts if stop < 0 else pts[:stop]
            ref = vo.points_to_voxels(np.ascontiguousarray(take), r, t, LO, VS, SHAPE)
            full = np.bincount(ref[ref >= 0], minlength=NV)
            contested = bits_of(full > 1)  # every voxel with two points or more
            occupied = np.zeros_like(contested)
            counts = np.zeros(NV, np.int32)
            inside = vo.accumulate_static(pts, r, t, LO, VS, SHAPE, occupied, contested, counts, stop)
            assert inside == np.count_nonzero(ref >= 0)
            assert np.array_equal(occupied, bits_of(full))
            assert np.array_equal(counts, np.where(full > 1, full, 0))


@pytest.mark.parametrize("layout", ["C", "F"])
def test_static_cells_are_the_distinct_lattice_cells_with_their_mean_and_count(layout: str) -> None:
    """Against numpy (np.unique of the floored lattice coordinates): each cell once, in the order of its
    first point, with the mean of its points and their number; only ``points[:stop]``; points 2^20 cells
    or more from the sweep's translation (and non-finite ones) are counted as far and left out."""
    rng = np.random.default_rng(21)
    n = 5000
    pts = rng.uniform(-3, 3, (n, 3))
    pts[::3] = pts[1::3][: len(pts[::3])]  # repeated points: several per cell
    pts[100] = [1e9, 0.0, 0.0]  # far
    pts[101] = [np.nan, 0.0, 0.0]
    pts = np.asarray(pts.astype(np.float32), order=layout)
    yaw = 0.7
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
    trans = np.array([1234.56, -987.6, 3.2])  # a sweep away from the lattice's origin
    cell = 0.125
    stop = n - 7
    means, counts, far = vo.static_cells(pts, stop, rot, trans, cell)
    assert means.flags.f_contiguous and means.dtype == np.float32 and counts.dtype == np.int32
    assert far == 2
    q = pts[:stop].astype(np.float64) @ rot.T + trans
    keep = np.all(np.isfinite(q), axis=1) & (np.abs(q - trans).max(axis=1) < 1e5)
    q = q[keep]
    ijk = np.floor(q / cell).astype(np.int64)
    uniq, first, inverse, ref_counts = np.unique(ijk, axis=0, return_index=True, return_inverse=True,
                                                  return_counts=True)  # fmt: skip
    order = np.argsort(first)  # cells in the order of their first point
    sums = np.zeros((len(uniq), 3))
    np.add.at(sums, inverse.reshape(-1), q)
    ref_means = (sums / ref_counts[:, None])[order]
    assert len(means) == len(uniq) < 0.8 * stop  # repeated points share cells
    assert np.array_equal(counts, ref_counts[order])
    np.testing.assert_allclose(means, ref_means, rtol=0, atol=1e-3)  # float32 of ~1000 m
    assert np.array_equal(np.floor(means.astype(np.float64)[:, 2] / cell), uniq[order][:, 2])  # in their cell


def test_accumulate_static_with_weights_counts_each_row_as_its_points() -> None:
    """A cell of ``w`` points counts ``w`` in the result and at contested voxels: as its points repeated."""
    rng = np.random.default_rng(8)
    pts = np.asfortranarray((rng.uniform(-60, 60, (4000, 3)) * [1, 1, 0.06]).astype(np.float32))
    weights = rng.integers(1, 6, len(pts)).astype(np.int32)
    rot, trans = np.eye(3), np.array([0.2, 0.1, -0.05])
    repeated = np.ascontiguousarray(np.repeat(pts, weights, axis=0))
    ref = vo.points_to_voxels(repeated, rot, trans, LO, VS, SHAPE)
    full = np.bincount(ref[ref >= 0], minlength=NV)
    contested = bits_of(full > 3)
    for layout_pts in (pts, np.ascontiguousarray(pts)):  # the blocked and the per-point loop
        occupied = np.zeros_like(contested)
        counts = np.zeros(NV, np.int32)
        inside = vo.accumulate_static(
            layout_pts, rot, trans, LO, VS, SHAPE, occupied, contested, counts, -1, weights
        )
        assert inside == np.count_nonzero(ref >= 0)
        assert np.array_equal(occupied, bits_of(full))
        assert np.array_equal(counts, np.where(full > 3, full, 0))


def test_vote_majority_ties_to_lowest_id_and_flow_of_the_winner() -> None:
    static = np.zeros(NV, np.int32)
    # voxel 10: 2 background vs 2 pedestrian (7) -> 7 (lower id); voxel 20: 3 bg vs 2 vehicle -> 10;
    # voxel 30: 1 vehicle (0), 1 barrier (9) -> 0; voxel 40: 2 cones (8) -> 8, flow mean
    static[10], static[20], static[50] = 2, 3, 1
    vox = np.array([10, 10, 20, 20, 30, 30, 40, 40, -1])
    cls = np.array([7, 7, 0, 0, 0, 9, 8, 8, 0], np.uint8)
    vel = np.array([[1, 0], [3, 0], [5, 5], [5, 5], [2, 2], [9, 9], [1, 1], [2, 4], [7, 7]], float)
    sem = np.empty(NV, np.uint8)
    flow = np.empty((NV, 2), np.float32)
    ws = np.full(NV, -1, np.int32)
    counts = static.copy()
    assert vo.vote(bits_of(static), counts, vox, cls, vel, sem, flow, ws) == 4
    assert np.all(ws == -1)
    assert counts[50] == 1 and np.count_nonzero(counts) == 1  # reset at the object voxels only
    assert list(sem[[10, 20, 30, 40, 50, 0]]) == [7, 10, 0, 8, 10, FREE]
    np.testing.assert_allclose(flow[[10, 20, 30, 40, 50]], [[2, 0], [0, 0], [2, 2], [1.5, 2.5], [0, 0]])
    assert np.count_nonzero(sem != FREE) == 5


def test_vote_agrees_with_a_sorting_reference() -> None:
    rng = np.random.default_rng(6)
    static = np.zeros(NV, np.int32)
    np.add.at(static, rng.integers(0, 2000, 5000), 1)
    vox = rng.integers(-1, 2000, 8000)
    cls = rng.choice(np.array([0, 4, 5, 6, 7, 8, 9], np.uint8), 8000)
    vel = rng.normal(size=(8000, 2))
    sem = np.empty(NV, np.uint8)
    flow = np.empty((NV, 2), np.float32)
    vo.vote(bits_of(static), static.copy(), vox, cls, vel, sem, flow, np.full(NV, -1, np.int32))
    # reference: counts per (voxel, class) by bincount, argmax (first max = lowest id)
    keep = vox >= 0
    counts = np.zeros((2000, 11), np.int64)
    np.add.at(counts, (vox[keep], cls[keep]), 1)
    counts[:, 10] = static[:2000]
    vsum = np.zeros((2000, 11, 2))
    np.add.at(vsum, (vox[keep], cls[keep]), vel[keep])
    win = np.argmax(counts, axis=1)
    occupied = counts.sum(axis=1) > 0
    assert np.array_equal(sem[:2000], np.where(occupied, win, FREE))
    n = counts[np.arange(2000), win]
    ref_flow = np.where(
        (win < 10)[:, None] & occupied[:, None], vsum[np.arange(2000), win] / np.maximum(n, 1)[:, None], 0
    )
    np.testing.assert_allclose(flow[:2000], ref_flow, atol=1e-5)
    assert np.all(sem[2000:] == FREE)


# -- ray casting ----------------------------------------------------------------------------------------


def _segment_box_distance(o: np.ndarray, e: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Distance between the segment o-e and the box [lo, hi] (0 if they meet), by dense sampling + slab test."""
    d = e - o
    s0, s1 = 0.0, 1.0
    for a in range(3):
        if d[a] == 0:
            if not lo[a] <= o[a] <= hi[a]:
                return np.inf
        else:
            ta, tb = sorted(((lo[a] - o[a]) / d[a], (hi[a] - o[a]) / d[a]))
            s0, s1 = max(s0, ta), min(s1, tb)
    return 0.0 if s0 <= s1 + 1e-9 else np.inf


def _check_single_ray(o: np.ndarray, e: np.ndarray, grid: VoxelGrid) -> None:
    lo, vs, shape = vo.grid_params(grid)
    state = np.zeros(grid.num_voxels, np.uint8)
    visits = vo.cast_rays(o, e[None], lo, vs, shape, state)
    assert visits == np.count_nonzero(state)
    end_vox = ref_voxels(e[None], grid)[0]
    free = np.flatnonzero(state == vo.OBSERVED_FREE)
    hit = np.flatnonzero(state == vo.OBSERVED_HIT)
    if end_vox >= 0:
        assert list(hit) == [end_vox]  # the end voxel is hit, never free
    else:
        assert hit.size == 0  # a ray ending outside the grid hits nothing
    # every observed voxel touches the segment (within rounding)
    ijk = np.stack(np.unravel_index(np.flatnonzero(state), grid.shape), axis=1)
    for v in ijk:
        vlo = lo + v * vs - 1e-7
        assert _segment_box_distance(o, e, vlo, vlo + vs + 2e-7) == 0.0, (o, e, v)
    # every voxel the segment passes through (dense sampling) is observed; all but the end one free
    samples = o + np.linspace(0, 1, 20001)[:, None] * (e - o)
    sampled = np.unique(ref_voxels(samples, grid))
    sampled = sampled[sampled >= 0]
    assert set(sampled) <= set(np.flatnonzero(state))
    assert set(sampled) - {end_vox} <= set(free)


def test_dda_free_voxels_lie_on_the_segment_and_the_hit_is_never_free() -> None:
    rng = np.random.default_rng(7)
    lo = np.asarray(SMALL.range_min_m)
    hi = np.asarray(SMALL.range_max_m)
    for _ in range(150):
        o = rng.uniform(lo, hi)
        e = rng.uniform(lo - 3, hi + 3)  # about half the ends lie outside the grid
        _check_single_ray(o, e, SMALL)
    for _ in range(40):  # sensor outside the grid too (rays of other sweeps)
        _check_single_ray(rng.uniform(lo - 5, hi + 5), rng.uniform(lo - 5, hi + 5), SMALL)
    # axis-aligned and degenerate rays
    _check_single_ray(np.array([0.1, 0.2, 0.3]), np.array([3.7, 0.2, 0.3]), SMALL)
    _check_single_ray(np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3]), SMALL)
    _check_single_ray(np.array([0.0, 0.0, 0.0]), np.array([2.0, 2.0, 0.0]), SMALL)  # through voxel corners


def test_dda_rays_missing_the_grid_or_non_finite_mark_nothing() -> None:
    lo, vs, shape = vo.grid_params(SMALL)
    state = np.zeros(SMALL.num_voxels, np.uint8)
    ends = np.array([[10.0, 10, 10], [np.nan, 0, 0], [np.inf, 1, 1]])
    assert vo.cast_rays(np.array([9.0, 9, 9]), ends, lo, vs, shape, state) == 0
    assert not state.any()


def test_dedup_rays_hit_the_same_voxels_and_observe_along_the_rays() -> None:
    rng = np.random.default_rng(8)
    pts = np.concatenate(
        [rng.uniform(-60, 60, (20000, 3)) * [1, 1, 0.05], rng.normal(0, 3, (20000, 3)) * [1, 1, 0.2]]
    )
    origin = np.array([0.5, 0.1, 1.8])
    exact = np.zeros(NV, np.uint8)
    vo.cast_rays(origin, pts, LO, VS, SHAPE, exact)
    dedup = np.zeros(NV, np.uint8)
    ws = np.zeros(NV, np.uint8)
    rays, _ = vo.cast_rays_dedup(
        origin, pts.astype(np.float32), np.eye(3), np.zeros(3), LO, VS, SHAPE, dedup, ws
    )
    assert not ws.any()
    distinct_hits = np.unique(ref_voxels(pts, GRID)).size - 1  # minus the -1 of outside points
    assert distinct_hits <= rays < 0.6 * len(pts)  # one ray per distinct end voxel
    assert np.array_equal(np.flatnonzero(exact == 2), np.flatnonzero(dedup == 2))
    # paths differ by at most half a voxel at the far end: the observed sets nearly agree
    both = np.count_nonzero((exact > 0) & (dedup > 0))
    assert both / np.count_nonzero(exact > 0) > 0.9 and both / np.count_nonzero(dedup > 0) > 0.9


@pytest.mark.parametrize("shuffle_seed", [11, 12])
def test_ray_state_does_not_depend_on_point_order(shuffle_seed: int) -> None:
    rng = np.random.default_rng(9)
    pts = rng.uniform(-55, 55, (5000, 3)) * [1, 1, 0.06]
    origin = np.array([0.0, 0.0, 1.5])
    a = np.zeros(NV, np.uint8)
    b = np.zeros(NV, np.uint8)
    vo.cast_rays(origin, pts, LO, VS, SHAPE, a)
    vo.cast_rays(origin, pts[np.random.default_rng(shuffle_seed).permutation(len(pts))], LO, VS, SHAPE, b)
    assert np.array_equal(a, b)


def test_finite_points_and_partition_keep_order_and_split_by_box_and_band() -> None:
    pts = np.arange(24, dtype=np.float64).reshape(8, 3)
    pts[2, 1] = np.nan
    pts[5, 2] = -np.inf
    clean, bad = vo.finite_points(pts)
    assert bad == 2 and clean.dtype == np.float32
    assert np.array_equal(clean, pts[[0, 1, 3, 4, 6, 7]].astype(np.float32))
    box_of = np.array([-1, 0, 1, -1, 0, 1], np.int32)
    local = np.zeros((6, 3), np.float32)
    local[:, 2] = [0.0, -0.95, 0.3, 0.0, 0.2, -0.5]
    floor_z = np.array([-0.9, -0.4])  # box 0's band ends at -0.9, box 1's at -0.4
    ordered, n_static, obj_local, obj_box, dropped = vo.partition_points(clean, box_of, local, floor_z)
    assert n_static == 2 and dropped == 2  # rows 1 (box 0, z -0.95) and 5 (box 1, z -0.5) are in the band
    assert np.array_equal(ordered, clean[[0, 3, 2, 4]])  # static first, then objects, input order kept
    assert np.array_equal(obj_box, [1, 0]) and np.array_equal(obj_local, local[[2, 4]])
