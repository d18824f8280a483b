"""Camera visibility of the label voxels (``mask_camera``), Occ3D's meaning, computed from the labels.

A voxel is **camera-observed** when a ray from a camera's optical centre through the image reaches it
before it crosses any occupied voxel: the rays are traversed through the frame's ``semantics`` (3D DDA,
Amanatides-Woo); every voxel a ray enters is observed, up to and including the first occupied voxel,
where the ray stops; a voxel that no ray reaches (behind an occupied voxel, outside every image) is not.

**Which rays.** One ray per pixel would be exact for the image but cost millions of rays per frame.
Rays are cast through a *pixel lattice* instead: every ``s``-th pixel centre (row and column), with

    s = max(1, floor(f * voxel / (sqrt(2) * d_max)))

where ``f`` is the smaller focal length (pixels), ``voxel`` the grid's voxel size and ``d_max`` the
distance from the camera to the grid's farthest corner. Neighbouring rays are then at most
``voxel / sqrt(2)`` apart anywhere in the grid, so every voxel whose face the camera sees head-on is
entered by a ray (a square of side ``a`` always holds a point of a lattice of spacing ``a / sqrt(2)``).
An image too coarse for that (``s = 1``) is sampled at every pixel: then far voxels are observed as
densely as the image resolves them, which is Occ3D's per-pixel definition.

**Levels (cost).** Near the camera the lattice is far denser than needed: at distance ``d`` a spacing of
``voxel * d / d_max`` casts ``(d_max / d)^2`` rays per voxel. The lattice is therefore split into
``LEVELS + 1`` nested levels: level 0 is every ``2^LEVELS``-th lattice point, level ``k`` adds the points
of stride ``2^(LEVELS - k)``; a level-``k`` ray is only needed beyond ``d_(k-1)``, the distance up to
which level ``k - 1`` is dense enough (``d_k = f * voxel / (sqrt(2) * s_k)``, doubling per level). Its
*parent* is the nearest level ``k - 1`` ray, at most half a voxel away from it up to ``d_(k-1)`` (less
than a voxel from every ancestor). While walking, a ray records where it first entered a voxel within
one voxel of an occupied one (``t_near``). A child starts at ``d_(k-1)``, or ``RESTART_VOXELS`` voxels
before its parent's ``t_near`` when that comes first: up to there the parent's path kept a voxel away
from everything occupied, so the child's path (less than a voxel beside it) crossed only free voxels
that the parent, or its ancestors, already marked. The result is that of casting every lattice ray from
the camera up to the rare voxel entered only by a child's skipped part (on the synthetic world's frames
18 of 279k observed voxels at ``openscene``, 135 of 2.1M at ``fine``), at a third to a quarter of the
voxel visits. The rays depend on the calibration only, so they are built once per log
(:func:`camera_rays`) and every frame only walks them (:class:`CameraMasker`,
:func:`~driveengine.labels.voxel_ops.cast_camera_rays`).

Lens distortion (OpenCV's k1, k2, p1, p2, k3, as nuPlan records it) is undone for the lattice's pixels,
so the rays pass through the image as the camera records it. Cameras whose calibration is missing
(NaN, size 0) are skipped; a log without a usable camera gets an all-False mask and a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from driveengine.schemas.grid import VoxelGrid
from driveengine.sources.logdata import LogData

#: Number of coarser levels above the finest lattice (see the module doc).
LEVELS = 4

#: Neighbouring rays are at most ``voxel / SPACING_DIVISOR`` apart (sqrt(2): every voxel seen head-on is hit).
SPACING_DIVISOR = math.sqrt(2.0)

#: A ray of level >= 1 whose parent stopped before the ray's start distance starts this many voxels
#: before the parent's stop.
RESTART_VOXELS = 2.0


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


def lattice_stride(focal_px: float, grid: VoxelGrid, farthest_m: float) -> int:
    """The pixel stride ``s`` of the module doc: rays at most ``voxel / sqrt(2)`` apart at ``farthest_m``."""
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
    origin = ego_from_camera[:3, 3]
    lo, hi = np.asarray(grid.range_min_m), np.asarray(grid.range_max_m)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    farthest = float(np.linalg.norm(corners - origin, axis=1).max())
    focal = float(min(intrinsic[0, 0], intrinsic[1, 1]))
    stride = lattice_stride(focal, grid, farthest)
    nu, nv = len(range(0, width, stride)), len(range(0, height, stride))
    iv, iu = np.divmod(np.arange(nu * nv), nu)
    level = np.full(iu.size, LEVELS, dtype=np.int64)
    for k in range(LEVELS - 1, -1, -1):
        step = 2 ** (LEVELS - k)
        level[(iu % step == 0) & (iv % step == 0)] = k
    reach = np.array(
        [
            focal * grid.voxel_size_m / (SPACING_DIVISOR * stride * 2 ** (LEVELS - k))
            for k in range(LEVELS + 1)
        ]
    )
    start = np.where(level > 0, reach[np.maximum(level - 1, 0)], 0.0)
    pstep = 2 ** (LEVELS - level + 1)
    pu = np.minimum(np.rint(iu / pstep).astype(np.int64) * pstep, ((nu - 1) // pstep) * pstep)
    pv = np.minimum(np.rint(iv / pstep).astype(np.int64) * pstep, ((nv - 1) // pstep) * pstep)
    order = np.lexsort((iu, iv, level))  # level by level: parents first
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    parent = np.where(level > 0, position[pv * nu + pu], -1)
    u = (iu + 0.5) * stride
    v = (iv + 0.5) * stride
    kinv = np.linalg.inv(intrinsic)
    xd = kinv[0, 0] * u + kinv[0, 1] * v + kinv[0, 2]
    yd = kinv[1, 1] * v + kinv[1, 2]
    x, y = undistort_normalised(xd, yd, np.asarray(distortion, dtype=np.float64))
    rays = np.stack([x, y, np.ones_like(x)], axis=1) @ ego_from_camera[:3, :3].T
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    return rays[order], start[order], parent[order], level[order], stride


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
    (C, 4, 4), image sizes (C, 2) (width, height) pixels, distortions (C, 5) (default none)."""
    parts = []
    for c in range(len(intrinsics)):
        m = np.asarray(ego_from_camera[c], np.float64)
        dist = np.zeros(5) if distortions is None else np.asarray(distortions[c], dtype=np.float64)[:5]
        direction, start, parent, _, stride = _camera_levels(
            np.asarray(intrinsics[c], np.float64), dist, int(sizes[c][0]), int(sizes[c][1]), m, grid
        )
        parts.append((m, direction, start, parent, stride))
    return _assemble(parts, list(names or (f"camera{c}" for c in range(len(intrinsics)))), grid)


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
        words = vo.bitset_words(grid.num_voxels)
        self._occupied = np.zeros(words, np.uint64)
        self._near = np.zeros(words, np.uint64)
        self._observed = np.zeros(words, np.uint64)
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
        vo.occupied_bits(np.ascontiguousarray(semantics).reshape(-1), self.free, self._occupied)
        vo.dilate_bits(self._occupied, self.shape, self._near)
        self._observed.fill(0)
        self.visits = vo.cast_camera_rays(
            r.origin, r.direction, r.start_m, r.exit_m, r.parent, self._occupied, self._near, self.lo, self.vs,
            self.shape, self._observed, self._t_near, RESTART_VOXELS * self.vs,
        )  # fmt: skip
        result = np.empty(self.grid.num_voxels, dtype=bool) if out is None else out
        vo.bits_to_mask(self._observed, result)
        return result.reshape(self.grid.shape)


def mask_camera(semantics: np.ndarray, free: int, rays: CameraRays, grid: VoxelGrid) -> np.ndarray:
    """(nx, ny, nz) bool camera visibility of one frame's ``semantics`` (see the module doc and
    :class:`CameraMasker`, which reuses its workspaces over frames)."""
    return CameraMasker(rays, grid, free).mask(semantics)
