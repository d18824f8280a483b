"""Exact ground-truth occupancy and flow grids of a :class:`~driveengine.synth.world.World`.

The grid lives in the ego frame of :meth:`World.frame_pose` at the timestamp (the pose a reader
reports for a ``lidar_pc``), with objects at that timestamp. A voxel is occupied by a solid when the
solid and the voxel overlap with positive volume (exact test: every solid is a box with a yaw about +z
and the ego never rolls or pitches, so the test is a z-interval overlap plus a 2D separating-axis test
of the rotated rectangle against the voxel square). The ground plane occupies the voxel layer that
contains it.

Precedence where solids share a voxel: objects over background (ground, buildings, poles); between
objects the lower class id wins, and within a class the track with the higher index.
"""

from __future__ import annotations

import numpy as np

from driveengine.geometry import invert_transform, rotate_vectors, transform_points
from driveengine.schemas.classes import BACKGROUND, FREE
from driveengine.schemas.grid import GRID, VoxelGrid
from driveengine.synth.world import Boxes, World


def _paint_boxes(
    grid: VoxelGrid, boxes: Boxes, center_ego: np.ndarray, yaw_ego: np.ndarray, on_voxels
) -> None:
    """Call ``on_voxels(box_index, ix, iy, iz)`` with the voxel indices each box overlaps (vectorised per box)."""
    lo = np.asarray(grid.range_min_m)
    vs = grid.voxel_size_m
    shape = np.asarray(grid.shape)
    half = 0.5 * boxes.size
    c, s = np.abs(np.cos(yaw_ego)), np.abs(np.sin(yaw_ego))
    ext_x = half[:, 0] * c + half[:, 1] * s
    ext_y = half[:, 0] * s + half[:, 1] * c
    a = 0.5 * vs
    for b in range(len(boxes)):
        cx, cy, cz = center_ego[b]
        lo_idx = np.floor((np.array([cx - ext_x[b], cy - ext_y[b], cz - half[b, 2]]) - lo) / vs).astype(int)
        hi_idx = np.floor((np.array([cx + ext_x[b], cy + ext_y[b], cz + half[b, 2]]) - lo) / vs).astype(int)
        lo_idx = np.maximum(lo_idx, 0)
        hi_idx = np.minimum(hi_idx, shape - 1)
        if np.any(hi_idx < lo_idx):
            continue
        ix = np.arange(lo_idx[0], hi_idx[0] + 1)
        iy = np.arange(lo_idx[1], hi_idx[1] + 1)
        iz = np.arange(lo_idx[2], hi_idx[2] + 1)
        vx = lo[0] + (ix + 0.5) * vs
        vy = lo[1] + (iy + 0.5) * vs
        vz = lo[2] + (iz + 0.5) * vs
        iz = iz[np.abs(vz - cz) < a + half[b, 2]]
        if iz.size == 0:
            continue
        dx = cx - vx[:, None]
        dy = cy - vy[None, :]
        cb, sb = np.cos(yaw_ego[b]), np.sin(yaw_ego[b])
        along = dx * cb + dy * sb
        across = -dx * sb + dy * cb
        overlap = (
            (np.abs(dx) < a + ext_x[b])
            & (np.abs(dy) < a + ext_y[b])
            & (np.abs(along) < half[b, 0] + a * (c[b] + s[b]))
            & (np.abs(across) < half[b, 1] + a * (c[b] + s[b]))
        )
        gx, gy = np.nonzero(overlap)
        if gx.size == 0:
            continue
        n = iz.size
        on_voxels(b, np.repeat(ix[gx], n), np.repeat(iy[gy], n), np.tile(iz, gx.size))


def _grids(world: World, timestamp_us: int, grid: VoxelGrid | None) -> tuple[np.ndarray, np.ndarray]:
    grid = grid or GRID
    global_from_ego = world.frame_pose(timestamp_us)
    ego_from_global = invert_transform(global_from_ego)
    yaw_frame = np.arctan2(global_from_ego[1, 0], global_from_ego[0, 0])
    sem = np.full(grid.shape, FREE, dtype=np.uint8)
    flow = np.zeros((*grid.shape, 2), dtype=np.float32)

    # ground: the layer containing the plane z_global = 0
    z_ground = -global_from_ego[2, 3]  # the ego never rolls or pitches
    k = int(np.floor((z_ground - grid.range_min_m[2]) / grid.voxel_size_m))
    if 0 <= k < grid.shape[2]:
        sem[:, :, k] = BACKGROUND

    background = world.background_boxes()
    objects = world.boxes_at(timestamp_us)

    def paint_background(_b: int, ix, iy, iz) -> None:
        sem[ix, iy, iz] = BACKGROUND

    _paint_boxes(
        grid,
        background,
        transform_points(ego_from_global, background.center),
        background.yaw - yaw_frame,
        paint_background,
    )
    # objects: descending class id, then ascending track index, so that the last write wins
    order = np.lexsort((objects.track_index, -objects.class_id.astype(np.int64)))
    objects = objects.select(order)
    vel_ego = rotate_vectors(ego_from_global, objects.velocity)[:, :2].astype(np.float32)

    def paint_object(b: int, ix, iy, iz) -> None:
        sem[ix, iy, iz] = objects.class_id[b]
        flow[ix, iy, iz] = vel_ego[b]

    _paint_boxes(
        grid,
        objects,
        transform_points(ego_from_global, objects.center),
        objects.yaw - yaw_frame,
        paint_object,
    )
    return sem, flow


def occupancy(world: World, timestamp_us: int, grid: VoxelGrid | None = None) -> np.ndarray:
    """Ground-truth class grid at ``timestamp_us``.

    Args:
        world: the world.
        timestamp_us: microseconds (objects at this time, frame of :meth:`World.frame_pose`).
        grid: voxel grid (default :data:`driveengine.schemas.grid.GRID`).

    Returns:
        (nx, ny, nz) uint8: ``CATEGORY_TO_CLASS`` ids on objects, BACKGROUND (10) on ground, buildings
        and poles, FREE (16) elsewhere; indexed ``[x, y, z]`` in the ego frame.
    """
    return _grids(world, timestamp_us, grid)[0]


def flow(world: World, timestamp_us: int, grid: VoxelGrid | None = None) -> np.ndarray:
    """Ground-truth flow grid at ``timestamp_us``: (nx, ny, nz, 2) float32.

    ``(vx, vy)`` m/s of the object that owns each voxel (its global velocity rotated into the ego frame
    of :meth:`World.frame_pose`; absolute, not relative to the ego), 0 on background and free voxels.
    """
    return _grids(world, timestamp_us, grid)[1]


def occupancy_and_flow(
    world: World, timestamp_us: int, grid: VoxelGrid | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Both grids of :func:`occupancy` and :func:`flow` in one pass."""
    return _grids(world, timestamp_us, grid)
