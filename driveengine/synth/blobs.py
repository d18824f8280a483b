"""Sensor blobs of a synthetic log: ``.pcd`` sweeps and ``.jpg`` camera images.

Layout (as nuPlan's ``sensor_blobs``): ``<root>/<log>/MergedPointCloud/<token>.pcd`` and
``<root>/<log>/<CAM>/<token>.jpg``; the relative part is exactly ``lidar_pc.filename`` /
``image.filename_jpg``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from driveengine.sources.pcd import write_nuplan_pcd
from driveengine.synth.sensors import Sweep, lidar_sweep, render_camera
from driveengine.synth.world import Camera, World

#: JPEG quality of the synthetic images.
JPEG_QUALITY = 92


def write_sweep(world: World, path: Path, timestamp_us: int, rays: int, sweep_index: int, **known) -> Sweep:
    """Cast the sweep at ``timestamp_us`` and write it to ``path`` (nuPlan ``.pcd``, ego-frame points).

    ``known``: ``solids`` / ``global_from_ego`` already computed for that timestamp (see
    :func:`~driveengine.synth.sensors.lidar_sweep`).
    """
    sweep = lidar_sweep(world, timestamp_us, rays=rays, sweep_index=sweep_index, **known)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nuplan_pcd(path, sweep.xyz, sweep.intensity, sweep.ring, sweep.lidar_info)
    return sweep


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    """JPEG encoding (Pillow, quality :data:`JPEG_QUALITY`) of an (H, W, 3) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_image(
    world: World,
    camera: Camera,
    path: Path,
    timestamp_us: int,
    camera_rays: np.ndarray | None = None,
    **known,
) -> int:
    """Render ``camera`` at ``timestamp_us`` and write the JPEG to ``path``; returns bytes written.

    ``camera_rays``: the camera's :func:`~driveengine.synth.sensors.pixel_rays`, if already computed;
    ``known``: ``solids`` / ``global_from_ego`` already computed for that timestamp.
    """
    rgb, _ = render_camera(world, camera, timestamp_us, camera_rays, **known)
    data = jpeg_bytes(rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)
