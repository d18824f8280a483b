"""One nuScenes scene (its file of the release index, :mod:`.index`) into a :class:`NuScenesLogData`.

Everything here is vectorised over the scene's sweeps and annotations:

* **sweeps** are the scene's ``LIDAR_TOP`` sample_data rows (20 Hz), sorted by timestamp, each with its
  own ego pose; a key-frame sweep's token is its **sample token** (the frame rows' ``token``), any other
  sweep's its sample_data token;
* **ego dynamics** (nuScenes' tables have none) are derived from the sweeps' poses: velocity and
  acceleration by central differences in time (one-sided at the ends, over valid poses only), rotated
  into the ego frame; the angular rate about z from the unwrapped yaw; 0 where no difference exists;
* **cameras**: the six channels' calibration (one per scene), the key-frame image of each sample
  (nuScenes links key-frame images to their sample) on the sample's key sweep; other sweeps have none;
* **boxes** of a key sweep are its sample's annotations; a sweep between two samples gets the boxes the
  devkit's ``get_boxes`` gives it: the annotations of the following sample, those whose instance is also
  annotated in the previous sample interpolated to the sweep's time (centre linearly, rotation by slerp,
  the time clamped to the two samples'), the others as annotated; velocities likewise interpolated;
* **box velocities** are the devkit's ``box_velocity`` (computed in the index). Where it is undefined
  (NaN: an instance annotated once, or neighbours more than 1.5 s / 3 s apart) the velocity is **0** and
  the log's notes count those boxes: a NaN never reaches a frame row, and dropping the box would lose
  its geometry (the occupancy labels need it); 0 is the honest "no motion measured";
* **sizes**: nuScenes' width, length, height become LogData's length, width, height; yaw is the heading
  of the box's rotation quaternion.

Sensor files: a scene whose ``LIDAR_TOP`` files are partly missing or truncated (size not a whole
number of 20-byte points) fails with the first such file named; a release with no ``samples/`` nor
``sweeps/`` folder at all is read as metadata only (its frames are dropped by the blob checks).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from driveengine.errors import SourceError
from driveengine.geometry import make_transform, quaternion_to_matrix, quaternion_yaw, valid_poses
from driveengine.sources.base import MAX_SWEEP_POINTS
from driveengine.sources.logdata import LogData
from driveengine.sources.nuscenes.constants import (
    CAMERA_CHANNELS,
    CATEGORY_CLASS,
    PCD_BIN_FIELDS,
    PCD_BIN_POINT_BYTES,
)
from driveengine.sources.nuscenes.index import UNKNOWN_CLASS, load_scene

_HINT_FILES = "re-download or re-extract the release's sensor files, or leave this scene out with --logs"


@dataclass
class NuScenesLogData(LogData):
    """A nuScenes scene: :class:`LogData` plus the nuScenes-lidarseg labels of its sweeps.

    Attributes:
        sweep_lidarseg_path: (N,) str lidarseg ``.bin`` of each sweep relative to the release root, ""
            when none (only key-frame sweeps can have one).
        lidarseg_class: (256,) uint8 Occ3D-nuScenes class id of each lidarseg class id, 255 for ids that
            name no known category.
        sweep_sample_data_token: (N,) str the ``LIDAR_TOP`` sample_data token of each sweep.
        sweep_is_key_frame: (N,) bool, the sweep is a sample's key frame (its token is the sample token).
    """

    sweep_lidarseg_path: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    lidarseg_class: np.ndarray = field(default_factory=lambda: np.full(256, UNKNOWN_CLASS, dtype=np.uint8))
    sweep_sample_data_token: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    sweep_is_key_frame: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def _str(values: np.ndarray) -> np.ndarray:
    """Bytes columns of the index (UTF-8) as numpy str."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values
    if values.size == 0:
        return np.zeros(values.shape, dtype=str)
    try:
        return values.astype(str)  # ASCII, the common case: fast
    except UnicodeDecodeError:
        flat = [bytes(v).decode("utf-8", "replace") for v in values.ravel()]
        return np.array(flat, dtype=str).reshape(values.shape)


