"""Compiled (numba) kernels of the label generator: points in boxes, voxel counting, voting, ray casting.

Conventions:

* Points are rows ``(N, 3)``; a transform ``target_from_source`` is applied as ``p @ R.T + t``.
* Kernels index voxels by their **C-order position** in the dense ``(nx, ny, nz)`` array,
  ``lin = (x * ny + y) * nz + z`` (so ``dense.reshape(-1)[lin]`` is the voxel). OpenScene's flat index
  ``x + nx*y + nx*ny*z`` belongs to the sparse file form only (one implementation:
  :func:`driveengine.formats.openscene_labels.dense_to_sparse` and ``sparse_to_dense``).
* The grid range is half-open: a coordinate ``c`` is inside iff ``lo <= c < hi``; a point exactly at a
  maximum is outside, and points outside are dropped, never clamped into the grid.
* Voxel sets are bitsets of uint64 words (bit ``v & 63`` of word ``v >> 6``, :func:`bitset_words`):
  80 kB for the 640k-voxel grid, small enough to stay in cache in the per-point loops.
* Kernels are serial and deterministic (integer counting; ties go to the lowest class id): the
  runner parallelises over logs, one process per log.

Per frame the generator calls :func:`place_objects` for the object points of every window sweep,
:func:`mark_voxels` on their voxels, :func:`accumulate_static` for the background points,
:func:`vote`, then :func:`cast_rays_dedup` (or :func:`cast_rays`) for visibility; per sweep, once,
:func:`finite_points`, :func:`points_in_boxes` and :func:`partition_points`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from driveengine.schemas.classes import BACKGROUND, FREE
from driveengine.schemas.grid import VoxelGrid

#: Number of class ids an object point can carry (0..9 are foreground; see schemas/classes.py).
NUM_OBJECT_CLASSES = BACKGROUND

#: ``mask`` / ray-state values written by :func:`cast_rays`.
UNOBSERVED, OBSERVED_FREE, OBSERVED_HIT = 0, 1, 2


def grid_params(grid: VoxelGrid) -> tuple[np.ndarray, float, np.ndarray]:
    """``(lo, voxel_size, shape)`` of ``grid`` as the kernels take them: float64 (3,), float, int64 (3,)."""
    return (
        np.asarray(grid.range_min_m, dtype=np.float64),
        float(grid.voxel_size_m),
        np.asarray(grid.shape, dtype=np.int64),
    )


# -- points to voxels ---------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _voxel_of(x: float, y: float, z: float, lo: np.ndarray, inv_vs: float, shape: np.ndarray) -> int:
    """C-order position of the voxel holding (x, y, z), or -1 if outside the half-open range or non-finite."""
    fx = (x - lo[0]) * inv_vs
    fy = (y - lo[1]) * inv_vs
    fz = (z - lo[2]) * inv_vs
    nx, ny, nz = shape[0], shape[1], shape[2]
    # Branch-free: points arrive in no useful order, so a mispredicted branch per point would cost
    # more than the arithmetic. Coordinates are clamped before the integer conversion (keeping it
    # defined for huge values); NaN fails every comparison and is rejected by ``ok``.
    ok = (fx >= 0.0) & (fy >= 0.0) & (fz >= 0.0) & (fx < nx) & (fy < ny) & (fz < nz)
    ix = int(min(max(fx, 0.0), nx - 1.0))
    iy = int(min(max(fy, 0.0), ny - 1.0))
    iz = int(min(max(fz, 0.0), nz - 1.0))
    return (ix * ny + iy) * nz + iz if ok else -1


@numba.njit(cache=True, inline="always")
def _voxel_units_affine(
    rotation: np.ndarray, translation: np.ndarray, lo: np.ndarray, vs: float
) -> tuple[float, float, float, float, float, float, float, float, float, float, float, float]:
    """``grid_from_source`` with the grid offset and scale folded in, as 12 scalars (row-major R, then t).

    A point ``p`` maps to ``R' p + t'`` in voxel units from the grid minimum (``R' = rotation / vs``,
    ``t' = (translation - lo) / vs``), so a point costs nine multiply-adds: see :func:`_scaled_voxel`.
    """
    inv = 1.0 / vs
    return (
        rotation[0, 0] * inv, rotation[0, 1] * inv, rotation[0, 2] * inv,
        rotation[1, 0] * inv, rotation[1, 1] * inv, rotation[1, 2] * inv,
        rotation[2, 0] * inv, rotation[2, 1] * inv, rotation[2, 2] * inv,
        (translation[0] - lo[0]) * inv, (translation[1] - lo[1]) * inv, (translation[2] - lo[2]) * inv,
    )  # fmt: skip


@numba.njit(cache=True, inline="always")
def _scaled_voxel(
    px: float, py: float, pz: float, a: tuple, fnx: float, fny: float, fnz: float, ny: int, nz: int
) -> int:
    """C-order voxel position of point ``(px, py, pz)`` under the affine ``a`` (see
    :func:`_voxel_units_affine`); -1 outside the half-open grid or non-finite (NaN fails every comparison)."""
    fx = a[0] * px + a[1] * py + a[2] * pz + a[9]
    fy = a[3] * px + a[4] * py + a[5] * pz + a[10]
    fz = a[6] * px + a[7] * py + a[8] * pz + a[11]
    # '&' rather than 'and': one branch instead of six
    if (fx >= 0.0) & (fy >= 0.0) & (fz >= 0.0) & (fx < fnx) & (fy < fny) & (fz < fnz):
        return (np.int64(fx) * ny + np.int64(fy)) * nz + np.int64(fz)
    return -1


@numba.njit(cache=True)
def points_to_voxels(
    points: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    lo: np.ndarray,
    vs: float,
    shape: np.ndarray,
) -> np.ndarray:
    """C-order voxel positions (N,) int64 of ``points @ rotation.T + translation``; -1 outside or non-finite.

    Args:
        points: (N, 3) float32/float64, source frame, metres.
        rotation, translation: ``grid_from_source`` (3, 3) and (3,), float64.
        lo, vs, shape: the grid, from :func:`grid_params`.
    """
    n = points.shape[0]
    out = np.empty(n, dtype=np.int64)
    inv_vs = 1.0 / vs
    r00, r01, r02 = rotation[0, 0], rotation[0, 1], rotation[0, 2]
    r10, r11, r12 = rotation[1, 0], rotation[1, 1], rotation[1, 2]
    r20, r21, r22 = rotation[2, 0], rotation[2, 1], rotation[2, 2]
    t0, t1, t2 = translation[0], translation[1], translation[2]
    for i in range(n):
        px, py, pz = float(points[i, 0]), float(points[i, 1]), float(points[i, 2])
        x = r00 * px + r01 * py + r02 * pz + t0
        y = r10 * px + r11 * py + r12 * pz + t1
        z = r20 * px + r21 * py + r22 * pz + t2
        out[i] = _voxel_of(x, y, z, lo, inv_vs, shape)
    return out


@numba.njit(cache=True)
def accumulate_counts(
    points: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    lo: np.ndarray,
    vs: float,
    shape: np.ndarray,
    counts: np.ndarray,
) -> int:
    """Add one to ``counts[voxel]`` for every point of ``points @ rotation.T + translation`` in the grid.

    A fused transform + voxelise + count, the hot loop of aggregation (every point of every window
    sweep, every frame). The grid offset and scale are folded into the transform, so a point costs
    nine multiply-adds, six comparisons and one increment. ``counts`` is (nx*ny*nz,) int32 in C order.
    Returns the number of points that landed in the grid.
    """
    nx, ny, nz = shape[0], shape[1], shape[2]
    fnx, fny, fnz = float(nx), float(ny), float(nz)
    a = _voxel_units_affine(rotation, translation, lo, vs)
    inside = 0
    for i in range(points.shape[0]):
        px, py, pz = np.float64(points[i, 0]), np.float64(points[i, 1]), np.float64(points[i, 2])
        v = _scaled_voxel(px, py, pz, a, fnx, fny, fnz, ny, nz)
        if v >= 0:
            counts[v] += 1
            inside += 1
    return inside


@numba.njit(cache=True)
def place_objects(
    local: np.ndarray,
    track: np.ndarray,
    cls: np.ndarray,
    track_slot: np.ndarray,
    slot_rotation: np.ndarray,
    slot_translation: np.ndarray,
    slot_velocity: np.ndarray,
    lo: np.ndarray,
    vs: float,
    shape: np.ndarray,
    out_voxel: np.ndarray,
    out_class: np.ndarray,
    out_velocity: np.ndarray,
    offset: int,
) -> tuple[int, int]:
    """Re-place object points at their track's box of the target frame and append them to the outputs.

    Point ``i`` goes to ``local[i] @ R[s].T + t[s]`` with ``s = track_slot[track[i]]``; it is dropped
    if ``s < 0`` (the track has no box at the target frame) and skipped if it lands outside the grid.

    Args:
        local: (N, 3) points in the frame of their box, metres.
        track: (N,) int track id of each point; cls: (N,) uint8 class id.
        track_slot: (num_tracks,) int, slot of each track at the target frame or -1.
        slot_rotation, slot_translation: (S, 3, 3), (S, 3) ``grid_from_box`` per slot, float64.
        slot_velocity: (S, 2) (vx, vy) per slot in the grid frame, m/s.
        out_voxel, out_class, out_velocity: (capacity,), (capacity,), (capacity, 2) outputs, written
            from ``offset`` on (capacity >= offset + N).

    Returns:
        ``(new_offset, dropped)``: the end of the written rows and the points dropped for want of a box.
    """
    inv_vs = 1.0 / vs
    j = offset
    dropped = 0
    for i in range(local.shape[0]):
        s = track_slot[track[i]]
        if s < 0:
            dropped += 1
            continue
        px, py, pz = float(local[i, 0]), float(local[i, 1]), float(local[i, 2])
        r = slot_rotation[s]
        t = slot_translation[s]
        x = r[0, 0] * px + r[0, 1] * py + r[0, 2] * pz + t[0]
        y = r[1, 0] * px + r[1, 1] * py + r[1, 2] * pz + t[1]
        z = r[2, 0] * px + r[2, 1] * py + r[2, 2] * pz + t[2]
        v = _voxel_of(x, y, z, lo, inv_vs, shape)
        if v < 0:
            continue
        out_voxel[j] = v
        out_class[j] = cls[i]
        out_velocity[j, 0] = slot_velocity[s, 0]
        out_velocity[j, 1] = slot_velocity[s, 1]
        j += 1
    return j, dropped


# -- points in boxes ------------------------------------------------------------------------------------


@numba.njit(cache=True)
def points_in_boxes(
    points: np.ndarray,
    box_rotation: np.ndarray,
    box_translation: np.ndarray,
    half_lo: np.ndarray,
    half_hi: np.ndarray,
    cell_m: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign points to (enlarged) boxes with a BEV bin index over the boxes' footprints.

    A box ``b`` holds the points whose box-frame coordinates ``q = p @ R[b].T + t[b]`` satisfy
    ``half_lo[b] <= q <= half_hi[b]`` (closed, per axis). A point in several boxes goes to the box in
    whose extent it lies deepest: the smallest normalised L-infinity distance to the extent's centre,
    ties to the lowest box index (order of the points never matters).

    Args:
        points: (N, 3) points, metres, in the frame the boxes are given in (the sweep's ego frame).
        box_rotation, box_translation: (B, 3, 3), (B, 3) ``box_from_points_frame`` transforms.
        half_lo, half_hi: (B, 3) lower / upper bounds of each box in its own frame, metres
            (e.g. ``-size/2 - margin`` and ``size/2 + margin``). Boxes with a non-positive extent are
            never matched.
        cell_m: BEV bin size, metres (about the size of a car).

    Returns:
        ``box`` (N,) int32, -1 for points in no box, and ``local`` (N, 3) float32: the points in the
        frame of their box (undefined where ``box == -1``).
    """
    n = points.shape[0]
    nb = box_rotation.shape[0]
    box_of = np.full(n, -1, dtype=np.int32)
    local = np.zeros((n, 3), dtype=np.float32)
    if nb == 0 or n == 0:
        return box_of, local
    # Footprint of each box in the points frame: a circle around its centre -> axis-aligned xy bounds.
    bx0 = np.empty(nb)
    bx1 = np.empty(nb)
    by0 = np.empty(nb)
    by1 = np.empty(nb)
    valid = np.zeros(nb, dtype=np.bool_)
    for b in range(nb):
        ok = True
        for a in range(3):
            if not (half_hi[b, a] > half_lo[b, a]):
                ok = False
        if not ok:
            continue
        # centre of the box in the points frame: -R^T t
        r = box_rotation[b]
        t = box_translation[b]
        cx = -(r[0, 0] * t[0] + r[1, 0] * t[1] + r[2, 0] * t[2])
        cy = -(r[0, 1] * t[0] + r[1, 1] * t[1] + r[2, 1] * t[2])
        rad = 0.0
        for a in range(3):
            m = max(abs(half_lo[b, a]), abs(half_hi[b, a]))
            rad += m * m
        rad = math.sqrt(rad)
        if not (math.isfinite(cx) and math.isfinite(cy) and math.isfinite(rad)):
            continue
        valid[b] = True
        bx0[b], bx1[b], by0[b], by1[b] = cx - rad, cx + rad, cy - rad, cy + rad
    if not valid.any():
        return box_of, local
    gx0 = np.inf
    gy0 = np.inf
    gx1 = -np.inf
    gy1 = -np.inf
    for b in range(nb):
        if valid[b]:
            gx0 = min(gx0, bx0[b])
            gy0 = min(gy0, by0[b])
            gx1 = max(gx1, bx1[b])
            gy1 = max(gy1, by1[b])
    cell = cell_m
    while (gx1 - gx0) / cell * (gy1 - gy0) / cell > 4.0e6:  # keep the bin index small
        cell *= 2.0
    ncx = int((gx1 - gx0) / cell) + 1
    ncy = int((gy1 - gy0) / cell) + 1
    # CSR lists of boxes per cell.
    cnt = np.zeros(ncx * ncy + 1, dtype=np.int64)
    for b in range(nb):
        if valid[b]:
            for ix in range(int((bx0[b] - gx0) / cell), int((bx1[b] - gx0) / cell) + 1):
                for iy in range(int((by0[b] - gy0) / cell), int((by1[b] - gy0) / cell) + 1):
                    cnt[ix * ncy + iy + 1] += 1
    start = np.cumsum(cnt)
    fill = start[:-1].copy()
    cell_boxes = np.empty(start[-1], dtype=np.int32)
    for b in range(nb):
        if valid[b]:
            for ix in range(int((bx0[b] - gx0) / cell), int((bx1[b] - gx0) / cell) + 1):
                for iy in range(int((by0[b] - gy0) / cell), int((by1[b] - gy0) / cell) + 1):
                    c = ix * ncy + iy
                    cell_boxes[fill[c]] = b
                    fill[c] += 1
    for i in range(n):
        px, py, pz = float(points[i, 0]), float(points[i, 1]), float(points[i, 2])
        fx = (px - gx0) / cell
        fy = (py - gy0) / cell
        if not (fx >= 0.0 and fy >= 0.0 and fx < ncx and fy < ncy):
            continue
        c = int(fx) * ncy + int(fy)
        best = -1
        best_d = np.inf
        bq0 = 0.0
        bq1 = 0.0
        bq2 = 0.0
        for j in range(start[c], start[c + 1]):
            b = cell_boxes[j]  # ascending within a cell, so ties keep the lowest index
            r = box_rotation[b]
            t = box_translation[b]
            q0 = r[0, 0] * px + r[0, 1] * py + r[0, 2] * pz + t[0]
            q1 = r[1, 0] * px + r[1, 1] * py + r[1, 2] * pz + t[1]
            q2 = r[2, 0] * px + r[2, 1] * py + r[2, 2] * pz + t[2]
            if not (half_lo[b, 0] <= q0 <= half_hi[b, 0]):
                continue
            if not (half_lo[b, 1] <= q1 <= half_hi[b, 1]):
                continue
            if not (half_lo[b, 2] <= q2 <= half_hi[b, 2]):
                continue
            d = 0.0
            qs = (q0, q1, q2)
            for a in range(3):
                mid = 0.5 * (half_lo[b, a] + half_hi[b, a])
                half = 0.5 * (half_hi[b, a] - half_lo[b, a])
                d = max(d, abs(qs[a] - mid) / half)
            if d < best_d:
                best_d = d
                best = b
                bq0, bq1, bq2 = q0, q1, q2
        if best >= 0:
            box_of[i] = best
            local[i, 0] = bq0
            local[i, 1] = bq1
            local[i, 2] = bq2
    return box_of, local


@numba.njit(cache=True)
def finite_points(points: np.ndarray) -> tuple[np.ndarray, int]:
    """The rows of ``points`` (N, 3) whose coordinates are all finite, as float32, and how many were not."""
    n = points.shape[0]
    keep = np.empty(n, dtype=np.bool_)
    bad = 0
    for i in range(n):
        ok = np.isfinite(points[i, 0]) and np.isfinite(points[i, 1]) and np.isfinite(points[i, 2])
        keep[i] = ok
        bad += not ok
    out = np.empty((n - bad, 3), dtype=np.float32)
    j = 0
    for i in range(n):
        if keep[i]:
            out[j, 0], out[j, 1], out[j, 2] = points[i, 0], points[i, 1], points[i, 2]
            j += 1
    return out, bad


@numba.njit(cache=True)
def partition_points(
    points: np.ndarray, box_of: np.ndarray, local: np.ndarray, floor_z: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, int]:
    """Split a sweep into static points, object points and dropped points (see :func:`points_in_boxes`).

    A point with ``box_of == -1`` is static; one with box ``b`` is an object point if its box-frame
    ``local[:, 2] >= floor_z[b]``, and dropped otherwise (it lies in the box's lowest band).

    Returns:
        ``(ordered, num_static, obj_local, obj_box, num_dropped)``: ``ordered`` (S + O, 3) float32 holds
        the static points then the object points (input order kept within each part), ``obj_local``
        (O, 3) float32 the object points in their box frame, ``obj_box`` (O,) int32 their box index.
    """
    n = points.shape[0]
    kind = np.empty(n, dtype=np.int8)  # 0 static, 1 object, 2 dropped
    ns = 0
    no = 0
    for i in range(n):
        b = box_of[i]
        if b < 0:
            kind[i] = 0
            ns += 1
        elif local[i, 2] >= floor_z[b]:
            kind[i] = 1
            no += 1
        else:
            kind[i] = 2
    ordered = np.empty((ns + no, 3), dtype=np.float32)
    obj_local = np.empty((no, 3), dtype=np.float32)
    obj_box = np.empty(no, dtype=np.int32)
    js = 0
    jo = 0
    for i in range(n):
        if kind[i] == 0:
            ordered[js, 0], ordered[js, 1], ordered[js, 2] = points[i, 0], points[i, 1], points[i, 2]
            js += 1
        elif kind[i] == 1:
            r = ns + jo
            ordered[r, 0], ordered[r, 1], ordered[r, 2] = points[i, 0], points[i, 1], points[i, 2]
            obj_local[jo, 0], obj_local[jo, 1], obj_local[jo, 2] = local[i, 0], local[i, 1], local[i, 2]
            obj_box[jo] = box_of[i]
            jo += 1
    return ordered, ns, obj_local, obj_box, n - ns - no


# -- voting -----------------------------------------------------------------------------------------------


def bitset_words(num_voxels: int) -> int:
    """Number of uint64 words of a voxel bitset (bit ``v & 63`` of word ``v >> 6`` is voxel ``v``)."""
    return (num_voxels + 63) // 64


@numba.njit(cache=True)
def mark_voxels(voxels: np.ndarray, bits: np.ndarray) -> None:
    """Set the bits of ``voxels`` (C-order positions; negative entries are ignored) in the bitset ``bits``."""
    for i in range(voxels.shape[0]):
        v = voxels[i]
        if v >= 0:
            bits[v >> 6] |= np.uint64(1) << np.uint64(v & 63)


@numba.njit(cache=True)
def accumulate_static(
    points: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    lo: np.ndarray,
    vs: float,
    shape: np.ndarray,
    occupied: np.ndarray,
    contested: np.ndarray,
    counts: np.ndarray,
) -> int:
    """Voxelise background points: mark their voxels occupied, and count them where objects compete.

    The hot loop of aggregation (every static point of every window sweep, every frame). A voxel's
    background count only matters where object points fall too (the majority vote); everywhere else
    occupancy is all there is. So the loop writes one bit per point into ``occupied`` (80 kB for the
    640k-voxel grid: it stays in cache, where a 2.5 MB count array would not) and touches ``counts``
    only for voxels set in ``contested``.

    Args:
        points: (N, 3) points in their sweep's ego frame, metres; ``points @ rotation.T + translation``
            is the grid frame.
        occupied, contested: (W,) uint64 voxel bitsets (:func:`bitset_words`); ``occupied`` is updated.
        counts: (V,) int32, incremented at contested voxels only.

    Returns:
        The number of points that landed in the grid.
    """
    nx, ny, nz = shape[0], shape[1], shape[2]
    fnx, fny, fnz = float(nx), float(ny), float(nz)
    a = _voxel_units_affine(rotation, translation, lo, vs)
    one = np.uint64(1)
    inside = 0
    for i in range(points.shape[0]):
        px, py, pz = np.float64(points[i, 0]), np.float64(points[i, 1]), np.float64(points[i, 2])
        v = _scaled_voxel(px, py, pz, a, fnx, fny, fnz, ny, nz)
        if v >= 0:
            w = v >> 6
            bit = one << np.uint64(v & 63)
            occupied[w] |= bit
            if contested[w] & bit:
                counts[v] += 1
            inside += 1
    return inside


@numba.njit(cache=True)
def vote(
    occupied: np.ndarray,
    static_counts: np.ndarray,
    obj_voxel: np.ndarray,
    obj_class: np.ndarray,
    obj_velocity: np.ndarray,
    semantics: np.ndarray,
    flow: np.ndarray,
    slot_ws: np.ndarray,
) -> int:
    """Majority vote per voxel between background points and object points, and the voxel flow.

    A voxel's class is the class with the most points in it (background points count for
    ``BACKGROUND``); ties go to the lowest class id; voxels with no point are ``FREE``. Its flow is the
    mean (vx, vy) of the points carrying the winning class, 0 for background and free voxels.

    Args:
        occupied: (W,) uint64 bitset of the voxels holding background points.
        static_counts: (V,) int32 background points per voxel; read (and reset to 0) only at voxels
            holding object points, so it may be zero elsewhere (see :func:`accumulate_static`).
        obj_voxel: (M,) int64 voxel of each object point, -1 to ignore it.
        obj_class: (M,) uint8 class id (< BACKGROUND) of each object point.
        obj_velocity: (M, 2) float (vx, vy) of each object point, m/s.
        semantics: (V,) uint8 output.
        flow: (V, 2) float32 output.
        slot_ws: (V,) int32 workspace, all -1 on entry and on return.

    Returns:
        The number of voxels that hold at least one object point.
    """
    nv = semantics.shape[0]
    for w in range(occupied.shape[0]):
        word = occupied[w]
        for b in range(min(64, nv - 64 * w)):
            semantics[64 * w + b] = BACKGROUND if (word >> np.uint64(b)) & np.uint64(1) else FREE
    flow[:] = 0.0
    m = obj_voxel.shape[0]
    # pass 1: a slot per distinct voxel (so the tables below are sized by voxels, not points)
    slot_voxel = np.empty(m, dtype=np.int64)
    ns = 0
    for i in range(m):
        v = obj_voxel[i]
        if v >= 0 and slot_ws[v] < 0:
            slot_ws[v] = ns
            slot_voxel[ns] = v
            ns += 1
    # pass 2: points and velocity sums per (slot, class)
    counts = np.zeros((ns, NUM_OBJECT_CLASSES), dtype=np.int32)
    vsum = np.zeros((ns, NUM_OBJECT_CLASSES, 2), dtype=np.float64)
    for i in range(m):
        v = obj_voxel[i]
        if v < 0:
            continue
        s = slot_ws[v]
        c = obj_class[i]
        counts[s, c] += 1
        vsum[s, c, 0] += obj_velocity[i, 0]
        vsum[s, c, 1] += obj_velocity[i, 1]
    for s in range(ns):
        v = slot_voxel[s]
        slot_ws[v] = -1
        best = BACKGROUND
        best_n = static_counts[v]
        static_counts[v] = 0
        for c in range(NUM_OBJECT_CLASSES - 1, -1, -1):  # descending, so '>=' keeps the lowest id on ties
            if counts[s, c] > 0 and counts[s, c] >= best_n:
                best = c
                best_n = counts[s, c]
        semantics[v] = best
        if best < BACKGROUND:
            flow[v, 0] = vsum[s, best, 0] / best_n
            flow[v, 1] = vsum[s, best, 1] / best_n
    return ns


# -- ray casting ------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _clip_segment(
    ox: float,
    oy: float,
    oz: float,
    dx: float,
    dy: float,
    dz: float,
    lo: np.ndarray,
    vs: float,
    shape: np.ndarray,
) -> tuple[float, float]:
    """Parameters ``(s0, s1)`` of the part of ``o + s*d``, ``s`` in [0, 1], inside the grid box; s0 > s1 if none."""
    s0 = 0.0
    s1 = 1.0
    for a in range(3):
        o = ox if a == 0 else (oy if a == 1 else oz)
        d = dx if a == 0 else (dy if a == 1 else dz)
        hi = lo[a] + shape[a] * vs
        if d == 0.0:
            if not (lo[a] <= o <= hi):
                return 2.0, 1.0
        else:
            ta = (lo[a] - o) / d
            tb = (hi - o) / d
            if ta > tb:
                ta, tb = tb, ta
            s0 = max(s0, ta)
            s1 = min(s1, tb)
    if not (s0 <= s1):  # also catches NaN
        return 2.0, 1.0
    return s0, s1


