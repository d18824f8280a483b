"""OpenScene v1.1: nuPlan data at 2 Hz as metadata pickles (``<root>/meta_datas/<folder>/<log>.pkl``) with
sensor blobs (``<root>/sensor_blobs/<folder>/<log>/...``, nuPlan's files). The reader is :mod:`.reader`
(restricted, bounded unpickling); the frames are the file's key frames; the files are nuPlan's, so the
cameras, classes and point files are nuPlan's (:mod:`driveengine.sources.nuplan`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from driveengine.schemas.classes import OPENSCENE_CLASSES
from driveengine.sources.base import InputLog, logs_in_folder
from driveengine.sources.logdata import LogData
from driveengine.sources.nuplan import nuplan_points_ego, pcd_file_defect, sensor_folders
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.splits import SplitDef


class OpenSceneSource:
    """OpenScene v1.1 metadata pickles (see the module doc)."""

    name = "openscene"
    dataset = "nuplan"
    description = (
        "OpenScene v1.1 metadata: <root>/meta_datas/<folder>/*.pkl and <root>/sensor_blobs/<folder>/"
    )
    root_option = "--openscene-root"
    cameras = CAMERA_CHANNELS
    class_table = OPENSCENE_CLASSES

    def find_logs(self, root: Path, split: SplitDef, input_dir: Path | None = None) -> list[InputLog]:
        folder = Path(input_dir) if input_dir is not None else Path(root) / "meta_datas" / split.folder
        hint = (
            "expected a folder of .pkl files"
            if input_dir is not None
            else f"expected <openscene-root>/meta_datas/{split.folder}/*.pkl; check {self.root_option} and --split"
        )
        return logs_in_folder(folder, ".pkl", split, hint)

    def default_blob_root(self, root: Path, split: SplitDef) -> Path:
        return Path(root) / "sensor_blobs" / split.folder

    def blob_folders(self, blob_root: Path, log: InputLog) -> list[Path]:
        return sensor_folders(blob_root, log.name)

    def read_log(self, log: InputLog) -> LogData:
        from driveengine.sources.openscene.reader import read_openscene_log

        return read_openscene_log(log.path)

    def key_frame_candidates(self, log: LogData, sample_interval: int) -> np.ndarray:
        return np.arange(log.num_sweeps, dtype=np.int64)  # the metadata holds key frames only

    def lidar_defect(self, path: Path) -> str | None:
        return pcd_file_defect(path)

    def points_ego(self, data: bytes, path: str, ego_from_lidar: np.ndarray) -> np.ndarray:
        return nuplan_points_ego(data, path)
