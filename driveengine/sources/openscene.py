"""Reader of OpenScene v1.1 metadata (``meta_datas/<split>/<log>.pkl``) into :class:`LogData`.

A metadata file is a pickled ``list[dict]``, one dict per key frame (reference §3). Pickles from the
internet are untrusted: the file is loaded with :func:`~driveengine.sources.safe_pickle.restricted_loads`
admitting only builtins and numpy arrays, so a pickle that names anything else is refused with
:class:`~driveengine.errors.UnsafePickleError` before anything in it runs.

The sweeps of the returned LogData are the file's key frames (sorted by timestamp); everything is put
back into the frames LogData uses, so that both sources give the same frame rows:

* ego pose from ``can_bus`` (global position ``[:3]``, orientation ``[3:7]``; ego-frame acceleration
  ``[7:10]``, velocity ``[10:13]``, angular rate ``[13:16]``);
* boxes from the ego frame back to global: ``centre = loc @ R.T + t``, ``yaw = wrap(yaw + ego yaw)``;
* velocities from OpenScene's **lidar** frame back to global: ``v = v_lidar @ (R_global_from_ego @
  R_ego_from_lidar).T``;
* cameras: ``sensor2lidar_*`` hold OpenScene's camera-to-ego extrinsics; image timestamps are unknown
  (``-1``); camera tokens are not in the file and are derived as ``sha1(log_token + channel)[:16]``;
* scene names: OpenScene's ``log-XXXX-`` prefix (or DriveEngine's ``<log_name>-``) is stripped;
* traffic lights: ``is_red`` becomes status 2 (red), otherwise 3 (unknown: OpenScene keeps only red);
* scenario tags, box confidences, the lidar token and ``log.location`` are not in the file (empty/NaN).
"""

from __future__ import annotations

import hashlib
import re
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from driveengine.errors import SourceError
from driveengine.geometry import make_transform, matrix_to_quaternion, quaternion_yaw, wrap_angle
from driveengine.schemas.classes import (
    CAMERA_CHANNELS,
    CATEGORIES,
    TRAFFIC_LIGHT_CODES,
    TRAFFIC_LIGHT_UNKNOWN,
)
from driveengine.sources.logdata import LogData
from driveengine.sources.safe_pickle import BUILTIN_GLOBALS, NUMPY_GLOBALS, restricted_loads

#: What an OpenScene metadata pickle may contain: builtin containers and scalars, numpy arrays.
OPENSCENE_GLOBALS = {**BUILTIN_GLOBALS, **NUMPY_GLOBALS}

#: Keys every frame dict must have.
REQUIRED_KEYS: tuple[str, ...] = (
    "token", "timestamp", "log_name", "log_token", "vehicle_name", "scene_name", "scene_token",
    "map_location", "roadblock_ids", "can_bus", "lidar_path", "cams", "traffic_lights",
)  # fmt: skip

_OPENSCENE_SCENE_PREFIX = re.compile(r"^log-\d+-")