@numba.njit(cache=True, inline="always")
def _index(c: float, lo: float, inv_vs: float, n: int) -> int:
    """Voxel index along one axis of coordinate ``c``, clamped to [0, n - 1] (for points on the faces)."""
    k = math.floor((c - lo) * inv_vs)
    return min(max(k, 0), n - 1)


@numba.njit(cache=True, inline="always")
def _axis_setup(
    o: float, d: float, cur: int, end: int, lo: float, vs: float
) -> tuple[int, int, int, float, float]:
    """Amanatides-Woo state of one axis: (cur, step, remaining, t_max, t_delta)."""
    step = 1 if d > 0 else -1
    r = (end - cur) * step
    if r < 0 or d == 0.0:  # rounding at the grid faces: start on the end's plane
        cur = end
        r = 0
    if d != 0.0:
        boundary = lo + (cur + (1 if step > 0 else 0)) * vs
        return cur, step, r, (boundary - o) / d, vs / abs(d)
    return cur, step, r, np.inf, np.inf


@numba.njit(cache=True)
def _cast_one(
    ox: float,
    oy: float,
    oz: float,
    ex: float,
    ey: float,
    ez: float,
    end_is_hit: bool,
    lo: np.ndarray,
    vs: float,
    shape: np.ndarray,
    state: np.ndarray,
) -> int:
    """Trace the segment o->e through the grid (Amanatides-Woo); returns the number of voxels visited.

    The segment is clipped to the grid box first. Voxels before the last are marked OBSERVED_FREE
    (never downgrading OBSERVED_HIT); the last voxel is marked OBSERVED_HIT if ``end_is_hit`` else
    OBSERVED_FREE. The walk takes exactly as many steps per axis as the index difference between the
    first and last voxel, so it always ends in the last voxel.
    """
    dx, dy, dz = ex - ox, ey - oy, ez - oz
    s0, s1 = _clip_segment(ox, oy, oz, dx, dy, dz, lo, vs, shape)
    if s0 > s1:
        return 0
    inv_vs = 1.0 / vs
    nx, ny, nz = shape[0], shape[1], shape[2]
    ex_i = _index(ox + s1 * dx, lo[0], inv_vs, nx)
    ey_i = _index(oy + s1 * dy, lo[1], inv_vs, ny)
    ez_i = _index(oz + s1 * dz, lo[2], inv_vs, nz)
    cx, sx, rx, tmx, tdx = _axis_setup(ox, dx, _index(ox + s0 * dx, lo[0], inv_vs, nx), ex_i, lo[0], vs)
    cy, sy, ry, tmy, tdy = _axis_setup(oy, dy, _index(oy + s0 * dy, lo[1], inv_vs, ny), ey_i, lo[1], vs)
    cz, sz, rz, tmz, tdz = _axis_setup(oz, dz, _index(oz + s0 * dz, lo[2], inv_vs, nz), ez_i, lo[2], vs)
    total = rx + ry + rz
    sxv = sx * ny * nz  # steps of the C-order position per axis step
    syv = sy * nz
    v = (cx * ny + cy) * nz + cz
    for _ in range(total):
        if state[v] == UNOBSERVED:
            state[v] = OBSERVED_FREE
        # the axis whose next boundary comes first, among axes with steps left
        if rx > 0 and (ry == 0 or tmx <= tmy) and (rz == 0 or tmx <= tmz):
            v += sxv
            rx -= 1
            tmx += tdx
        elif ry > 0 and (rz == 0 or tmy <= tmz):
            v += syv
            ry -= 1
            tmy += tdy
        else:
            v += sz
            rz -= 1
            tmz += tdz
    if end_is_hit:
        state[v] = OBSERVED_HIT
    elif state[v] == UNOBSERVED:
        state[v] = OBSERVED_FREE
    return total + 1


