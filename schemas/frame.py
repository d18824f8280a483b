"""The Arrow schema of a frame row: one row per key frame in ``<out>/<split>/meta/<log>.parquet``.

Rows keep OpenScene v1.1's key names and meanings (``meta_datas/<split>/<log>.pkl``) in proper Arrow
types, so that users of OpenScene recognise them and pandas, polars, DuckDB read them without
DriveEngine:

* matrices are nested fixed-size lists (``ego2global`` is ``fixed_size_list<fixed_size_list<double, 4>, 4>``,
  row-major: ``np.asarray(col.to_pylist())`` or ``values.flatten().to_numpy().reshape(-1, 4, 4)``);
* vectors are fixed-size lists (``can_bus`` 18, quaternions ``[w, x, y, z]`` 4, translations 3);
* ``cams`` is a struct with one member per camera of the dataset, always in the dataset's fixed order
  (the manifest's ``dataset.cameras``; nuPlan: ``CAM_F0, CAM_L0, CAM_R0, CAM_L1, CAM_R1, CAM_L2, CAM_R2,
  CAM_B0``), see :func:`frame_schema`;
* ``anns`` is a struct of per-box lists, **null** for test data (``--is-test``);
* ``traffic_lights`` is a list of ``{lane_connector_id, is_red}`` structs.

Frames and units: timestamps in microseconds; global positions in metres (UTM) of the rear axle;
the ego frame is x forward, y left, z up, origin at the rear axle; angles in radians.

Fixes of OpenScene's quirks (each one a deliberate difference from the original ``.pkl`` files):

1. **Camera order**: ``cams`` always lists the channels in the dataset's fixed order (OpenScene's dict
   followed the SQL row order).
2. **Scene names** are ``<log_name>-<scene.name>``, the same whatever the number of worker processes
   (OpenScene wrote ``log-XXXX-<scene.name>`` with ``XXXX`` depending on the thread count).
3. **frame_idx** counts the kept key frames of a scene 0, 1, 2, ... without gaps (OpenScene left gaps
   where frames were dropped and reset the counter by the look-ahead frame's scene).
4. **sample_prev / sample_next** link neighbouring key frames of the same scene only: null at scene
   boundaries (OpenScene linked across scenes) and next to a dropped frame (as OpenScene did), so a
   link always spans one key-frame interval (0.5 s at 2 Hz).
5. **Box yaw** ``anns.gt_boxes[:, 6]`` is ``box yaw - ego yaw`` wrapped to ``[-pi, pi)`` (OpenScene did
   not wrap).
6. **Box velocities** ``anns.gt_velocity_3d`` are in the ego frame, the frame of ``gt_boxes`` (OpenScene
   rotated them into the lidar frame while the boxes are in the ego frame). The legacy ``.pkl`` export
   writes OpenScene's lidar-frame velocities back.
7. **No frame with all 8 cameras** is not a crash: the log is written with 0 rows and reported
   (``dropped["no_frame_with_all_cameras"]``).
8. **Camera extrinsics** are kept under OpenScene's names ``sensor2lidar_rotation`` /
   ``sensor2lidar_translation`` *with OpenScene's values*, which are the camera-to-**ego** extrinsics from
   nuPlan's ``camera`` table (``ego_from_camera``), despite the name.

Key frames are chosen by the source (``driveengine.sources``); for nuPlan logs as OpenScene's
``create_openscene_metadata.py`` does: the first ``lidar_pc``
whose 8 camera channels all have an image within +-50 ms, moved one sweep later when that sweep's
``CAM_F0`` image is closer in time, then every ``sample_interval``-th (default 10, i.e. 2 Hz)
``lidar_pc`` of the log. A key frame is dropped when its ego pose is not finite, or its ``.pcd`` or one
of its 8 images is missing or broken (truncated, empty, unparsable header), with the reason counted in
the manifest (``driveengine.collect.frames.DROP_REASONS``).

**Finite columns.** Every float column and member listed in :data:`FINITE_COLUMNS` (poses, transforms,
calibration, ``can_bus``, boxes and box velocities: all of them) must hold finite numbers. ``collect``
drops a key frame whose ego pose is not finite (``dropped["bad_ego_pose"]``) and checks every finite
column of a log before committing it: a NaN or inf anywhere fails that log, naming the column, row and
token. ``driveengine schema`` marks these columns ``[finite]``.

``driving_command`` (one-hot ``left, forward, right, unknown``) is **derived from the ego's own future
path**, since maps are not read (OpenScene used the map route): the ego position after 20 m of travel
along the key-frame path, expressed in the current ego frame, has a lateral offset ``y``; ``y > 2 m`` is
left, ``y < -2 m`` right, otherwise forward; ``unknown`` when the log ends before 20 m of travel.

Columns DriveEngine adds: ``scenario_tags`` (nuPlan ``scenario_tag.type`` of the frame's ``lidar_pc``,
sorted, unique), ``source`` (the source's registry name: ``nuplan``, ``openscene``, ...), ``split`` and
``frame_index`` (int32, never null: the row's position in its log's shard, ``0 .. T-1``, which is its
index along the ``frame`` axis of every array of ``occ/<log>.zarr``: the explicit link between a row and
its labels; the label group's ``frame`` coordinate holds the same numbers). Shards of format version 1
(and of version 2 written before this column was added) lack ``frame_index``; readers must not require
it (the row's position is the same number).
Which columns mean what for a given dataset beyond this is documented by its source package.

:data:`FRAME_SCHEMA_VERSION` is :data:`driveengine.schemas.FORMAT_VERSION`; it is stored in the
Parquet schema metadata (``driveengine.format_version``) of every shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
from driveengine.schemas import FORMAT_VERSION

#: Version of the frame-row schema: the dataset format version (bump it on any change of this schema).
FRAME_SCHEMA_VERSION: int = FORMAT_VERSION

#: Index of each command in the one-hot ``driving_command``.
DRIVING_COMMANDS: tuple[str, ...] = ("left", "forward", "right", "unknown")
#: Travel distance (m) ahead of the ego at which the lateral offset is measured.
DRIVING_COMMAND_LOOKAHEAD_M = 20.0
#: Lateral offset (m) beyond which the command is left (positive) or right (negative).
DRIVING_COMMAND_LATERAL_M = 2.0

#: Number of values in ``can_bus``.
CAN_BUS_SIZE = 18


def _f64_vector(n: int) -> pa.DataType:
    return pa.list_(pa.float64(), n)


def _f64_matrix(rows: int, cols: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float64(), cols), rows)


#: One camera of ``cams``.
CAMERA_TYPE = pa.struct(
    [
        pa.field("data_path", pa.string(), nullable=False, metadata={"doc": "relative image path <log>/<CAM>/<token>.jpg"}),
        pa.field("timestamp", pa.int64(), metadata={"doc": "image timestamp, us; null when the source lacks it (OpenScene)"}),
        pa.field("sensor2lidar_rotation", _f64_matrix(3, 3), nullable=False, metadata={"doc": "3x3 rotation of ego_from_camera (OpenScene's name and value)"}),
        pa.field("sensor2lidar_translation", _f64_vector(3), nullable=False, metadata={"doc": "translation of ego_from_camera, m (OpenScene's name and value)"}),
        pa.field("cam_intrinsic", _f64_matrix(3, 3), nullable=False, metadata={"doc": "3x3 intrinsic matrix, pixels"}),
        pa.field("distortion", _f64_vector(5), nullable=False, metadata={"doc": "k1, k2, p1, p2, k3"}),
    ]
)  # fmt: skip


def cams_type(cameras: Sequence[str]) -> pa.DataType:
    """``cams``: a struct with one :data:`CAMERA_TYPE` member per camera channel of the dataset, in the
    dataset's fixed order (nuPlan's 8, nuScenes' 6, ...)."""
    if not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f"cams needs distinct camera channel names, got {list(cameras)}")
    return pa.struct([pa.field(channel, CAMERA_TYPE, nullable=False) for channel in cameras])