def load_openscene_pickle(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """The frame dicts of an OpenScene metadata file, loaded with the restricted unpickler.

    Raises:
        UnsafePickleError: the pickle names anything but builtins and numpy arrays (nothing runs).
        SourceError: missing/corrupt file, or not a list of dicts.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(
            path, f"cannot read it ({exc.strerror or exc})", "check the path and the split"
        ) from None
    frames = restricted_loads(data, OPENSCENE_GLOBALS, path, what="OpenScene metadata")
    if not isinstance(frames, list) or not all(isinstance(f, dict) for f in frames):
        raise SourceError(
            path, f"holds {type(frames).__name__}, expected a list of frame dicts (OpenScene v1.1)"
        )
    return frames


def _array(frames: list[dict], key: str, shape: tuple[int, ...], path: Path) -> np.ndarray:
    try:
        out = np.asarray([np.asarray(f[key], dtype=np.float64) for f in frames], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(path, f"key {key!r} is missing or not numeric in a frame ({exc})") from None
    if out.shape[1:] != shape:
        raise SourceError(path, f"key {key!r} has shape {out.shape[1:]}, expected {shape}")
    return out


def _category_index(names: np.ndarray, path: Path) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(CATEGORIES)}
    unknown = sorted(set(names.tolist()) - set(lookup))
    if unknown:
        raise SourceError(path, f"unknown box categories {unknown[:5]}; expected {', '.join(CATEGORIES)}")
    return np.array([lookup[n] for n in names.tolist()], dtype=np.int8)


def read_openscene_log(path: str | PathLike[str]) -> LogData:
    """Read one OpenScene v1.1 metadata file into a validated :class:`LogData` (see the module doc).

    Raises:
        UnsafePickleError: the pickle is not plain data (nothing in it was run).
        SourceError: the file is unreadable, empty, or misses keys.
    """
    path = Path(path)
    frames = load_openscene_pickle(path)
    if not frames:
        raise SourceError(
            path, "holds no frames", "the log has no key frames; remove it or re-create the metadata"
        )
    for i, f in enumerate(frames):
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise SourceError(path, f"frame {i} lacks keys {missing}; is this OpenScene v1.1 metadata?")
    frames = sorted(frames, key=lambda f: (int(f["timestamp"]), str(f["token"])))
    n = len(frames)
    first = frames[0]
    log_name = str(first["log_name"])

    can_bus = _array(frames, "can_bus", (18,), path)
    t_ego, q_ego = can_bus[:, 0:3], can_bus[:, 3:7]
    if "lidar2ego" in first:
        ego_from_lidar = np.asarray(first["lidar2ego"], dtype=np.float64).reshape(4, 4)
    else:
        ego_from_lidar = make_transform(
            np.asarray(first["lidar2ego_rotation"], dtype=np.float64),
            np.asarray(first["lidar2ego_translation"], dtype=np.float64),
        )

    # Scenes in order of appearance.
    scene_tokens: list[str] = []
    scene_index: dict[str, int] = {}
    scene_names: list[str] = []
    roadblocks: list[list[str]] = []
    sweep_scene = np.empty(n, dtype=np.int32)
    for i, f in enumerate(frames):
        tok = str(f["scene_token"])
        if tok not in scene_index:
            scene_index[tok] = len(scene_tokens)
            scene_tokens.append(tok)
            name = str(f["scene_name"])
            name = (
                name.removeprefix(f"{log_name}-")
                if name.startswith(f"{log_name}-")
                else _OPENSCENE_SCENE_PREFIX.sub("", name)
            )
            scene_names.append(name)
            roadblocks.append([str(x) for x in f["roadblock_ids"]])
        sweep_scene[i] = scene_index[tok]

    # Cameras: calibration from the first frame that has the channel.
    c = len(CAMERA_CHANNELS)
    cam_token = np.full(c, "", dtype=object)
    cam_t = np.full((c, 3), np.nan)
    cam_q = np.full((c, 4), np.nan)
    cam_k = np.full((c, 3, 3), np.nan)
    cam_d = np.full((c, 5), np.nan)
    image_path = np.full((n, c), "", dtype=object)
    for j, ch in enumerate(CAMERA_CHANNELS):
        have = [i for i, f in enumerate(frames) if isinstance(f["cams"], dict) and ch in f["cams"]]
        if not have:
            continue
        cam = frames[have[0]]["cams"][ch]
        try:
            cam_t[j] = np.asarray(cam["sensor2lidar_translation"], dtype=np.float64).reshape(3)
            cam_q[j] = matrix_to_quaternion(
                np.asarray(cam["sensor2lidar_rotation"], dtype=np.float64).reshape(3, 3)
            )
            cam_k[j] = np.asarray(cam["cam_intrinsic"], dtype=np.float64).reshape(3, 3)
            cam_d[j] = np.asarray(cam.get("distortion", np.zeros(5)), dtype=np.float64).reshape(5)
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(path, f"camera {ch} of frame {have[0]} is malformed ({exc})") from None
        cam_token[j] = hashlib.sha1(f"{first['log_token']}{ch}".encode()).hexdigest()[:16]
        for i in have:
            image_path[i, j] = str(frames[i]["cams"][ch].get("data_path", ""))

    # Boxes: ego frame -> global.
    ann_list = [f.get("anns") for f in frames]
    counts = np.array([0 if a is None else len(a.get("gt_names", [])) for a in ann_list], dtype=np.int64)
    box_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(box_offsets[-1])
    with_boxes = [a for a in ann_list if a is not None and len(a.get("gt_names", []))]
    if m:
        try:
            boxes = np.concatenate(
                [np.asarray(a["gt_boxes"], dtype=np.float64).reshape(-1, 7) for a in with_boxes]
            )
            vel_lidar = np.concatenate(
                [np.asarray(a["gt_velocity_3d"], dtype=np.float64).reshape(-1, 3) for a in with_boxes]
            )
            names = np.concatenate([np.asarray(a["gt_names"], dtype=str).reshape(-1) for a in with_boxes])
            box_tok = np.concatenate(
                [np.asarray(a["instance_tokens"], dtype=str).reshape(-1) for a in with_boxes]
            )
            track_tok = np.concatenate(
                [np.asarray(a["track_tokens"], dtype=str).reshape(-1) for a in with_boxes]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(path, f"anns are malformed ({exc})") from None
        if not (len(boxes) == len(vel_lidar) == len(box_tok) == len(track_tok) == m):
            raise SourceError(
                path, "anns lists (gt_boxes, gt_velocity_3d, tokens, gt_names) differ in length"
            )
        row = np.repeat(np.arange(n), counts)
        global_from_ego = make_transform(q_ego, t_ego)
        r = global_from_ego[row, :3, :3]
        center = np.einsum("mij,mj->mi", r, boxes[:, :3]) + t_ego[row]
        yaw = wrap_angle(boxes[:, 6] + quaternion_yaw(q_ego)[row])
        r_global_from_lidar = r @ ego_from_lidar[:3, :3]
        velocity = np.einsum("mij,mj->mi", r_global_from_lidar, vel_lidar)
        category = _category_index(names, path)
        size = boxes[:, 3:6]
    else:
        center, size, velocity = np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3))
        yaw = np.zeros(0)
        category = np.zeros(0, dtype=np.int8)
        box_tok = track_tok = np.zeros(0, dtype=str)

    # Traffic lights: OpenScene keeps (lane_connector_id, is_red).
    tl_counts = np.array([len(f["traffic_lights"]) for f in frames], dtype=np.int64)
    lights = [tl for f in frames for tl in f["traffic_lights"]]
    tl_lane = np.array([int(tl[0]) for tl in lights], dtype=np.int64)
    tl_status = np.array(
        [TRAFFIC_LIGHT_CODES["red"] if bool(tl[1]) else TRAFFIC_LIGHT_UNKNOWN for tl in lights], dtype=np.int8
    )

    zeros_off = np.zeros(n + 1, dtype=np.int64)
    log = LogData(
        source="openscene",
        path=str(path),
        log_name=log_name,
        log_token=str(first["log_token"]),
        vehicle_name=str(first["vehicle_name"]),
        location="",
        map_version=str(first["map_location"]),
        lidar_token="",
        ego_from_lidar=ego_from_lidar,
        sweep_token=np.array([str(f["token"]) for f in frames]),
        sweep_timestamp_us=np.array([int(f["timestamp"]) for f in frames], dtype=np.int64),
        sweep_lidar_path=np.array([str(f["lidar_path"]) for f in frames]),
        sweep_scene=sweep_scene,
        ego_translation=t_ego.copy(),
        ego_rotation=q_ego.copy(),
        ego_velocity=can_bus[:, 10:13].copy(),
        ego_acceleration=can_bus[:, 7:10].copy(),
        ego_angular_rate=can_bus[:, 13:16].copy(),
        camera_token=cam_token.astype(str),
        camera_translation=cam_t,
        camera_rotation=cam_q,
        camera_intrinsic=cam_k,
        camera_distortion=cam_d,
        camera_size=np.zeros((c, 2), dtype=np.int32),
        image_path=image_path.astype(str),
        image_timestamp_us=np.full((n, c), -1, dtype=np.int64),
        box_offsets=box_offsets,
        box_token=np.asarray(box_tok, dtype=str),
        box_track_token=np.asarray(track_tok, dtype=str),
        box_category=category,
        box_center=center,
        box_size=size,
        box_yaw=yaw,
        box_velocity=velocity,
        box_confidence=np.full(m, np.nan),
        scene_token=np.array(scene_tokens),
        scene_name=np.array(scene_names),
        scene_roadblock_ids=roadblocks,
        traffic_light_offsets=np.concatenate([[0], np.cumsum(tl_counts)]).astype(np.int64),
        traffic_light_lane_connector_id=tl_lane,
        traffic_light_status=tl_status,
        tag_offsets=zeros_off,
        tag_type=np.zeros(0, dtype=str),
        tag_agent_track_token=np.zeros(0, dtype=str),
    )
    try:
        log.validate()
    except ValueError as exc:
        raise SourceError(path, f"inconsistent metadata ({exc})") from None
    return log
