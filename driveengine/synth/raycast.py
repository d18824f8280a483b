"""Ray casting against the ground plane and oriented boxes (numba, parallel over rays).

Every solid of the synthetic world is a box with a yaw about +z, and the ground is the plane
``z = 0``. A ray ``origin + t * direction`` (global frame, metres, ``direction`` unit length) is
tested against every box with the slab method in the box's own frame; the nearest hit with
``0 < t <= max_range`` wins, so occlusion is exact. Misses report ``t = inf`` and ``hit = -1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

#: ``hit`` value of rays that hit the ground plane.
GROUND = -2
#: ``hit`` value of rays that hit nothing within range.
MISS = -1


@dataclass(frozen=True)
class RayHits:
    """Result of :func:`cast_rays` for R rays.

    Attributes:
        distance: (R,) float64, metres along the ray (inf for misses).
        hit: (R,) int64, index of the box hit, :data:`GROUND` or :data:`MISS`.
        normal: (R, 3) float64, unit outward surface normal at the hit, global frame (0 for misses).
    """

    distance: np.ndarray
    hit: np.ndarray
    normal: np.ndarray


@numba.njit(parallel=True, cache=True, fastmath=False)
def _cast_kernel(
    origin, dirs, centers, half, cos_yaw, sin_yaw, dist_min, cone, max_range, out_t, out_hit, out_n
):  # pragma: no cover
    # Boxes come sorted by ``dist_min`` (distance from the origin to their bounding sphere), so the
    # loop stops at the first box that cannot beat the current nearest hit; ``cone`` is
    # ``|v|^2 - r^2`` of the bounding sphere (v: origin to centre), used to skip spheres the ray misses.
    n_rays = dirs.shape[0]
    n_boxes = centers.shape[0]
    for r in numba.prange(n_rays):
        dx, dy, dz = dirs[r, 0], dirs[r, 1], dirs[r, 2]
        best = max_range
        best_hit = -1
        nx = 0.0
        ny = 0.0
        nz = 0.0
        # ground plane z = 0 (the origin is above it)
        if dz < 0.0:
            tg = -origin[2] / dz
            if 0.0 < tg <= best:
                best = tg
                best_hit = -2
                nx, ny, nz = 0.0, 0.0, 1.0
        for b in range(n_boxes):
            if dist_min[b] >= best:
                break
            ox, oy, oz = origin[0] - centers[b, 0], origin[1] - centers[b, 1], origin[2] - centers[b, 2]
            if cone[b] > 0.0:  # origin outside the bounding sphere: skip if the ray misses the sphere
                proj = -(ox * dx + oy * dy + oz * dz)
                if proj <= 0.0 or proj * proj < cone[b]:
                    continue
            c, s = cos_yaw[b], sin_yaw[b]
            # into the box frame: rotate by -yaw
            lox = c * ox + s * oy
            loy = -s * ox + c * oy
            ldx = c * dx + s * dy
            ldy = -s * dx + c * dy
            t_near = -np.inf
            t_far = np.inf
            axis = -1
            sign = 0.0
            ok = True
            for k in range(3):
                if k == 0:
                    o, d, h = lox, ldx, half[b, 0]
                elif k == 1:
                    o, d, h = loy, ldy, half[b, 1]
                else:
                    o, d, h = oz, dz, half[b, 2]
                if d == 0.0:
                    if o < -h or o > h:
                        ok = False
                        break
                    continue
                t1 = (-h - o) / d
                t2 = (h - o) / d
                sg = -1.0
                if t1 > t2:
                    t1, t2 = t2, t1
                    sg = 1.0
                if t1 > t_near:
                    t_near = t1
                    axis = k
                    sign = sg
                if t2 < t_far:
                    t_far = t2
                if t_near > t_far:
                    ok = False
                    break
            if not ok or axis < 0 or t_near <= 0.0 or t_near >= best:
                continue
            best = t_near
            best_hit = b
            if axis == 0:
                nx, ny, nz = sign * c, sign * s, 0.0
            elif axis == 1:
                nx, ny, nz = -sign * s, sign * c, 0.0
            else:
                nx, ny, nz = 0.0, 0.0, sign
        if best_hit == -1:
            out_t[r] = np.inf
        else:
            out_t[r] = best
        out_hit[r] = best_hit
        out_n[r, 0] = nx
        out_n[r, 1] = ny
        out_n[r, 2] = nz


def cast_rays(
    origin: np.ndarray,
    directions: np.ndarray,
    centers: np.ndarray,
    sizes: np.ndarray,
    yaws: np.ndarray,
    max_range: float = np.inf,
) -> RayHits:
    """Nearest hit of each ray from one ``origin`` against the ground plane ``z = 0`` and boxes.

    Args:
        origin: (3,) ray origin, global frame, metres (must be above the ground).
        directions: (R, 3) unit directions, global frame.
        centers: (B, 3) box centres, global, m.
        sizes: (B, 3) (length, width, height) along the box x, y, z, m.
        yaws: (B,) box headings about +z, rad.
        max_range: hits farther than this (m) count as misses.

    Returns:
        :class:`RayHits`. A ray starting inside a box does not hit that box.
    """
    origin = np.ascontiguousarray(origin, dtype=np.float64)
    dirs = np.ascontiguousarray(directions, dtype=np.float64)
    centers = np.ascontiguousarray(centers, dtype=np.float64).reshape(-1, 3)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 3)
    yaws = np.asarray(yaws, dtype=np.float64).reshape(-1)
    radius = 0.5 * np.linalg.norm(sizes, axis=1)
    dist = np.linalg.norm(centers - origin, axis=1)
    dist_min = np.maximum(dist - radius, 0.0)
    # nearest bounding spheres first; boxes out of range are dropped
    index = np.argsort(dist_min, kind="stable")
    index = index[dist_min[index] <= max_range]
    n = dirs.shape[0]
    out_t = np.empty(n)
    out_hit = np.empty(n, dtype=np.int64)
    out_n = np.empty((n, 3))
    _cast_kernel(
        origin,
        dirs,
        np.ascontiguousarray(centers[index]),
        np.ascontiguousarray(0.5 * sizes[index]),
        np.cos(yaws[index]),
        np.sin(yaws[index]),
        dist_min[index],
        np.where(dist[index] > radius[index], dist[index] ** 2 - radius[index] ** 2, -1.0),
        float(max_range) if np.isfinite(max_range) else 1e30,
        out_t,
        out_hit,
        out_n,
    )
    hit = np.where(out_hit >= 0, index[np.maximum(out_hit, 0)] if len(index) else out_hit, out_hit)
    return RayHits(distance=out_t, hit=hit, normal=out_n)