@numba.njit(cache=True)
def _inside(x: float, y: float, z: float, lo: np.ndarray, vs: float, shape: np.ndarray) -> bool:
    return _voxel_of(x, y, z, lo, 1.0 / vs, shape) >= 0


@numba.njit(cache=True)
def cast_rays(
    origin: np.ndarray, ends: np.ndarray, lo: np.ndarray, vs: float, shape: np.ndarray, state: np.ndarray
) -> int:
    """Cast one ray from ``origin`` to every point of ``ends`` (exact segments), marking ``state``.

    Args:
        origin: (3,) sensor position in the grid frame, metres.
        ends: (N, 3) ray end points (the LiDAR returns) in the grid frame, metres. Non-finite rows are
            skipped.
        state: (V,) uint8, C order, updated in place: voxels a ray passes through before its end become
            OBSERVED_FREE (unless already OBSERVED_HIT), the voxel holding an end point inside the grid
            becomes OBSERVED_HIT; rays whose end lies outside the grid mark every voxel they cross as
            free; voxels no ray reaches stay UNOBSERVED.

    Returns:
        The number of voxel visits (the work done; for benchmarks).
    """
    visits = 0
    ox, oy, oz = float(origin[0]), float(origin[1]), float(origin[2])
    for i in range(ends.shape[0]):
        ex, ey, ez = float(ends[i, 0]), float(ends[i, 1]), float(ends[i, 2])
        if not (math.isfinite(ex) and math.isfinite(ey) and math.isfinite(ez)):
            continue
        visits += _cast_one(ox, oy, oz, ex, ey, ez, _inside(ex, ey, ez, lo, vs, shape), lo, vs, shape, state)
    return visits


