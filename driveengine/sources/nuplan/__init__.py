"""nuPlan: SQLite log databases (``<root>/splits/<folder>/<log>.db``) with their sensor blobs
(``<root>/sensor_blobs/<log>/{MergedPointCloud/*.pcd, CAM_*/*.jpg}``).

The reader is :mod:`.reader`; nuPlan's names (cameras, lidar channel, categories, their OpenScene
class ids, traffic-light codes) are in :mod:`.constants`. Key frames follow OpenScene's
``create_openscene_metadata.py`` (:func:`openscene_key_frames`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from driveengine.schemas.classes import OPENSCENE_CLASSES
from driveengine.sources.base import MAX_SWEEP_BYTES, MAX_SWEEP_POINTS, InputLog, logs_in_folder
from driveengine.sources.logdata import LogData
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, LIDAR_CHANNEL
from driveengine.splits import SplitDef


def openscene_key_frames(log: LogData, sample_interval: int, first_camera: str = "CAM_F0") -> np.ndarray:
    """Key-frame grid of a nuPlan log, as OpenScene's ``create_openscene_metadata.py`` chooses it.

    The first sweep whose camera channels all have an image within +-50 ms starts the grid; when the
    next sweep's ``first_camera`` image is closer in time to its sweep than the first one's, the grid
    starts there instead (OpenScene: ``start_idx if diff_0 < diff_1 else start_idx + 1``); then every
    ``sample_interval``-th sweep. (OpenScene counted image rows, so 2 images of one channel could stand
    in for a missing channel; here every channel must have one.)

    Args:
        log: the log.
        sample_interval: sweeps between key frames (>= 1).
        first_camera: the channel whose timing breaks the tie (OpenScene: ``CAM_F0``).

    Returns:
        (K,) int64 sweep indices, empty when no sweep has every camera.
    """
    if sample_interval < 1:
        raise ValueError(f"sample_interval must be >= 1, got {sample_interval}")
    full = np.all(log.image_path != "", axis=1)
    if not full.any():
        return np.empty(0, dtype=np.int64)
    start = int(np.argmax(full))
    f0 = log.camera_channels.index(first_camera)
    if start + 1 < log.num_sweeps and log.image_timestamp_us[start + 1, f0] >= 0:
        diff0 = abs(int(log.image_timestamp_us[start, f0]) - int(log.sweep_timestamp_us[start]))
        diff1 = abs(int(log.image_timestamp_us[start + 1, f0]) - int(log.sweep_timestamp_us[start + 1]))
        if not diff0 < diff1:
            start += 1
    return np.arange(start, log.num_sweeps, sample_interval, dtype=np.int64)


def nuplan_points_ego(data: bytes, path: str) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity of a nuPlan ``.pcd`` (its points are in the ego frame already)."""
    from driveengine.sources.pcd import parse_pcd  # numba: imported on first use

    cloud = parse_pcd(bytearray(data), path, max_points=MAX_SWEEP_POINTS, max_bytes=MAX_SWEEP_BYTES)
    out = np.empty((cloud.num_points, 4), dtype=np.float32)
    out[:, :3] = cloud.xyz
    out[:, 3] = cloud.fields["intensity"] if "intensity" in cloud.fields else 0.0
    return out


def sensor_folders(blob_root: Path, log_name: str) -> list[Path]:
    """The lidar and camera folders of a nuPlan log's sensor blobs."""
    folder = blob_root / log_name
    return [folder / LIDAR_CHANNEL] + [folder / cam for cam in CAMERA_CHANNELS]


def pcd_file_defect(path: Path) -> str | None:
    """:func:`driveengine.sources.pcd.pcd_defect` within a sweep's limits (imported on first use: numba)."""
    from driveengine.sources.pcd import pcd_defect

    return pcd_defect(path, max_points=MAX_SWEEP_POINTS, max_bytes=MAX_SWEEP_BYTES)


class NuplanSource:
    """nuPlan log databases (see the module doc)."""

    name = "nuplan"
    dataset = "nuplan"
    description = "nuPlan SQLite logs: <root>/splits/<folder>/*.db and <root>/sensor_blobs/"
    root_option = "--nuplan-root"
    cameras = CAMERA_CHANNELS
    class_table = OPENSCENE_CLASSES

    def find_logs(self, root: Path, split: SplitDef, input_dir: Path | None = None) -> list[InputLog]:
        folder = Path(input_dir) if input_dir is not None else Path(root) / "splits" / split.folder
        hint = (
            "expected a folder of .db files"
            if input_dir is not None
            else f"expected <nuplan-root>/splits/{split.folder}/*.db; check {self.root_option} and --split"
        )
        return logs_in_folder(folder, ".db", split, hint)

    def default_blob_root(self, root: Path, split: SplitDef) -> Path:
        return Path(root) / "sensor_blobs"

    def blob_folders(self, blob_root: Path, log: InputLog) -> list[Path]:
        return sensor_folders(blob_root, log.name)

    def read_log(self, log: InputLog) -> LogData:
        from driveengine.sources.nuplan.reader import read_nuplan_log

        return read_nuplan_log(log.path)

    def key_frame_candidates(self, log: LogData, sample_interval: int) -> np.ndarray:
        return openscene_key_frames(log, sample_interval)

    def lidar_defect(self, path: Path) -> str | None:
        return pcd_file_defect(path)

    def points_ego(self, data: bytes, path: str, ego_from_lidar: np.ndarray) -> np.ndarray:
        return nuplan_points_ego(data, path)