def _derivative(x: np.ndarray, t_s: np.ndarray) -> np.ndarray:
    """d x / d t of samples ``x`` (n, k) at times ``t_s`` (n,): central differences, one-sided at the ends,
    0 where the time difference is not positive."""
    n = len(t_s)
    out = np.zeros_like(x)
    if n < 2:
        return out
    i0 = np.r_[0, np.arange(n - 2), n - 2]
    i1 = np.r_[1, np.arange(2, n), n - 1]
    dt = t_s[i1] - t_s[i0]
    ok = dt > 0
    out[ok] = (x[i1[ok]] - x[i0[ok]]) / dt[ok, None]
    return out


def ego_dynamics(
    timestamp_us: np.ndarray, translation: np.ndarray, rotation: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ego velocity, acceleration (ego frame, m/s, m/s^2) and angular rate (rad/s, about z) of each pose,
    from the poses alone (see the module doc); (n, 3) each, finite, 0 where undefined."""
    n = len(timestamp_us)
    velocity, acceleration, rate = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros((n, 3))
    valid = np.flatnonzero(valid_poses(translation, rotation))
    if valid.size < 2:
        return velocity, acceleration, rate
    t_s = (timestamp_us[valid] - timestamp_us[valid[0]]) * 1e-6
    r = quaternion_to_matrix(rotation[valid] / np.linalg.norm(rotation[valid], axis=1, keepdims=True))
    v_global = _derivative(translation[valid], t_s)
    a_global = _derivative(v_global, t_s)
    yaw = np.unwrap(quaternion_yaw(rotation[valid]))
    velocity[valid] = np.einsum("nji,nj->ni", r, v_global)  # R^T v
    acceleration[valid] = np.einsum("nji,nj->ni", r, a_global)
    rate[valid, 2] = _derivative(yaw[:, None], t_s)[:, 0]
    for a in (velocity, acceleration, rate):
        a[~np.isfinite(a)] = 0.0
    return velocity, acceleration, rate


def slerp(q0: np.ndarray, q1: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Spherical interpolation of ``[w, x, y, z]`` quaternions (n, 4) by ``amount`` (n,) in [0, 1], as
    pyquaternion's ``Quaternion.slerp`` (the devkit's): the shorter arc, linear near-parallel (dot > 0.9995)."""
    q0 = q0 / np.sqrt(np.einsum("ij,ij->i", q0, q0))[:, None]
    q1 = q1 / np.sqrt(np.einsum("ij,ij->i", q1, q1))[:, None]
    t = np.clip(amount, 0.0, 1.0)
    dot = np.einsum("ij,ij->i", q0, q1)
    q0 = q0 * np.where(dot < 0, -1.0, 1.0)[:, None]
    dot = np.abs(dot)
    linear = dot > 0.9995
    theta0 = np.arccos(np.minimum(dot, 1.0))
    sin0 = np.where(linear, 1.0, np.sin(theta0))
    s0 = np.where(linear, 1.0 - t, np.cos(theta0 * t) - dot * np.sin(theta0 * t) / sin0)
    s1 = np.where(linear, t, np.sin(theta0 * t) / sin0)
    out = s0[:, None] * q0 + s1[:, None] * q1
    return out / np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]


def heading(q: np.ndarray) -> np.ndarray:
    """Yaw (rad) of the heading (rotated +x) of ``[w, x, y, z]`` quaternions (n, 4), any norm > 0; NaN
    for a zero quaternion (no rotation: the box is degenerate)."""
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    with np.errstate(invalid="ignore"):
        yaw = np.arctan2(2.0 * (x * y + w * z), w * w + x * x - y * y - z * z)
    return np.where((q * q).sum(axis=1) > 0, yaw, np.nan)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[i], starts[i] + counts[i])``."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _check_sweep_files(root: Path, files: np.ndarray, scene: str) -> None:
    """Fail the scene when some of its LIDAR_TOP files are missing or truncated (module doc)."""
    if not ((root / "samples").is_dir() or (root / "sweeps").is_dir()):
        return  # a release without sensor files: metadata only
    missing, broken = [], []
    for rel in files.tolist():
        path = root / rel
        try:
            size = os.stat(path).st_size
        except (FileNotFoundError, NotADirectoryError):
            missing.append(path)
            continue
        if size == 0 or size % PCD_BIN_POINT_BYTES:
            broken.append((path, size))
    if broken:
        path, size = broken[0]
        more = (
            f"; {len(broken) - 1} more sweep file(s) of the scene are broken too" if len(broken) > 1 else ""
        )
        raise SourceError(
            path,
            f"scene {scene}: truncated sweep ({size} bytes is not a whole number of {PCD_BIN_POINT_BYTES}-byte "
            f"points: x, y, z, intensity, ring as float32){more}",
            _HINT_FILES,
        )
    if missing:
        more = (
            f"; {len(missing) - 1} more of its {len(files)} sweep files are missing too"
            if len(missing) > 1
            else ""
        )
        raise SourceError(missing[0], f"scene {scene}: missing sweep file{more}", _HINT_FILES)


