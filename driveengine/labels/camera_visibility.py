"""Camera visibility of the label voxels (``mask_camera``), Occ3D's meaning, computed from the labels.

A voxel is **camera-observed** when a ray from a camera's optical centre through the image reaches it
before it crosses any occupied voxel: the rays are traversed through the frame's ``semantics`` (3D DDA,
Amanatides-Woo); every voxel a ray enters is observed, up to and including the first occupied voxel,
where the ray stops; a voxel that no ray reaches (behind an occupied voxel, outside every image) is not.

**Which rays.** One ray per pixel would be exact for the image but cost millions of rays per frame.
Rays are cast through a *pixel lattice* instead: every ``s``-th pixel centre (row and column). On the
plane at depth ``z`` in front of the camera (distance along its optical axis) the lattice's rays are
``z`` times their undistorted normalised image coordinates apart (``z * s / f`` for a pinhole camera of
focal length ``f`` pixels), and where every cell of neighbouring rays has sides of at most
``voxel / sqrt(2)`` every voxel whose face the camera sees head-on is entered by a ray (a disc of
diameter ``voxel`` always holds a point of such a lattice). A face seen head-on is, to first order, that
plane projected onto the face, so a cell's sides are measured without their part along the ray
(:func:`_face_gaps`: at the image's edges the radial spacing shrinks). ``s`` is the largest stride for
which every lattice cell keeps that spacing at the deepest point of the grid box it can see, starting
from the pinhole stride ``max(1, floor(f * voxel / (sqrt(2) * z_max)))`` (:func:`lattice_stride`) with
``z_max`` the deepest point of the box in the camera's view. The depth a cell can see is bounded per image
tile (:data:`TILES` x :data:`TILES`): the largest depth of the box inside the pyramid of the tile's
undistorted bounding rectangle, an exact small linear programme (:func:`cone_depths`). So a camera
looking along the grid's long axis (OpenScene's front camera, 48 m deep at most) gets a coarser lattice
than one looking at a corner (68 m), and lens distortion, which spreads the lattice at the image's edges,
makes the stride smaller where it must. An image too coarse for that (``s = 1``) is sampled at every
pixel: then far voxels are observed as densely as the image resolves them, which is Occ3D's per-pixel
definition.

**Levels (cost).** Near the camera the lattice is far denser than needed: at depth ``z`` a spacing of
``voxel * z / z_max`` casts ``(z_max / z)^2`` rays per voxel. The lattice is therefore split into
``LEVELS + 1`` nested levels: level 0 is every ``2^LEVELS``-th lattice point, level ``k`` adds the points
of stride ``2^(LEVELS - k)``. A level-``k`` ray is only needed beyond the depth where a level-``k - 1``
cell holding it (or a finer cell holding it, whose corners it must then provide) stops being dense
enough, ``voxel / (sqrt(2) * side)``, for the cells whose rays reach deeper than that into the grid; it
starts at that depth divided by the cosine of its angle to the optical axis (its distance there). A ray
beyond the coarser levels' last row or column (the image's right and bottom edges) has no coarser cell
and starts at the camera. Its *parent* is the nearest level ``k - 1`` ray. While walking, a ray records
where it first entered a voxel within one voxel of an occupied one (``t_near``). A child starts at its
start distance, or, when its parent's ``t_near`` comes first, at the last checkpoint of its own walk
(every 8 voxels, see below) at or before ``RESTART_VOXELS`` voxels before that ``t_near``: up to there the
parent's path kept a voxel away from everything occupied, so the child's path (less than a voxel beside
it, and beside every ancestor over the part that ancestor vouches for: checked, and the camera's start
distances scaled down where it would not hold, :func:`_start_scale`) crossed only free voxels. Starting
later never lets a ray see through an occupied voxel (and starting earlier only walks more), and every
voxel seen head-on is still entered by a ray walked at its depth. The result is that of casting every
lattice ray from the camera up to the rare voxel entered only by a child's skipped part (on the synthetic
world's frames 12 of 251k observed voxels at ``openscene``, 18 of 1.35M at ``fine``), at 40-55 % of the
voxel visits.

The rays depend on the calibration only, so they are built once per rig and grid (:func:`rig_rays`: 0.15
s for the synthetic rig, 0.7 s to 3.5 s for eight 1920 x 1080 cameras; a process keeps its last rigs, so
the logs of one vehicle share them). So are their walks through the grid: each ray's is recorded once,
from where it enters the grid box to where it leaves it, as the axis of every step (two bits) with a
checkpoint (distance, voxel) every 8 steps (:class:`RaySteps`, :meth:`CameraRays.steps`), and every frame
replays them (:class:`CameraMasker`, :func:`~driveengine.labels.voxel_ops.cast_camera_rays`): a table
look-up a voxel instead of the walk's comparisons: 1.5x faster per frame than walking on the synthetic
rig and nuPlan-size cameras alike (measured against the walking kernel while this was built).

Lens distortion (OpenCV's k1, k2, p1, p2, k3, as nuPlan records it) is undone for the lattice's pixels,
so the rays pass through the image as the camera records it. Cameras whose calibration is missing
(NaN, size 0) are skipped; a log without a usable camera gets an all-False mask and a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from driveengine.schemas.grid import VoxelGrid
from driveengine.sources.logdata import LogData

#: Number of coarser levels above the finest lattice (see the module doc).
LEVELS = 4

#: Neighbouring rays are at most ``voxel / SPACING_DIVISOR`` apart (sqrt(2): every voxel seen head-on is hit).
SPACING_DIVISOR = math.sqrt(2.0)

#: A ray of level >= 1 whose parent came near something before the ray's start distance restarts at its last
#: checkpoint at or before this many voxels before the parent's ``t_near`` (any point before ``t_near`` is
#: safe, see the module doc; this is slack for rounding).
RESTART_VOXELS = 0.25


class RaySteps(NamedTuple):
    """The rays' walks through a grid, for :func:`~driveengine.labels.voxel_ops.cast_camera_rays` to replay
    (:func:`~driveengine.labels.voxel_ops.camera_ray_steps` documents the arrays). Two bits a voxel a ray
    enters plus a checkpoint every 8 (~1.3 bytes a voxel): 16 MB for the synthetic rig, 39 MB for nuPlan's
    eight 1920 x 1080 cameras on OpenScene's grid (26 / 325 MB on ``fine``)."""

    step_offsets: np.ndarray
    step_axes: np.ndarray
    checkpoint_offsets: np.ndarray
    checkpoint_m: np.ndarray
    checkpoint_voxel: np.ndarray
    start_step: np.ndarray
    start_voxel: np.ndarray