#: One traffic light of ``traffic_lights``.
TRAFFIC_LIGHT_TYPE = pa.struct(
    [
        pa.field("lane_connector_id", pa.int64(), nullable=False),
        pa.field("is_red", pa.bool_(), nullable=False),
    ]
)

#: ``anns``: the boxes of a key frame, all lists of the same length N.
ANNS_TYPE = pa.struct(
    [
        pa.field("gt_boxes", pa.list_(_f64_vector(7)), nullable=False, metadata={"doc": "(N, 7) x, y, z, l, w, h, yaw in the ego frame; yaw = box yaw - ego yaw wrapped to [-pi, pi)"}),
        pa.field("gt_names", pa.list_(pa.string()), nullable=False, metadata={"doc": "(N,) nuPlan category names"}),
        pa.field("gt_velocity_3d", pa.list_(_f64_vector(3)), nullable=False, metadata={"doc": "(N, 3) box velocity, m/s, ego frame (OpenScene: lidar frame)"}),
        pa.field("instance_tokens", pa.list_(pa.string()), nullable=False, metadata={"doc": "(N,) lidar_box tokens"}),
        pa.field("track_tokens", pa.list_(pa.string()), nullable=False, metadata={"doc": "(N,) track tokens"}),
    ]
)  # fmt: skip