def read_nuscenes_scene(path: str | os.PathLike[str], check_files: bool = True) -> NuScenesLogData:
    """Read one scene file of a release index into a validated :class:`NuScenesLogData`.

    Args:
        path: the scene's index file (``InputLog.path`` of the nuScenes source).
        check_files: check the scene's LIDAR_TOP files under the release root (see the module doc).

    Raises:
        SourceError: the index file is damaged, or sweep files are missing or truncated.
    """
    a = load_scene(path)
    meta = json.loads(a["meta"].tobytes())
    scene = meta["scene_name"]
    table_dir = Path(meta["table_dir"])
    if check_files:
        _check_sweep_files(Path(meta["root"]), _str(a["lidar_file"]), scene)
    notes: list[str] = []
    n = len(a["lidar_ts"])
    key = a["lidar_key"].astype(bool)
    sample_of = a["lidar_sample"].astype(np.int64)
    sample_token = _str(a["sample_token"])
    sd_token = _str(a["lidar_token"])
    sweep_token = np.where(
        key & (sample_of >= 0), sample_token[np.maximum(sample_of, 0)] if len(sample_token) else "", sd_token
    )
    t_ego, q_ego = a["lidar_t"].astype(np.float64), a["lidar_q"].astype(np.float64)
    velocity, acceleration, rate = ego_dynamics(a["lidar_ts"], t_ego, q_ego)

    # cameras and the key-frame images
    c = len(CAMERA_CHANNELS)
    image_path = np.full((n, c), "", dtype=object)
    image_ts = np.full((n, c), -1, dtype=np.int64)
    k = np.flatnonzero(key & (sample_of >= 0))
    cam_file = _str(a["cam_file"])
    if k.size:
        image_path[k] = cam_file[sample_of[k]]
        image_ts[k] = a["cam_ts"][sample_of[k]]

    # boxes: per sweep (module doc)
    n_samples = len(a["sample_ts"])
    ann_sample = a["ann_sample"].astype(np.int64)
    ann_start = np.searchsorted(ann_sample, np.arange(n_samples + 1))
    has_sample = sample_of >= 0
    s_of = np.maximum(sample_of, 0)
    counts = (
        np.where(has_sample, ann_start[s_of + 1] - ann_start[s_of], 0) if n_samples else np.zeros(n, np.int64)
    )
    rows = _ranges(ann_start[s_of] if n_samples else np.zeros(n, np.int64), counts)
    box_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=box_offsets[1:])
    sweep_of_box = np.repeat(np.arange(n), counts)
    velocity_ann = a["ann_velocity"].astype(np.float64)
    no_velocity = ~np.isfinite(velocity_ann).all(axis=1)
    if no_velocity.any():
        notes.append(
            f"{int(no_velocity.sum())} of {len(no_velocity)} annotations have no velocity by the devkit's "
            "box_velocity (an instance annotated once, or neighbours > 1.5 s apart): their velocity is 0"
        )
    velocity_ann = np.where(no_velocity[:, None], 0.0, velocity_ann)
    center = a["ann_t"][rows].astype(np.float64)
    rotation = a["ann_q"][rows].astype(np.float64)
    box_velocity = velocity_ann[rows]
    # sweeps between samples: interpolate the boxes whose instance is in the previous sample too
    _, inst_id = np.unique(a["ann_instance"], return_inverse=True)
    inst_id = inst_id.reshape(-1).astype(np.int64)
    interp = ~key[sweep_of_box] & (sample_of[sweep_of_box] > 0)
    if interp.any():
        width = n_samples + 1
        pair = inst_id * width + ann_sample
        order = np.argsort(pair, kind="stable")
        cur = rows[interp]
        want = inst_id[cur] * width + (ann_sample[cur] - 1)
        pos = np.minimum(np.searchsorted(pair[order], want), len(order) - 1)
        found = pair[order][pos] == want
        prev = order[pos]
        idx = np.flatnonzero(interp)[found]
        cur, prev = cur[found], prev[found]
        sw = sweep_of_box[idx]
        t1 = a["sample_ts"][ann_sample[cur]].astype(np.float64)
        t0 = a["sample_ts"][ann_sample[prev]].astype(np.float64)
        t = np.clip(a["lidar_ts"][sw].astype(np.float64), t0, t1)
        amount = np.where(t1 > t0, (t - t0) / np.where(t1 > t0, t1 - t0, 1.0), 0.0)
        center[idx] = a["ann_t"][prev] + amount[:, None] * (a["ann_t"][cur] - a["ann_t"][prev])
        rotation[idx] = slerp(a["ann_q"][prev].astype(np.float64), a["ann_q"][cur].astype(np.float64), amount)
        box_velocity[idx] = velocity_ann[prev] + amount[:, None] * (velocity_ann[cur] - velocity_ann[prev])
    categories = tuple(sorted(set(_str(a["ann_category"]).tolist())))
    cat_index = {name: i for i, name in enumerate(categories)}
    ann_cat = np.array([cat_index[x] for x in _str(a["ann_category"]).tolist()], dtype=np.int8)
    wlh = a["ann_wlh"][rows].astype(np.float64)
    yaw = heading(rotation)

    cam_size = a["cam_size"].astype(np.int32)
    lidar_calib = make_transform(a["lidar_calib_q"].astype(np.float64), a["lidar_calib_t"].astype(np.float64))
    zeros = np.zeros(n + 1, dtype=np.int64)
    log = NuScenesLogData(
        source="nuscenes", path=str(table_dir), log_name=meta["logfile"], log_token=meta["log_token"],
        vehicle_name=meta["vehicle"], location=meta["location"], map_version=meta["location"],
        lidar_token=_str(a["lidar_calib_token"])[0], ego_from_lidar=lidar_calib,
        sweep_token=sweep_token.astype(str), sweep_timestamp_us=a["lidar_ts"].astype(np.int64),
        sweep_lidar_path=_str(a["lidar_file"]), sweep_scene=np.zeros(n, dtype=np.int32),
        ego_translation=t_ego, ego_rotation=q_ego, ego_velocity=velocity, ego_acceleration=acceleration,
        ego_angular_rate=rate,
        camera_token=_str(a["cam_token"]), camera_translation=a["cam_t"].astype(np.float64),
        camera_rotation=a["cam_q"].astype(np.float64), camera_intrinsic=a["cam_k"].astype(np.float64),
        camera_distortion=np.where(np.isnan(a["cam_t"][:, :1]), np.nan, np.zeros((c, 5))),
        camera_size=cam_size, image_path=image_path.astype(str), image_timestamp_us=image_ts,
        box_offsets=box_offsets, box_token=_str(a["ann_token"])[rows], box_track_token=_str(a["ann_instance"])[rows],
        box_category=ann_cat[rows], box_center=center, box_size=wlh[:, [1, 0, 2]], box_yaw=yaw,
        box_velocity=box_velocity, box_confidence=np.ones(len(rows)),
        scene_token=np.array([meta["scene_token"]]), scene_name=np.array([scene]), scene_roadblock_ids=[[]],
        traffic_light_offsets=zeros, traffic_light_lane_connector_id=np.zeros(0, np.int64),
        traffic_light_status=np.zeros(0, np.int8), tag_offsets=zeros.copy(), tag_type=np.zeros(0, dtype=str),
        tag_agent_track_token=np.zeros(0, dtype=str), camera_channels=CAMERA_CHANNELS, categories=categories,
        category_class=np.array([CATEGORY_CLASS[name] for name in categories], dtype=np.uint8),
        notes=notes, sweep_lidarseg_path=_str(a["lidar_seg"]), lidarseg_class=a["lidarseg_lut"].astype(np.uint8),
        sweep_sample_data_token=sd_token, sweep_is_key_frame=key & (sample_of >= 0),
    )  # fmt: skip
    try:
        log.validate()
    except ValueError as exc:  # pragma: no cover - the index is ours; a damaged one is caught on load
        raise SourceError(path, f"the scene's index file is inconsistent ({exc})") from None
    return log


