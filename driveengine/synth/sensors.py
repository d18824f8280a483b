"""Synthetic sensors: the merged LiDAR sweep and the pinhole camera images of a :class:`World`.

Both cast rays with :func:`driveengine.synth.raycast.cast_rays` against the ground plane and every
solid at the sample's timestamp, from the ego pose of the ego_pose row closest to that timestamp
(:meth:`World.frame_pose`), so occlusion and geometry are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from driveengine.geometry import invert_transform, transform_points
from driveengine.schemas.classes import BACKGROUND
from driveengine.synth.raycast import GROUND, MISS, cast_rays
from driveengine.synth.world import Boxes, Camera, World

#: LiDAR rings and their elevation span (lidar frame), degrees.
LIDAR_RINGS = 64
LIDAR_ELEVATION_DEG = (-25.0, 10.0)
#: Maximum LiDAR range, metres.
LIDAR_MAX_RANGE_M = 80.0
#: Rays of a full-size sweep (64 rings x 2344 azimuths).
FULL_SWEEP_RAYS = 150_016
#: Number of merged sensors ``lidar_info`` distinguishes (rings are split evenly between them).
LIDAR_UNITS = 4

#: Class id -> LiDAR intensity (arbitrary but fixed; ground reported as 5).
_INTENSITY = {0: 80.0, 4: 120.0, 5: 60.0, 6: 50.0, 7: 30.0, 8: 150.0, 9: 100.0, BACKGROUND: 40.0}
GROUND_INTENSITY = 5.0

#: Camera rays farther than this (m) see the sky.
CAMERA_MAX_RANGE_M = 150.0

#: Class id -> RGB colour of camera images; ground and sky are separate.
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (220, 30, 30),  # vehicle: red
    4: (250, 140, 0),  # czone_sign: orange
    5: (30, 200, 200),  # bicycle: cyan
    6: (160, 60, 220),  # generic_object: purple
    7: (240, 220, 30),  # pedestrian: yellow
    8: (255, 100, 180),  # traffic_cone: pink
    9: (30, 60, 230),  # barrier: blue
    BACKGROUND: (150, 150, 140),  # buildings and poles: grey
}
GROUND_COLOUR = (70, 110, 60)  # green-grey
SKY_COLOUR = (150, 200, 255)


@dataclass(frozen=True)
class Sweep:
    """One LiDAR sweep. Points are in the ego frame (rear axle) of :meth:`World.frame_pose`.

    Attributes:
        xyz: (P, 3) float32, ego frame, m.
        intensity: (P,) float32.
        ring: (P,) int, ring index 0..63 (0 = lowest elevation).
        lidar_info: (P,) int, index of the merged sensor unit (ring // 16).
        class_id: (P,) uint8, class of the surface hit (BACKGROUND for ground, walls and poles).
        track_index: (P,) int, track hit (-1 for background and ground).
        global_xyz: (P, 3) float64, the exact hit points in the global frame, m.
        global_from_ego: (4, 4) the frame of ``xyz``.
        origin_global: (3,) sensor origin, global, m.
    """

    xyz: np.ndarray
    intensity: np.ndarray
    ring: np.ndarray
    lidar_info: np.ndarray
    class_id: np.ndarray
    track_index: np.ndarray
    global_xyz: np.ndarray
    global_from_ego: np.ndarray
    origin_global: np.ndarray


def lidar_directions(rays: int, phase: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions in the lidar frame: ``LIDAR_RINGS`` rings x ``ceil(rays / rings)`` azimuths.

    Args:
        rays: wanted number of rays (rounded up to a multiple of the ring count).
        phase: azimuth offset as a fraction of one azimuth step (varies per sweep).

    Returns:
        ``(directions (R, 3), ring (R,))``.
    """
    n_az = max(4, int(np.ceil(rays / LIDAR_RINGS)))
    elev = np.radians(np.linspace(*LIDAR_ELEVATION_DEG, LIDAR_RINGS))
    az = (np.arange(n_az) + phase) * (2 * np.pi / n_az)
    e, a = np.meshgrid(elev, az, indexing="ij")
    dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)
    ring = np.repeat(np.arange(LIDAR_RINGS), n_az)
    return dirs, ring