@dataclass(frozen=True)
class CameraRays:
    """The rays of a log's cameras on one grid, parents before children (see the module doc).

    Attributes:
        origin: (R, 3) float64 optical centre of each ray's camera, ego frame, metres.
        direction: (R, 3) float64 unit direction, ego frame.
        start_m: (R,) float64 distance along the ray where it starts when its parent reached that far.
        exit_m: (R,) float64 distance along the ray where it leaves the grid box (-inf when it never
            meets the box: such rays are never walked).
        parent: (R,) int64 index of the parent ray, -1 for level 0 rays.
        strides: the lattice stride of each camera, pixels.
        cameras: names of the cameras used.
    """

    origin: np.ndarray
    direction: np.ndarray
    start_m: np.ndarray
    exit_m: np.ndarray
    parent: np.ndarray
    strides: tuple[int, ...]
    cameras: tuple[str, ...]

    @property
    def num_rays(self) -> int:
        return int(self.direction.shape[0])

    def steps(self, grid: VoxelGrid) -> RaySteps:
        """Every ray's walk through ``grid`` (its own grid), recorded once (:class:`RaySteps`)."""
        cached = self.__dict__.get("_steps")
        if cached is None or cached[0] != grid:
            from driveengine.labels import voxel_ops as vo

            lo, vs, shape = vo.grid_params(grid)
            arrays = vo.camera_ray_steps(
                self.origin, self.direction, self.start_m, self.exit_m, lo, vs, shape
            )
            for array in arrays:
                array.flags.writeable = False
            cached = (grid, RaySteps(*arrays))
            object.__setattr__(self, "_steps", cached)  # a cache: the rays themselves do not change
        return cached[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the rays' arrays and of their recorded walks once built."""
        arrays = [self.origin, self.direction, self.start_m, self.exit_m, self.parent]
        cached = self.__dict__.get("_steps")
        return sum(a.nbytes for a in arrays) + (0 if cached is None else sum(a.nbytes for a in cached[1]))


def lattice_stride(focal_px: float, grid: VoxelGrid, farthest_m: float) -> int:
    """The pinhole pixel stride ``s`` of the module doc: rays at most ``voxel / sqrt(2)`` apart at depth
    ``farthest_m`` (metres along the optical axis) for a camera of focal length ``focal_px``."""
    return max(1, math.floor(focal_px * grid.voxel_size_m / (SPACING_DIVISOR * farthest_m)))


def undistort_normalised(
    xd: np.ndarray, yd: np.ndarray, distortion: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Undistorted normalised image coordinates of distorted ones (OpenCV's model, k1, k2, p1, p2, k3),
    by the fixed-point iteration OpenCV's ``undistortPoints`` uses (20 rounds)."""
    k1, k2, p1, p2, k3 = (float(v) for v in distortion[:5])
    if not any((k1, k2, p1, p2, k3)):
        return xd, yd
    x, y = xd.copy(), yd.copy()
    for _ in range(20):
        r2 = x * x + y * y
        radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
        dx = 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
        dy = p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
        x = (xd - dx) / radial
        y = (yd - dy) / radial
    return x, y


def _normalised_lattice(
    intrinsic: np.ndarray, distortion: np.ndarray, width: int, height: int, stride: int
) -> np.ndarray:
    """(nv, nu, 2) undistorted normalised image coordinates (x/z, y/z) of the lattice of ``stride``: the
    pixel centres ``((i + 0.5) * stride, (j + 0.5) * stride)``."""
    u = (np.arange(len(range(0, width, stride))) + 0.5) * stride
    v = (np.arange(len(range(0, height, stride))) + 0.5) * stride
    uu, vv = np.meshgrid(u, v)
    return np.stack(normalised_from_pixels(intrinsic, distortion, uu, vv), axis=-1)


def normalised_from_pixels(
    intrinsic: np.ndarray, distortion: np.ndarray, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Undistorted normalised image coordinates (x/z, y/z) of pixel positions ``u``, ``v`` (any shape) of a
    camera with ``intrinsic`` (3, 3) and OpenCV ``distortion`` (:func:`undistort_normalised`)."""
    kinv = np.linalg.inv(intrinsic)
    xd = kinv[0, 0] * u + kinv[0, 1] * v + kinv[0, 2]
    yd = kinv[1, 1] * v + kinv[1, 2]
    return undistort_normalised(xd, yd, np.asarray(distortion, dtype=np.float64))


#: The triples of :func:`cone_depths`' ten planes that can meet in a point (no two parallel faces of the box).
_TRIPLES = np.array(
    [t for t in ((i, j, k) for i in range(10) for j in range(i + 1, 10) for k in range(j + 1, 10))
     if not any(a in t and a + 3 in t for a in range(3))]
)  # fmt: skip


def cone_depths(ego_from_camera: np.ndarray, grid: VoxelGrid, rect: np.ndarray) -> np.ndarray:
    """(T,) the largest depth (metres) of a point of the grid box inside each of T pyramids from the camera,
    ``rect`` (T, 4) = (x0, x1, y0, y1): the points whose normalised image coordinates (X/Z, Y/Z) lie in
    [x0, x1] x [y0, y1] (0 when a pyramid misses the box).

    A linear function's maximum over the polytope box ∩ pyramid lies on a vertex, where three of its ten
    planes meet: every triple is solved and the feasible vertices' largest depth kept.
    """
    r, o = ego_from_camera[:3, :3], ego_from_camera[:3, 3]
    lo, hi = np.asarray(grid.range_min_m) - o, np.asarray(grid.range_max_m) - o
    t = rect.shape[0]
    normals = np.zeros((t, 10, 3))
    bounds = np.zeros((t, 10))
    normals[:, 0:3], bounds[:, 0:3] = r, hi  # camera-frame point p: r @ p <= hi - o
    normals[:, 3:6], bounds[:, 3:6] = -r, -lo  # and >= lo - o
    x0, x1, y0, y1 = rect.T
    normals[:, 6] = np.stack([np.ones(t), np.zeros(t), -x1], axis=1)  # X <= x1 Z
    normals[:, 7] = np.stack([-np.ones(t), np.zeros(t), x0], axis=1)  # X >= x0 Z
    normals[:, 8] = np.stack([np.zeros(t), np.ones(t), -y1], axis=1)
    normals[:, 9] = np.stack([np.zeros(t), -np.ones(t), y0], axis=1)
    n1, n2, n3 = (normals[:, _TRIPLES[:, i]] for i in range(3))  # (T, triples, 3) each
    b1, b2, b3 = (bounds[:, _TRIPLES[:, i], None] for i in range(3))
    c23, c31, c12 = np.cross(n2, n3), np.cross(n3, n1), np.cross(n1, n2)
    det = (n1 * c23).sum(axis=2)
    solvable = np.abs(det) > 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):  # Cramer's rule; parallel planes are masked out
        vertex = (b1 * c23 + b2 * c31 + b3 * c12) / np.where(solvable, det, 1.0)[..., None]
    slack = vertex @ normals.transpose(0, 2, 1) - bounds[:, None, :]  # (T, triples, 10), <= 0 inside
    scale = 1e-9 * (1.0 + np.abs(bounds)).max()
    feasible = solvable & (slack.max(axis=2) <= scale) & (vertex[..., 2] >= 0)
    return np.where(feasible, vertex[..., 2], 0.0).max(axis=1)


#: Tiles per image side over which :func:`_tile_depths` bounds the depth the rays reach inside the grid.
TILES = 16


def _tile_depths(
    intrinsic: np.ndarray, distortion: np.ndarray, width: int, height: int, ego_from_camera: np.ndarray,
    grid: VoxelGrid,
) -> np.ndarray:  # fmt: skip
    """(TILES, TILES) the largest depth (metres) of a grid-box point seen through each tile of the image
    (rows, columns): the pyramid of the tile's undistorted bounding rectangle (its border sampled at every
    pixel and at its corners, widened by 1 %), :func:`cone_depths`."""
    edges_u = np.linspace(0.0, width, TILES + 1)
    edges_v = np.linspace(0.0, height, TILES + 1)
    su = np.union1d(np.arange(width + 1.0), edges_u)  # samples along a row, the tiles' edges among them
    sv = np.union1d(np.arange(height + 1.0), edges_v)
    # rows of samples along the tiles' horizontal edges, columns along their vertical edges
    hx, hy = normalised_from_pixels(
        intrinsic, distortion, su[None, :] + 0.0 * edges_v[:, None], edges_v[:, None] + 0.0 * su[None, :]
    )
    vx, vy = normalised_from_pixels(
        intrinsic, distortion, edges_u[:, None] + 0.0 * sv[None, :], sv[None, :] + 0.0 * edges_u[:, None]
    )
    cu = np.searchsorted(su, edges_u)  # the edges' positions among the samples
    cv = np.searchsorted(sv, edges_v)

    def extent(values: np.ndarray, at: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
        """(lines, TILES) ``ufunc`` (min or max) of each line's samples from one tile edge to the next."""
        return ufunc(ufunc.reduceat(values, at[:-1], axis=1), values[:, at[1:]])

    def bounds(h: np.ndarray, v: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
        """(TILES, TILES) ``ufunc`` over each tile's border (rows i, i + 1 and columns j, j + 1)."""
        rows, cols = extent(h, cu, ufunc), extent(v, cv, ufunc)  # (TILES + 1, TILES) each
        return ufunc(ufunc(rows[:-1], rows[1:]), ufunc(cols[:-1], cols[1:]).T)

    x0, x1 = bounds(hx, vx, np.minimum), bounds(hx, vx, np.maximum)
    y0, y1 = bounds(hy, vy, np.minimum), bounds(hy, vy, np.maximum)
    wx, wy = 0.01 * (x1 - x0), 0.01 * (y1 - y0)
    rect = np.stack([x0 - wx, x1 + wx, y0 - wy, y1 + wy], axis=-1)
    return cone_depths(ego_from_camera, grid, rect.reshape(-1, 4)).reshape(TILES, TILES)


def _face_gaps(points: np.ndarray, axis: int) -> np.ndarray:
    """Lengths of the lattice's edges along ``axis`` (1: rows, 0: columns) of a (nv, nu, 2) normalised lattice,
    seen head-on: each edge ``(dx, dy, 0)`` (per metre of depth) without its part along the ray through its
    middle, ``(x, y, 1) / |(x, y, 1)|`` (a face seen head-on is perpendicular to that ray)."""
    edge = np.diff(points, axis=axis)
    middle = 0.5 * (points[:-1] + points[1:]) if axis == 0 else 0.5 * (points[:, :-1] + points[:, 1:])
    along = (edge * middle).sum(axis=-1) / np.sqrt(1.0 + (middle * middle).sum(axis=-1))
    return np.sqrt(np.maximum((edge * edge).sum(axis=-1) - along * along, 0.0))


def _cell_gaps(points: np.ndarray, step: int) -> np.ndarray:
    """(cv, cu) the longest side, seen head-on (:func:`_face_gaps`), of each cell of every ``step``-th point
    of a (nv, nu, 2) lattice: the rays' spacing per metre of depth there; shape (0, 0) without a cell."""
    p = points[::step, ::step]
    if p.shape[0] < 2 or p.shape[1] < 2:
        return np.zeros((0, 0))
    row = _face_gaps(p, 1)  # (nv, nu - 1)
    col = _face_gaps(p, 0)  # (nv - 1, nu)
    return np.maximum(np.maximum(row[:-1], row[1:]), np.maximum(col[:, :-1], col[:, 1:]))


def _cell_depths(tiles: np.ndarray, u: np.ndarray, v: np.ndarray, width: int, height: int) -> np.ndarray:
    """(cv, cu) the largest tile depth of each lattice cell's four corners (pixels ``u`` (nu,), ``v`` (nv,)):
    a cell lies in the union of its corners' tiles."""
    tu = np.minimum((u * TILES / width).astype(np.int64), TILES - 1)
    tv = np.minimum((v * TILES / height).astype(np.int64), TILES - 1)
    d = tiles[tv[:, None], tu[None, :]]
    return np.maximum(np.maximum(d[:-1, :-1], d[:-1, 1:]), np.maximum(d[1:, :-1], d[1:, 1:]))


def _camera_levels(
    intrinsic: np.ndarray,
    distortion: np.ndarray,
    width: int,
    height: int,
    ego_from_camera: np.ndarray,
    grid: VoxelGrid,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One camera's lattice rays in level order: (direction (n, 3), start (n,), parent (n,) within the
    camera, level (n,), stride)."""
    voxel = grid.voxel_size_m
    need = voxel / SPACING_DIVISOR  # the largest spacing allowed where a level is walked, metres
    focal = float(min(intrinsic[0, 0], intrinsic[1, 1]))
    tiles = _tile_depths(intrinsic, distortion, width, height, ego_from_camera, grid)

    def lattice(stride: int) -> tuple[np.ndarray, bool]:
        points = _normalised_lattice(intrinsic, distortion, width, height, stride)
        u = (np.arange(points.shape[1]) + 0.5) * stride
        v = (np.arange(points.shape[0]) + 0.5) * stride
        gaps = _cell_gaps(points, 1)
        ok = gaps.size == 0 or bool((gaps * _cell_depths(tiles, u, v, width, height) <= need).all())
        return points, ok

    # the pinhole stride for the farthest depth, then the largest stride whose every cell keeps its rays
    # within `need` of each other at the deepest point of the grid it can reach (bounded searches)
    stride = lattice_stride(focal, grid, max(float(tiles.max()), voxel))
    points, ok = lattice(stride)
    while not ok and stride > 1:
        stride -= 1
        points, ok = lattice(stride)
    while ok and stride < max(width, height):
        wider, wider_ok = lattice(stride + 1)
        if not wider_ok:
            break
        stride, points = stride + 1, wider
    nv, nu = points.shape[:2]
    u = (np.arange(nu) + 0.5) * stride
    v = (np.arange(nv) + 0.5) * stride
    iv, iu = np.divmod(np.arange(nu * nv), nu)
    level = np.full(iu.size, LEVELS, dtype=np.int64)
    for k in range(LEVELS - 1, -1, -1):
        step = 2 ** (LEVELS - k)
        level[(iu % step == 0) & (iv % step == 0)] = k
    # a ray of level j is needed from the depth where a cell holding it, of level j - 1 or finer (but not
    # the finest), stops being dense: need / its spacing; cells whose rays reach no deeper never stop
    start_depth = np.full(iu.size, np.inf)
    for k in range(LEVELS):
        step = 2 ** (LEVELS - k)
        gaps = _cell_gaps(points, step)
        finer = (level >= 1) & (level <= k + 1)  # the rays these cells bound: levels 1 .. k + 1
        if gaps.size == 0:
            start_depth[finer] = 0.0  # too few rays for a cell: walk from the camera
            continue
        enough = need / np.maximum(gaps, 1e-300)
        deep = _cell_depths(tiles, u[::step], v[::step], width, height) > enough
        threshold = np.where(deep, enough, np.inf)
        ncv, ncu = threshold.shape
        # the (up to four) cells of level k holding each lattice point; a point beyond the level's last row or
        # column (the image's right and bottom edges) is held by none: the finer cells there start at the camera
        lo_u = np.clip(np.where(iu % step == 0, iu // step - 1, iu // step), 0, ncu - 1)
        hi_u = np.clip(iu // step, 0, ncu - 1)
        lo_v = np.clip(np.where(iv % step == 0, iv // step - 1, iv // step), 0, ncv - 1)
        hi_v = np.clip(iv // step, 0, ncv - 1)
        held = np.minimum(
            np.minimum(threshold[lo_v, lo_u], threshold[lo_v, hi_u]),
            np.minimum(threshold[hi_v, lo_u], threshold[hi_v, hi_u]),
        )
        held = np.where((iu > ncu * step) | (iv > ncv * step), 0.0, held)
        start_depth[finer] = np.minimum(start_depth[finer], held[finer])
    pstep = 2 ** (LEVELS - level + 1)
    pu = np.minimum(np.rint(iu / pstep).astype(np.int64) * pstep, ((nu - 1) // pstep) * pstep)
    pv = np.minimum(np.rint(iv / pstep).astype(np.int64) * pstep, ((nv - 1) // pstep) * pstep)
    order = np.lexsort((iu, iv, level))  # level by level: parents first
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    parent = np.where(level > 0, position[pv * nu + pu], -1)
    xy = points.reshape(-1, 2)
    rays = np.concatenate([xy, np.ones((xy.shape[0], 1))], axis=1) @ ego_from_camera[:3, :3].T
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    # a ray starts where its depth (distance x cosine of its angle to the optical axis) reaches that depth
    cos_axis = rays @ ego_from_camera[:3, 2]
    start = np.where(level > 0, start_depth / cos_axis, 0.0)
    # no further than where the ray leaves the grid (nothing to walk beyond; bounds _start_scale's check)
    start = np.minimum(start, np.maximum(_exit_distances(ego_from_camera[:3, 3], rays, grid), 0.0))
    direction, start, parent, level = rays[order], start[order], parent[order], level[order]
    start *= _start_scale(direction, start, parent, voxel)
    return direction, start, parent, level, stride


def _start_scale(direction: np.ndarray, start: np.ndarray, parent: np.ndarray, voxel: float) -> float:
    """The factor (<= 1) that keeps every ray less than ``voxel`` from each ancestor over the part of its path
    that ancestor vouches for (see the module doc): for ray ``r`` and ancestor ``a`` whose child on ``r``'s line
    is ``c``, ``|dir_r - dir_a| * start_c < voxel`` (rays in level order, parents first)."""
    worst = 0.0
    current = np.arange(direction.shape[0])
    child = current.copy()
    while True:
        up = parent[child]
        live = up >= 0
        if not live.any():
            break
        current, child, up = current[live], child[live], up[live]
        gap = np.linalg.norm(direction[current] - direction[up], axis=1) * start[child]
        worst = max(worst, float(gap.max()) / voxel)
        child = up
    return 1.0 if worst < 0.95 else 0.95 / worst


def _exit_distances(origin: np.ndarray, direction: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    """(R,) distance along each ray where it leaves the grid box (slab method); -inf if it misses the box."""
    lo, hi = np.asarray(grid.range_min_m), np.asarray(grid.range_max_m)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_lo = (lo - origin) / direction
        t_hi = (hi - origin) / direction
    near = np.where(
        direction != 0, np.minimum(t_lo, t_hi), np.where((origin >= lo) & (origin < hi), -np.inf, np.inf)
    )
    far = np.where(
        direction != 0, np.maximum(t_lo, t_hi), np.where((origin >= lo) & (origin < hi), np.inf, -np.inf)
    )
    enter, leave = near.max(axis=1), far.min(axis=1)
    return np.where((enter < leave) & (leave > 0), leave, -np.inf)


def _assemble(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]], names: list[str], grid: VoxelGrid
) -> CameraRays:
    """One :class:`CameraRays` of several cameras' ``(ego_from_camera, direction, start, parent, stride)``."""
    offset = 0
    parents = []
    for _, direction, _, parent, _ in parts:
        parents.append(np.where(parent >= 0, parent + offset, -1))
        offset += direction.shape[0]
    origin = np.ascontiguousarray(
        np.concatenate([np.broadcast_to(m[:3, 3], d.shape) for m, d, _, _, _ in parts]), dtype=np.float64
    )
    direction = np.ascontiguousarray(np.concatenate([p[1] for p in parts]), dtype=np.float64)
    return CameraRays(
        origin=origin,
        direction=direction,
        start_m=np.ascontiguousarray(np.concatenate([p[2] for p in parts]), dtype=np.float64),
        exit_m=np.ascontiguousarray(_exit_distances(origin, direction, grid), dtype=np.float64),
        parent=np.ascontiguousarray(np.concatenate(parents), dtype=np.int64),
        strides=tuple(p[4] for p in parts),
        cameras=tuple(names),
    )


def rig_rays(
    intrinsics: np.ndarray,
    ego_from_camera: np.ndarray,
    sizes: np.ndarray,
    grid: VoxelGrid,
    distortions: np.ndarray | None = None,
    names: tuple[str, ...] | None = None,
) -> CameraRays:
    """The rays of a rig of C cameras on ``grid``: intrinsics (C, 3, 3) pixels, ``ego_from_camera``
    (C, 4, 4), image sizes (C, 2) (width, height) pixels, distortions (C, 5) (default none).

    A process keeps the rays of its last rigs (:data:`RIG_CACHE_BYTES`): logs of one vehicle share its
    calibration, so a worker builds them once (0.1-0.2 s for the synthetic rig, seconds for nuPlan's
    cameras) rather than once per log. The cached arrays are read-only.
    """
    count = len(intrinsics)
    intrinsics = np.asarray(intrinsics, np.float64).reshape(count, 3, 3)
    ego_from_camera = np.asarray(ego_from_camera, np.float64).reshape(count, 4, 4)
    sizes = np.asarray(sizes).reshape(count, 2).astype(np.int64)
    dist = np.zeros((count, 5)) if distortions is None else np.asarray(distortions, np.float64)[:, :5]
    labels = tuple(names or (f"camera{c}" for c in range(count)))
    key = (grid, labels, intrinsics.tobytes(), ego_from_camera.tobytes(), sizes.tobytes(), dist.tobytes())
    cached = _RIG_CACHE.pop(key, None)
    if cached is None:
        parts = []
        for c in range(count):
            direction, start, parent, _, stride = _camera_levels(
                intrinsics[c], dist[c], int(sizes[c][0]), int(sizes[c][1]), ego_from_camera[c], grid
            )
            parts.append((ego_from_camera[c], direction, start, parent, stride))
        cached = _assemble(parts, list(labels), grid)
        for array in (cached.origin, cached.direction, cached.start_m, cached.exit_m, cached.parent):
            array.flags.writeable = False
    _RIG_CACHE[key] = cached  # most recently used last
    while len(_RIG_CACHE) > 1 and sum(r.nbytes for r in _RIG_CACHE.values()) > RIG_CACHE_BYTES:
        _RIG_CACHE.pop(next(iter(_RIG_CACHE)))
    return cached


#: Bytes of camera rays a process keeps for later logs of the same rig (the last rig is always kept).
RIG_CACHE_BYTES = 256 * 2**20

_RIG_CACHE: dict[tuple, CameraRays] = {}


def camera_rays(log: LogData, grid: VoxelGrid) -> tuple[CameraRays | None, list[str]]:
    """The rays of the log's cameras on ``grid``, and notes about cameras that could not be used.

    Returns:
        ``(rays, notes)``; ``rays`` is None when no camera has a usable calibration.
    """
    notes: list[str] = []
    keep: list[int] = []
    ego_from_camera = log.ego_from_camera()
    distortions = np.zeros((len(log.camera_channels), 5))
    for c, name in enumerate(log.camera_channels):
        k = np.asarray(log.camera_intrinsic[c], dtype=np.float64)
        dist = np.asarray(log.camera_distortion[c], dtype=np.float64).reshape(-1)
        size = np.asarray(log.camera_size[c]).reshape(-1)
        m = ego_from_camera[c]
        usable = (
            np.isfinite(k).all() and np.isfinite(m).all() and size.size == 2 and int(size[0]) > 0
            and int(size[1]) > 0 and k[0, 0] > 0 and k[1, 1] > 0
            and (dist.size < 5 or np.isfinite(dist[:5]).all())
        )  # fmt: skip
        if not usable:
            notes.append(f"{log.path}: camera {name} has no usable calibration; mask_camera ignores it")
            continue
        if dist.size >= 5:
            distortions[c] = dist[:5]
        keep.append(c)
    if not keep:
        return None, notes
    idx = np.asarray(keep)
    rays = rig_rays(
        np.asarray(log.camera_intrinsic, np.float64)[idx], ego_from_camera[idx], np.asarray(log.camera_size)[idx],
        grid, distortions[idx], tuple(log.camera_channels[c] for c in keep),
    )  # fmt: skip
    return rays, notes


class CameraMasker:
    """Computes ``mask_camera`` frame after frame for one rig and grid, reusing its workspaces.

    Args:
        rays: the rig's rays (:func:`camera_rays`).
        grid: the label grid.
        free: the class table's free id.
    """

    def __init__(self, rays: CameraRays, grid: VoxelGrid, free: int) -> None:
        from driveengine.labels import voxel_ops as vo

        self.rays = rays
        self.grid = grid
        self.free = int(free)
        self.lo, self.vs, self.shape = vo.grid_params(grid)
        self.steps = rays.steps(grid)
        self._has_children = np.zeros(rays.num_rays, dtype=bool)
        self._has_children[rays.parent[rays.parent >= 0]] = True
        self._state = np.zeros(grid.num_voxels, np.uint8)
        self._words = vo.occupancy_words(self.shape)
        self._t_near = np.empty(rays.num_rays, np.float64)
        self.visits = 0  #: voxel visits of the last frame

    def mask(self, semantics: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(nx, ny, nz) bool camera visibility of one frame's ``semantics`` (uint8, on the grid).

        Args:
            semantics: (nx, ny, nz) or (V,) uint8 class ids, C order.
            out: optional (V,) bool array to write into (returned reshaped).
        """
        from driveengine.labels import voxel_ops as vo

        r = self.rays
        vo.occupancy_codes(
            np.ascontiguousarray(semantics).reshape(-1), self.free, self.shape, self._state, self._words
        )
        self.visits = vo.cast_camera_rays(
            r.origin, r.direction, r.start_m, r.parent, self._has_children, *self.steps, self._state, self.lo,
            self.vs, self.shape, self._t_near, RESTART_VOXELS * self.vs,
        )  # fmt: skip
        result = np.empty(self.grid.num_voxels, dtype=bool) if out is None else out
        np.greater_equal(self._state, vo.OBSERVED, out=result)  # OBSERVED is the highest bit
        return result.reshape(self.grid.shape)


def mask_camera(semantics: np.ndarray, free: int, rays: CameraRays, grid: VoxelGrid) -> np.ndarray:
    """(nx, ny, nz) bool camera visibility of one frame's ``semantics`` (see the module doc and
    :class:`CameraMasker`, which reuses its workspaces over frames)."""
    return CameraMasker(rays, grid, free).mask(semantics)