_FIELDS: list[tuple[str, pa.DataType | None, bool, str]] = [
    # name, type, nullable, doc
    ("token", pa.string(), False, "lidar_pc token of the key frame (16 hex)"),
    ("frame_idx", pa.int32(), False, "index of the key frame within its scene, 0.. without gaps"),
    ("timestamp", pa.int64(), False, "lidar_pc timestamp, us"),
    ("log_name", pa.string(), False, "log.logfile"),
    ("log_token", pa.string(), False, "log token"),
    ("scene_name", pa.string(), False, "<log_name>-<scene.name> (deterministic)"),
    ("scene_token", pa.string(), False, "scene token"),
    ("map_location", pa.string(), False, "log.map_version"),
    ("roadblock_ids", pa.list_(pa.string()), False, "scene.roadblock_ids (space-separated in the DB)"),
    ("vehicle_name", pa.string(), False, "log.vehicle_name"),
    ("can_bus", _f64_vector(CAN_BUS_SIZE), False, "x,y,z, qw,qx,qy,qz, acc xyz, vel xyz, rate xyz, 0, 0 (global pose; ego-frame dynamics)"),
    ("lidar_path", pa.string(), False, "relative .pcd path <log>/MergedPointCloud/<token>.pcd"),
    ("lidar2ego_translation", _f64_vector(3), False, "ego_from_lidar translation, m"),
    ("lidar2ego_rotation", _f64_vector(4), False, "ego_from_lidar rotation [w, x, y, z]"),
    ("ego2global_translation", _f64_vector(3), False, "global_from_ego translation, m (rear axle)"),
    ("ego2global_rotation", _f64_vector(4), False, "global_from_ego rotation [w, x, y, z]"),
    ("ego_dynamic_state", _f64_vector(4), False, "vx, vy (m/s), acc_x, acc_y (m/s^2) in the ego frame"),
    ("traffic_lights", pa.list_(TRAFFIC_LIGHT_TYPE), False, "traffic_light_status of the lidar_pc"),
    ("driving_command", pa.list_(pa.int8(), 4), False, "one-hot left, forward, right, unknown from the ego's future path (20 m ahead, +-2 m)"),
    ("cams", None, False, "the dataset's cameras, one member per channel in the dataset's order (manifest dataset.cameras)"),
    ("sample_prev", pa.string(), True, "token of the previous key frame of the same scene; null at a scene start or after a dropped frame"),
    ("sample_next", pa.string(), True, "token of the next key frame of the same scene; null at a scene end or before a dropped frame"),
    ("ego2global", _f64_matrix(4, 4), False, "global_from_ego 4x4"),
    ("lidar2ego", _f64_matrix(4, 4), False, "ego_from_lidar 4x4"),
    ("lidar2global", _f64_matrix(4, 4), False, "global_from_lidar 4x4"),
    ("anns", ANNS_TYPE, True, "boxes of the key frame in the ego frame; null for test data"),
    ("scenario_tags", pa.list_(pa.string()), False, "nuPlan scenario_tag types of the lidar_pc (sorted, unique); DriveEngine addition"),
    ("source", pa.string(), False, "the source that read the input (registry name: nuplan, openscene, ...); DriveEngine addition"),
    ("split", pa.string(), False, "split name the frame was collected for; DriveEngine addition"),
    ("frame_index", pa.int32(), False, "index of the row within its log's shard (0, 1, ...) = index along the frame axis (T) of occ/<log>.zarr; DriveEngine addition, absent in format-1 shards"),
]  # fmt: skip