def lidar_sweep(
    world: World,
    timestamp_us: int,
    rays: int = FULL_SWEEP_RAYS,
    sweep_index: int = 0,
    *,
    solids: Boxes | None = None,
    global_from_ego: np.ndarray | None = None,
) -> Sweep:
    """Cast one sweep at ``timestamp_us`` (objects at that time) and return the hits in the ego frame.

    Args:
        world: the world.
        timestamp_us: the ``lidar_pc`` timestamp.
        rays: rays per sweep; the number of points is smaller (rays into the sky miss).
        sweep_index: varies the azimuth phase (golden-ratio steps) so sweeps sample different rays.
        solids: ``world.solids_at(timestamp_us)`` if already computed.
        global_from_ego: ``world.frame_pose(timestamp_us)`` if already computed.
    """
    if global_from_ego is None:
        global_from_ego = world.frame_pose(timestamp_us)
    if solids is None:
        solids = world.solids_at(timestamp_us)
    global_from_lidar = global_from_ego @ world.ego_from_lidar
    dirs_lidar, ring = lidar_directions(rays, phase=(sweep_index * 0.6180339887) % 1.0)
    dirs = dirs_lidar @ global_from_lidar[:3, :3].T
    origin = global_from_lidar[:3, 3]
    hits = cast_rays(origin, dirs, solids.center, solids.size, solids.yaw, LIDAR_MAX_RANGE_M)
    keep = hits.hit != MISS
    hit = hits.hit[keep]
    global_xyz = origin + dirs[keep] * hits.distance[keep, None]
    box = np.maximum(hit, 0)
    class_id = np.where(hit == GROUND, BACKGROUND, solids.class_id[box] if len(solids) else BACKGROUND)
    track_index = np.where(hit == GROUND, -1, solids.track_index[box] if len(solids) else -1)
    lut = np.zeros(256, dtype=np.float32)
    for k, v in _INTENSITY.items():
        lut[k] = v
    intensity = np.where(hit == GROUND, GROUND_INTENSITY, lut[class_id]).astype(np.float32)
    xyz = transform_points(invert_transform(global_from_ego), global_xyz).astype(np.float32)
    return Sweep(
        xyz=xyz,
        intensity=intensity,
        ring=ring[keep],
        lidar_info=ring[keep] // (LIDAR_RINGS // LIDAR_UNITS),
        class_id=class_id.astype(np.uint8),
        track_index=track_index,
        global_xyz=global_xyz,
        global_from_ego=global_from_ego,
        origin_global=origin,
    )


def pixel_rays(camera: Camera) -> np.ndarray:
    """(H*W, 3) unit directions in the camera frame through every pixel centre, row-major."""
    u, v = np.meshgrid(np.arange(camera.width) + 0.5, np.arange(camera.height) + 0.5, indexing="xy")
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=-1)
    d = pix @ np.linalg.inv(camera.intrinsic).T
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def render_camera(
    world: World,
    camera: Camera,
    timestamp_us: int,
    camera_rays: np.ndarray | None = None,
    *,
    solids: Boxes | None = None,
    global_from_ego: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image: one ray per pixel centre, class colour shaded by surface normal and distance.

    Args:
        world: the world.
        camera: the camera (its ``ego_from_camera`` and intrinsics).
        timestamp_us: image timestamp (objects at that time, pose of :meth:`World.frame_pose`).
        camera_rays: :func:`pixel_rays` of ``camera`` if already computed (saves time over many images).
        solids: ``world.solids_at(timestamp_us)`` if already computed.
        global_from_ego: ``world.frame_pose(timestamp_us)`` if already computed.

    Returns:
        ``(rgb (H, W, 3) uint8, class_id (H, W) uint8)``; class 255 marks sky (no hit), 254 ground.
    """
    if global_from_ego is None:
        global_from_ego = world.frame_pose(timestamp_us)
    if solids is None:
        solids = world.solids_at(timestamp_us)
    global_from_camera = global_from_ego @ camera.ego_from_camera()
    rays = pixel_rays(camera) if camera_rays is None else camera_rays
    dirs = rays @ global_from_camera[:3, :3].T
    origin = global_from_camera[:3, 3]
    hits = cast_rays(origin, dirs, solids.center, solids.size, solids.yaw, CAMERA_MAX_RANGE_M)
    palette = np.zeros((257, 3), dtype=np.float64)
    for k, rgb in CLASS_COLOURS.items():
        palette[k] = rgb
    hit = hits.hit
    cls = np.full(hit.shape, 255, dtype=np.int64)
    cls[hit == GROUND] = 254
    obj = hit >= 0
    cls[obj] = solids.class_id[hit[obj]]
    colour = np.empty((hit.size, 3))
    colour[cls == 255] = SKY_COLOUR
    colour[cls == 254] = GROUND_COLOUR
    colour[obj] = palette[cls[obj]]
    # simple shading: a fixed sun direction (Lambert, with ambient) and a mild distance fade
    sun = np.array([0.4, 0.3, 0.866])
    lambert = np.clip(hits.normal @ sun, 0.0, 1.0)
    shade = 0.75 + 0.25 * lambert
    fade = 1.0 - 0.25 * np.clip(hits.distance / CAMERA_MAX_RANGE_M, 0.0, 1.0)
    lit = hit != MISS
    colour[lit] *= (shade * fade)[lit, None]
    rgb = np.clip(np.rint(colour), 0, 255).astype(np.uint8).reshape(camera.height, camera.width, 3)
    return rgb, cls.astype(np.uint8).reshape(camera.height, camera.width)
