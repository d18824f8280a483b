"""nuScenes v1.0: the JSON tables (``<root>/v1.0-{mini,trainval,test}/*.json``) with the sensor files they
name (``<root>/samples/``, ``<root>/sweeps/``, optionally nuScenes-lidarseg's ``<root>/lidarseg/``), read
directly (the nuscenes-devkit pins numpy < 2 and is not a dependency).

**Logs are scenes.** ``find_logs`` reads the release's tables once and writes a per-scene index
(:mod:`.index`: column-wise, memory-bounded, links checked, cached by the tables' fingerprint); each
scene is then one task that reads only its own index file (:mod:`.reader`). The splits are the devkit's
scene lists (``nuscenes_mini_train``, ``nuscenes_mini_val``, ``nuscenes_train``, ``nuscenes_val``,
``nuscenes_test``, ``nuscenes_train_detect``, ``nuscenes_train_track``; ``dataset: nuscenes``); a split's
``folder`` is the table folder (``v1.0-mini``, ...), ``--input-dir`` names another one (e.g. a T4-style
release) whose files are then relative to ``--nuscenes-root``.

**Key frames are the samples** (2 Hz): the key-frame ``LIDAR_TOP`` sweeps; ``--sample-interval`` does not
apply. The 20 Hz sweeps between them feed the label generator (``--label-sweep-step``). Labels default
to Occ3D-nuScenes' grid (:data:`~.constants.OCC3D_GRID`, the source's ``label_grid``) and class table
(:data:`~driveengine.schemas.classes.OCC3D_NUSCENES_CLASSES`).

**Categories** map onto the Occ3D-nuScenes table by nuScenes-lidarseg's official 32 -> 16 map
(:data:`~.constants.CATEGORY_TO_OCC3D`): pedestrians (adult, child, construction worker, police
officer) -> pedestrian, barrier, traffic cone, bicycle, bus (bendy, rigid), car, construction vehicle,
motorcycle, trailer, truck, the flat and static classes to their namesakes, and everything lidarseg
ignores (animal, personal mobility, stroller, wheelchair, debris, pushable/pullable, bicycle rack,
ambulance, police vehicle, static.other, noise, ego) -> ``others``. Points in no box are ``others`` (the
table's background) unless nuScenes-lidarseg labels exist for the sweep: then each such point keeps its
lidarseg class mapped the same way (``lidarseg.json`` in the table folder; labels exist for key frames
only). The map is recorded in the manifest through the class table and in every frame row through the
category names.

**Frame rows** (same schema as nuPlan's, six cameras) mean, for nuScenes:

================================ ======================================================================
``token``                        the sample token of the key frame (Occ3D's ``<sample_token>``)
``timestamp``                    the key-frame LIDAR_TOP sample_data timestamp, us
``log_name`` / ``log_token``     ``log.logfile`` / ``log.token``
``scene_name`` / ``scene_token`` ``<logfile>-<scene.name>`` / ``scene.token`` (the output is ``meta/<scene.name>.parquet``)
``map_location``, ``vehicle_name`` ``log.location``, ``log.vehicle``
``roadblock_ids``, ``traffic_lights``, ``scenario_tags`` empty (nuScenes has none)
``can_bus``, ``ego_dynamic_state`` the pose, and dynamics derived from the 20 Hz poses (:mod:`.reader`)
``lidar_path``                   ``sample_data.filename`` of the key-frame sweep (``samples/LIDAR_TOP/...pcd.bin``)
``lidar2ego_*``                  the LIDAR_TOP ``calibrated_sensor`` (nuScenes' LiDAR x points right, y forward)
``ego2global_*``                 the key-frame sweep's own ``ego_pose`` (nuScenes' ego frame: origin on the ground)
``cams.<CAM>``                   the sample's key-frame image of the channel; ``sensor2lidar_*`` are
                                 ``ego_from_camera`` (as for nuPlan); distortion zeros (rectified images)
``sample_prev`` / ``sample_next`` neighbouring sample tokens (nuScenes' ``sample.prev`` / ``next``)
``anns.gt_boxes``                the sample's annotations in the ego frame, (l, w, h) from nuScenes' (w, l, h)
``anns.gt_names``                nuScenes category names (``vehicle.car``, ...)
``anns.gt_velocity_3d``          the devkit's ``box_velocity`` in the ego frame, 0 where it is NaN (noted)
``anns.instance_tokens`` / ``track_tokens`` ``sample_annotation.token`` / ``instance.token``
``source``                       ``nuscenes``
================================ ======================================================================

Bad input: broken tables fail their scenes (:mod:`.index`), missing or truncated ``LIDAR_TOP`` files fail
their scene (:mod:`.reader`), missing images drop frames (``missing_camera``) as for nuPlan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from driveengine.errors import SourceError
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES
from driveengine.sources.base import InputLog
from driveengine.sources.logdata import LogData
from driveengine.sources.nuscenes.constants import CAMERA_CHANNELS, LIDAR_CHANNEL, OCC3D_GRID
from driveengine.splits import SplitDef


class NuScenesSource:
    """nuScenes v1.0 releases (see the module doc)."""

    name = "nuscenes"
    dataset = "nuscenes"
    description = "nuScenes v1.0: <root>/v1.0-*/*.json tables with <root>/samples/, sweeps/ (and lidarseg/)"
    root_option = "--nuscenes-root"
    cameras = CAMERA_CHANNELS
    class_table = OCC3D_NUSCENES_CLASSES
    #: The default grid of generated labels (optional Source member, see labels.generator.default_label_grid).
    label_grid = OCC3D_GRID

    def find_logs(self, root: Path, split: SplitDef, input_dir: Path | None = None) -> list[InputLog]:
        from driveengine.sources.nuscenes.index import open_index

        table_dir = Path(input_dir) if input_dir is not None else Path(root) / split.folder
        if not table_dir.is_dir():
            raise SourceError(
                table_dir,
                "no such folder",
                f"expected <nuscenes-root>/{split.folder}/*.json; check {self.root_option} and --split"
                if input_dir is None
                else "expected a folder of nuScenes tables (*.json)",
            )
        index = open_index(table_dir, root)
        by_name = {scene.name: scene for scene in index.scenes}
        watched = tuple(index.tables)
        return [InputLog(name, by_name[name].file, watched) for name in split.select_logs(list(by_name))]

    def default_blob_root(self, root: Path, split: SplitDef) -> Path:
        return Path(root)

    def blob_folders(self, blob_root: Path, log: InputLog) -> list[Path]:
        version = Path(log.watched[0]).parent.name if log.watched else ""
        folders = [blob_root / "samples" / LIDAR_CHANNEL, blob_root / "sweeps" / LIDAR_CHANNEL]
        folders += [blob_root / "samples" / cam for cam in CAMERA_CHANNELS]
        return [*folders, blob_root / "lidarseg" / version] if version else folders

    def read_log(self, log: InputLog) -> LogData:
        from driveengine.sources.nuscenes.reader import read_nuscenes_scene

        _raise_scene_error(log)
        return read_nuscenes_scene(log.path)

    def key_frame_candidates(self, log: LogData, sample_interval: int) -> np.ndarray:
        from driveengine.sources.nuscenes.reader import NuScenesLogData

        if isinstance(log, NuScenesLogData):
            return np.flatnonzero(log.sweep_is_key_frame).astype(np.int64)
        return np.zeros(0, dtype=np.int64)

    def lidar_defect(self, path: Path) -> str | None:
        from driveengine.sources.nuscenes.reader import sweep_file_defect

        return sweep_file_defect(path)

    def points_ego(self, data: bytes, path: str, ego_from_lidar: np.ndarray) -> np.ndarray:
        from driveengine.sources.nuscenes.reader import points_ego

        return points_ego(data, path, ego_from_lidar)

    def point_classes(self, log: LogData, sweep: int, blob_root: Path, num_points: int) -> np.ndarray | None:
        """nuScenes-lidarseg classes of a sweep's points (see :class:`driveengine.labels.generator.PointClassSource`)."""
        from driveengine.sources.nuscenes.reader import lidarseg_classes

        return lidarseg_classes(log, sweep, blob_root, num_points)


def _raise_scene_error(log: InputLog) -> None:
    """Raise the error the index recorded for the scene, if any (its file is then absent)."""
    import json

    listing = Path(log.path).parent.parent / "index.json"
    if Path(log.path).is_file():
        return
    try:
        scenes = json.loads(listing.read_text())["scenes"]
        entry = next(s for s in scenes if s["name"] == log.name)
    except (OSError, ValueError, KeyError, StopIteration):
        return  # load_scene names the missing file
    if entry.get("error_reason"):
        raise SourceError(entry["error_file"], entry["error_reason"], "fix or re-download the release's tables, "
                          "or leave this scene out with --logs")  # fmt: skip


__all__ = ["NuScenesSource"]