def frame_schema(cameras: Sequence[str]) -> pa.Schema:
    """The schema of ``meta/<log>.parquet`` for a dataset whose cameras are ``cameras`` (in order).

    Every column is the same for every dataset; only the members of ``cams`` follow the dataset.
    """
    cams = cams_type(cameras)
    return pa.schema(
        [
            pa.field(name, cams if name == "cams" else dtype, nullable=nullable, metadata={"doc": doc})
            for name, dtype, nullable, doc in _FIELDS
        ],
        metadata={"driveengine.format_version": str(FRAME_SCHEMA_VERSION), "driveengine.kind": "frames"},
    )


def schema_cameras(schema: pa.Schema) -> tuple[str, ...]:
    """The camera channels of a frame schema (the members of its ``cams`` struct, in order)."""
    return tuple(f.name for f in schema.field("cams").type)


#: Column docs by name (``driveengine schema`` prints them).
FRAME_FIELD_DOCS: dict[str, str] = {name: doc for name, _, _, doc in _FIELDS}

#: Float columns that must hold finite numbers only (no NaN, no inf), as dotted paths: ``cams.*.<member>``
#: stands for that member of every camera, ``anns.<member>`` for a member of ``anns``. Declared here
#: once; ``collect`` checks them before it commits a log (:func:`driveengine.collect.frames.check_finite`).
FINITE_COLUMNS: tuple[str, ...] = (
    "can_bus", "lidar2ego_translation", "lidar2ego_rotation", "ego2global_translation", "ego2global_rotation",
    "ego_dynamic_state", "ego2global", "lidar2ego", "lidar2global",
    "cams.*.sensor2lidar_rotation", "cams.*.sensor2lidar_translation", "cams.*.cam_intrinsic",
    "cams.*.distortion",
    "anns.gt_boxes", "anns.gt_velocity_3d",
)  # fmt: skip

#: Suffix of the doc of a :data:`FINITE_COLUMNS` entry in :func:`describe_schema`.
FINITE_MARK = " [finite: NaN/inf refused]"


def _marked(path: str, doc: str) -> str:
    return doc + FINITE_MARK if path in FINITE_COLUMNS else doc


def describe_schema(cameras: Sequence[str] = ("<CAM_*>",)) -> list[tuple[str, str, str]]:
    """``(field, Arrow type, doc)`` for every column and nested member of the frame schema.

    Docs of :data:`FINITE_COLUMNS` end with :data:`FINITE_MARK`.

    Args:
        cameras: the dataset's camera channels, listed in the ``cams`` line.
    """
    out: list[tuple[str, str, str]] = []
    for f in frame_schema(["<CAM_*>"]):
        kind = str(f.type) if not pa.types.is_struct(f.type) else "struct"
        out.append((f.name, kind, _marked(f.name, FRAME_FIELD_DOCS[f.name])))
        if f.name == "cams":
            out.append(("cams.<CAM_*>", "struct", f"one per channel: {', '.join(cameras)}"))
            for member in CAMERA_TYPE:
                doc = (member.metadata or {}).get(b"doc", b"").decode()
                out.append(
                    (f"cams.<CAM_*>.{member.name}", str(member.type), _marked(f"cams.*.{member.name}", doc))
                )
        elif f.name == "anns":
            for member in ANNS_TYPE:
                doc = (member.metadata or {}).get(b"doc", b"").decode()
                out.append((f"anns.{member.name}", str(member.type), _marked(f"anns.{member.name}", doc)))
    return out