def points_ego(data: bytes, path: str, ego_from_lidar: np.ndarray) -> np.ndarray:
    """(N, 4) float32 x, y, z (ego frame, m) and intensity of a nuScenes ``.pcd.bin`` sweep (float32 x 5
    per point in the LIDAR_TOP frame: x, y, z, intensity, ring), moved with ``ego_from_lidar``.

    Raises:
        SourceError: the size is not a whole number of 20-byte points (truncated).
    """
    if len(data) % PCD_BIN_POINT_BYTES:
        raise SourceError(
            path,
            f"truncated sweep: {len(data)} bytes is not a whole number of {PCD_BIN_POINT_BYTES}-byte points",
            _HINT_FILES,
        )
    if (too_many := _too_many_points(len(data))) is not None:
        raise SourceError(path, f"{too_many}: damaged?", _HINT_FILES)
    raw = np.frombuffer(data, dtype="<f4").reshape(-1, PCD_BIN_FIELDS)
    m = np.asarray(ego_from_lidar, dtype=np.float64)
    out = np.empty((raw.shape[0], 4), dtype=np.float32)
    out[:, :3] = raw[:, :3].astype(np.float64) @ m[:3, :3].T + m[:3, 3]
    out[:, 3] = raw[:, 3]
    return out


def sweep_file_defect(path: Path) -> str | None:
    """What is wrong with a ``.pcd.bin`` file from its size alone, or None."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if size == 0:
        return "empty sweep file"
    if size % PCD_BIN_POINT_BYTES:
        return f"{size} bytes is not a whole number of {PCD_BIN_POINT_BYTES}-byte points: truncated"
    return _too_many_points(size)


def _too_many_points(size: int) -> str | None:
    """Why a ``.pcd.bin`` of ``size`` bytes holds more points than a sweep may, or None."""
    points = size // PCD_BIN_POINT_BYTES
    return (
        f"{points} points, more than the {MAX_SWEEP_POINTS} a sweep may hold"
        if points > MAX_SWEEP_POINTS
        else None
    )


def lidarseg_classes(log: LogData, sweep: int, blob_root: Path, num_points: int) -> np.ndarray | None:
    """(num_points,) uint8 Occ3D-nuScenes class of each point of sweep ``sweep`` from its nuScenes-lidarseg
    file, or None when the sweep has none.

    Raises:
        SourceError: the file is listed but missing, its size is not one byte per point, or it holds a
            class id that names no category.
    """
    if not isinstance(log, NuScenesLogData) or log.sweep_lidarseg_path.size == 0:
        return None
    rel = str(log.sweep_lidarseg_path[sweep])
    if not rel:
        return None
    path = Path(blob_root) / rel
    try:
        with open(path, "rb") as f:
            data = f.read(num_points + 1)  # one byte a point: a larger file is not read whole
    except OSError as exc:
        raise SourceError(
            path, f"lidarseg labels listed in lidarseg.json but unreadable ({exc.strerror or exc})"
        ) from None
    if len(data) != num_points:
        size = f"{len(data)} bytes" if len(data) <= num_points else "more bytes"
        raise SourceError(path, f"lidarseg labels: {size} for a sweep of {num_points} points")
    ids = np.frombuffer(data, dtype=np.uint8)
    classes = log.lidarseg_class[ids]
    if (classes == UNKNOWN_CLASS).any():
        bad = int(ids[np.argmax(classes == UNKNOWN_CLASS)])
        raise SourceError(path, f"lidarseg labels: class id {bad} names no known category of category.json")
    return classes
