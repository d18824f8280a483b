"""``LogData``: the in-memory, columnar content of one driving log.

Every source (:mod:`driveengine.sources`: nuPlan SQLite logs, OpenScene pickles, ...) returns a
:class:`LogData`, so that everything after the reader (key frames, frame rows, labels) is shared. It is
dataset-agnostic: the cameras are a named list of any length (nuPlan 8, nuScenes 6), the box categories
are the dataset's own with their class ids in the dataset's class table (``category_class``). Arrays are columnar numpy;
per-sweep variable-length data (boxes, traffic lights, scenario tags) is stored as flat values plus
``offsets`` of length ``num_sweeps + 1``: the rows of sweep ``i`` are ``values[offsets[i]:offsets[i+1]]``.

Frames and units: timestamps in microseconds; positions in metres in the global (UTM) frame unless
the field says ``ego``; quaternions ``[w, x, y, z]``; velocities m/s; yaw radians about +z.
Tokens are lowercase hex strings: 16 characters for nuPlan's 8-byte tokens, twice the byte length for the
tokens of other nuPlan-schema databases (4, 16, ... bytes); OpenScene metadata tokens are kept as the file
gives them.

Values are as the source stores them: the readers refuse corrupt calibration, but ego poses pass through
unchecked (a NULL in the database reads as NaN, an infinity stays, a zero quaternion stays zero; the
boxes of such OpenScene frames come out non-finite too). The frame stage drops those sweeps and counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from driveengine.geometry import make_transform, valid_poses


@dataclass
class LogData:
    """One log, columnar. ``N`` sweeps (LiDAR sweeps, e.g. nuPlan ``lidar_pc`` rows), ``C`` cameras
    (``camera_channels``), ``M`` boxes, ``S`` scenes.

    Sweeps are sorted by ``sweep_timestamp_us`` (the sweep's own timestamp, never the ego pose's).
    Cameras follow ``camera_channels`` (the dataset's fixed order); a channel the log lacks has an empty
    token, NaN calibration and empty image paths.
    """

    # -- provenance and log table --------------------------------------------------------------
    source: str  #: registry name of the source that read it ("nuplan", "openscene", ...)
    path: str  #: the file this was read from
    log_name: str  #: ``log.logfile``, e.g. "2021.05.12.22.00.38_veh-35_01008_01518"
    log_token: str
    vehicle_name: str
    location: str  #: ``log.location`` (e.g. "las_vegas"); may be empty for OpenScene input
    map_version: str  #: ``log.map_version``; OpenScene's ``map_location``

    # -- the merged LiDAR ------------------------------------------------------------------------
    lidar_token: str
    ego_from_lidar: np.ndarray  #: (4, 4) float64

    # -- sweeps (lidar_pc), sorted by timestamp -------------------------------------------------
    sweep_token: np.ndarray  #: (N,) str
    sweep_timestamp_us: np.ndarray  #: (N,) int64
    sweep_lidar_path: np.ndarray  #: (N,) str, relative to the sensor root: "<log>/MergedPointCloud/<tok>.pcd"
    sweep_scene: np.ndarray  #: (N,) int32 index into ``scene_*``, -1 if none

    # -- ego state at each sweep (as stored: may be non-finite, see the module doc) ----------------
    ego_translation: np.ndarray  #: (N, 3) float64, global position of the rear axle, m
    ego_rotation: np.ndarray  #: (N, 4) float64, global orientation [w, x, y, z]
    ego_velocity: np.ndarray  #: (N, 3) float64, ego frame, m/s
    ego_acceleration: np.ndarray  #: (N, 3) float64, ego frame, m/s^2
    ego_angular_rate: np.ndarray  #: (N, 3) float64, ego frame, rad/s

    # -- cameras (C = 8, in CAMERA_CHANNELS order) -----------------------------------------------
    camera_token: np.ndarray  #: (C,) str, "" for a channel the log lacks
    camera_translation: np.ndarray  #: (C, 3) float64, ego_from_camera translation, m
    camera_rotation: np.ndarray  #: (C, 4) float64, ego_from_camera [w, x, y, z]
    camera_intrinsic: np.ndarray  #: (C, 3, 3) float64, pixels
    camera_distortion: np.ndarray  #: (C, 5) float64, k1, k2, p1, p2, k3
    camera_size: np.ndarray  #: (C, 2) int32, width, height in pixels

    # -- images matched to sweeps (closest within +-50 ms, per channel) --------------------------
    image_path: np.ndarray  #: (N, C) str, relative "<log>/<CAM>/<tok>.jpg"; "" when none in the window
    image_timestamp_us: np.ndarray  #: (N, C) int64, -1 when none

    # -- boxes (lidar_box joined with track and category), ragged over sweeps -------------------
    box_offsets: np.ndarray  #: (N + 1,) int64
    box_token: np.ndarray  #: (M,) str
    box_track_token: np.ndarray  #: (M,) str
    box_category: np.ndarray  #: (M,) int8 index into ``categories``
    box_center: np.ndarray  #: (M, 3) float64, global, m
    box_size: np.ndarray  #: (M, 3) float64, (length, width, height) along the box's x, y, z, m
    box_yaw: np.ndarray  #: (M,) float64, global heading, rad
    box_velocity: np.ndarray  #: (M, 3) float64, global frame, m/s
    box_confidence: np.ndarray  #: (M,) float64

    # -- scenes ----------------------------------------------------------------------------------
    scene_token: np.ndarray  #: (S,) str
    scene_name: np.ndarray  #: (S,) str
    scene_roadblock_ids: list[list[str]]  #: S lists of roadblock ids (space-separated in the DB)

    # -- traffic lights, ragged over sweeps ------------------------------------------------------
    traffic_light_offsets: np.ndarray  #: (N + 1,) int64
    traffic_light_lane_connector_id: np.ndarray  #: (K,) int64
    traffic_light_status: np.ndarray  #: (K,) int8: 0 green, 1 yellow, 2 red, 3 unknown

    # -- scenario tags, ragged over sweeps -------------------------------------------------------
    tag_offsets: np.ndarray  #: (N + 1,) int64
    tag_type: np.ndarray  #: (T,) str
    tag_agent_track_token: np.ndarray  #: (T,) str, "" when the tag names no agent

    # -- the dataset's names ---------------------------------------------------------------------
    camera_channels: tuple[str, ...]  #: (C,) camera channel names, the dataset's fixed order
    categories: tuple[str, ...]  #: box category names; ``box_category`` indexes this
    category_class: np.ndarray  #: (len(categories),) uint8 label class id of each category (dataset's table)

    #: Free-form notes from the reader (e.g. rows it skipped and why), surfaced by ``collect``.
    notes: list[str] = field(default_factory=list)

    @property
    def num_sweeps(self) -> int:
        return int(self.sweep_timestamp_us.shape[0])

    def boxes(self, sweep: int) -> slice:
        """Slice of the ``box_*`` arrays that belongs to sweep ``sweep``."""
        return slice(int(self.box_offsets[sweep]), int(self.box_offsets[sweep + 1]))

    def traffic_lights(self, sweep: int) -> slice:
        """Slice of the ``traffic_light_*`` arrays that belongs to sweep ``sweep``."""
        return slice(int(self.traffic_light_offsets[sweep]), int(self.traffic_light_offsets[sweep + 1]))

    def tags(self, sweep: int) -> slice:
        """Slice of the ``tag_*`` arrays that belongs to sweep ``sweep``."""
        return slice(int(self.tag_offsets[sweep]), int(self.tag_offsets[sweep + 1]))

    def valid_ego_poses(self) -> np.ndarray:
        """(N,) bool per sweep: the ego pose makes a transform (finite translation, finite quaternion of
        non-zero norm; see :func:`~driveengine.geometry.valid_poses`). Readers pass poses through
        unchecked; collect drops key frames without one and labels never aggregate their sweeps."""
        return valid_poses(self.ego_translation, self.ego_rotation)

    def global_from_ego(self) -> np.ndarray:
        """(N, 4, 4) float64 ``global_from_ego`` transform of every sweep; NaN where the ego pose is
        non-finite or its quaternion is zero (quietly: no numpy warning)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return make_transform(self.ego_rotation, self.ego_translation)

    def ego_from_camera(self) -> np.ndarray:
        """(C, 4, 4) float64 ``ego_from_camera`` transforms (NaN for absent channels)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return make_transform(self.camera_rotation, self.camera_translation)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose shape disagrees with the others."""
        n, c = self.num_sweeps, len(self.camera_channels)
        per_sweep = {
            "sweep_token": (n,), "sweep_lidar_path": (n,), "sweep_scene": (n,),
            "ego_translation": (n, 3), "ego_rotation": (n, 4), "ego_velocity": (n, 3),
            "ego_acceleration": (n, 3), "ego_angular_rate": (n, 3),
            "camera_token": (c,), "camera_translation": (c, 3), "camera_rotation": (c, 4),
            "camera_intrinsic": (c, 3, 3), "camera_distortion": (c, 5), "camera_size": (c, 2),
            "image_path": (n, c), "image_timestamp_us": (n, c),
            "box_offsets": (n + 1,), "traffic_light_offsets": (n + 1,), "tag_offsets": (n + 1,),
            "category_class": (len(self.categories),),
        }  # fmt: skip
        for name, shape in per_sweep.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"LogData.{name} has shape {got}, expected {shape}")
        if np.any(np.diff(self.sweep_timestamp_us) < 0):
            raise ValueError("LogData sweeps are not sorted by timestamp")
        for prefix, offsets in (
            ("box_", self.box_offsets),
            ("traffic_light_", self.traffic_light_offsets),
            ("tag_", self.tag_offsets),
        ):
            if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
                raise ValueError(f"LogData.{prefix}offsets are not non-decreasing from 0")
            for f in fields(self):
                if f.name.startswith(prefix) and f.name != f"{prefix}offsets":
                    length = len(getattr(self, f.name))
                    if length != offsets[-1]:
                        raise ValueError(f"LogData.{f.name} has {length} rows, offsets say {offsets[-1]}")
        if len(self.scene_name) != len(self.scene_token) or len(self.scene_roadblock_ids) != len(
            self.scene_token
        ):
            raise ValueError("LogData scene_* arrays differ in length")