@numba.njit(cache=True)
def cast_rays_dedup(
    origin: np.ndarray,
    ends: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    lo: np.ndarray,
    vs: float,
    shape: np.ndarray,
    state: np.ndarray,
    end_ws: np.ndarray,
) -> tuple[int, int]:
    """Like :func:`cast_rays`, but one ray per distinct end voxel, cast to that voxel's centre.

    The end voxel of a point is the voxel holding it (a hit), or for a point beyond the grid the voxel
    where its segment leaves the grid (free). Many returns share an end voxel (the ground near the car),
    so this casts several times fewer rays; a ray's path differs from the exact one by at most half a
    voxel at its end and not at all at the sensor. Hit voxels are exactly those of :func:`cast_rays`.

    Args:
        origin: (3,) sensor position in the grid frame, metres.
        ends: (N, 3) returns in their own frame; ``ends @ rotation.T + translation`` is the grid frame.
        state: (V,) uint8 ray state, updated in place (see :func:`cast_rays`).
        end_ws: (V,) uint8 workspace, all 0 on entry and on return.

    Returns:
        ``(rays, visits)``: rays cast and voxel visits.
    """
    ox, oy, oz = float(origin[0]), float(origin[1]), float(origin[2])
    n = ends.shape[0]
    ny, nz = shape[1], shape[2]
    uniq = np.empty(n, dtype=np.int64)
    nu = 0
    r = rotation
    inv_vs = 1.0 / vs
    for i in range(n):
        px, py, pz = float(ends[i, 0]), float(ends[i, 1]), float(ends[i, 2])
        ex = r[0, 0] * px + r[0, 1] * py + r[0, 2] * pz + translation[0]
        ey = r[1, 0] * px + r[1, 1] * py + r[1, 2] * pz + translation[1]
        ez = r[2, 0] * px + r[2, 1] * py + r[2, 2] * pz + translation[2]
        if not (math.isfinite(ex) and math.isfinite(ey) and math.isfinite(ez)):
            continue
        v = _voxel_of(ex, ey, ez, lo, inv_vs, shape)
        flag = 2
        if v < 0:
            # leaves the grid: the exit voxel of the clipped segment, if the segment meets the grid
            dx, dy, dz = ex - ox, ey - oy, ez - oz
            s0, s1 = _clip_segment(ox, oy, oz, dx, dy, dz, lo, vs, shape)
            if s0 > s1:
                continue
            v = (
                _index(ox + s1 * dx, lo[0], inv_vs, shape[0]) * ny + _index(oy + s1 * dy, lo[1], inv_vs, ny)
            ) * nz + _index(oz + s1 * dz, lo[2], inv_vs, nz)
            flag = 1
        if end_ws[v] == 0:
            uniq[nu] = v
            nu += 1
        if flag > end_ws[v]:
            end_ws[v] = flag
    visits = 0
    for j in range(nu):
        v = uniq[j]
        ix = v // (ny * nz)
        iy = (v // nz) % ny
        iz = v % nz
        cx = lo[0] + (ix + 0.5) * vs
        cy = lo[1] + (iy + 0.5) * vs
        cz = lo[2] + (iz + 0.5) * vs
        visits += _cast_one(ox, oy, oz, cx, cy, cz, end_ws[v] == 2, lo, vs, shape, state)
        end_ws[v] = 0
    return nu, visits
