"""Reader of OpenScene v1.1 metadata (``meta_datas/<split>/<log>.pkl``) into :class:`LogData`.

A metadata file is a pickled ``list[dict]``, one dict per key frame (reference §3). Pickles from the
internet are untrusted: the file is loaded with :func:`~driveengine.sources.safe_pickle.restricted_loads`
admitting only builtins and numpy arrays, so a pickle that names anything else is refused with
:class:`~driveengine.errors.UnsafePickleError` before anything in it runs, and one that asks for more
memory, work or nesting than its size justifies is refused the same way. Every frame dict is then checked
(keys, types, shapes, calibration): a malformed one is one :class:`~driveengine.errors.SourceError` naming
the file, the frame (index and token), the key, what it holds and what was expected.

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
from typing import Any, NoReturn

import numpy as np

from driveengine.errors import SourceError
from driveengine.geometry import (
    MIN_QUATERNION_NORM,
    make_transform,
    matrix_to_quaternion,
    quaternion_yaw,
    wrap_angle,
)
from driveengine.sources.logdata import LogData
from driveengine.sources.nuplan.constants import (
    CAMERA_CHANNELS,
    CATEGORIES,
    CATEGORY_CLASS,
    TRAFFIC_LIGHT_CODES,
    TRAFFIC_LIGHT_UNKNOWN,
)
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
    """The frame dicts of an OpenScene metadata file, loaded with the restricted, bounded unpickler (the
    dicts' contents are not checked here: :func:`read_openscene_log` does that).

    Raises:
        UnsafePickleError: the pickle names anything but builtins and numpy arrays (nothing runs), or is a
            memory/work bomb (see :mod:`driveengine.sources.safe_pickle`).
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


_HINT_METADATA = "the metadata is corrupt: re-download it, or re-create it with `driveengine export`"
_HINT_CALIBRATION = "the metadata's calibration is corrupt: re-download it, or leave this log out"

#: Tolerance of a rotation matrix: ``|R^T R - I|`` and ``|det R - 1|`` at most this.
ROTATION_TOLERANCE = 1e-3


def _describe(value: object) -> str:
    """A short description of a value for error messages: its type, and its size or value."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} with shape {value.shape}"
    if isinstance(value, str | bytes):
        return f"{type(value).__name__} {value!r:.40}"
    if isinstance(value, list | tuple | dict | set):
        return f"a {type(value).__name__} of {len(value)}"
    if value is None or isinstance(value, int | float | bool | np.generic):
        return f"{type(value).__name__} {value!r}"
    return f"a {type(value).__name__}"


class _Frame:
    """Typed access to one frame dict; every failure is one :class:`SourceError` naming the file, the
    frame (index in the file and token), the key, what it holds and what was expected."""

    def __init__(self, path: Path, index: int, frame: dict) -> None:
        self.path = path
        self.frame = frame
        token = frame.get("token")
        self.where = f"frame {index} (token {token!r:.40})" if isinstance(token, str) else f"frame {index}"

    def fail(self, key: str, value: object, expected: str, hint: str = _HINT_METADATA) -> NoReturn:
        raise SourceError(
            self.path, f"{self.where}: {key} holds {_describe(value)}, expected {expected}", hint
        )

    def get(self, key: str, container: dict | None = None, name: str | None = None) -> object:
        container = self.frame if container is None else container
        if key not in container:
            raise SourceError(self.path, f"{self.where}: {name or key} is missing", _HINT_METADATA)
        return container[key]

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            self.fail(key, value, "a string")
        return value

    def integer(self, key: str) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            self.fail(key, value, "an integer")
        return int(value)

    def numbers(self, name: str, value: object, shape: tuple[int, ...], expected: str) -> np.ndarray:
        """``value`` as a float64 array of ``shape`` (-1: any length); numbers only, no strings or None."""
        if isinstance(value, str | bytes) or value is None:
            self.fail(name, value, expected)
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):
            self.fail(name, value, expected)
        if array.dtype.kind not in "iuf" or array.ndim != len(shape):
            self.fail(name, value, expected)
        if any(want not in (-1, got) for want, got in zip(shape, array.shape, strict=True)):
            self.fail(name, value, expected)
        return array.astype(np.float64)

    def strings(self, name: str, value: object, expected: str) -> np.ndarray:
        """``value`` as a 1-d array of strings (from a list, tuple or 1-d array of them)."""
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind == "U":
            return value
        items = value.tolist() if isinstance(value, np.ndarray) and value.ndim == 1 else value
        if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
            self.fail(name, value, expected)
        return np.array(items, dtype=str) if items else np.zeros(0, dtype="<U1")


def _check_rotation_matrix(frame: _Frame, name: str, r: np.ndarray) -> None:
    if not np.isfinite(r).all():
        frame.fail(name, r, "a finite rotation matrix", _HINT_CALIBRATION)
    error = max(float(np.abs(r.T @ r - np.eye(3)).max()), abs(float(np.linalg.det(r)) - 1.0))
    if error > ROTATION_TOLERANCE:
        raise SourceError(
            frame.path,
            f"{frame.where}: {name} {np.round(r, 6).tolist()} is not a rotation matrix (R^T R - I or det R - 1 "
            f"off by {error:.3g})",
            _HINT_CALIBRATION,
        )


def _check_finite(frame: _Frame, name: str, value: np.ndarray) -> None:
    if not np.isfinite(value).all():
        raise SourceError(
            frame.path, f"{frame.where}: {name} {value.tolist()} is not finite", _HINT_CALIBRATION
        )


def _ego_from_lidar(frame: _Frame) -> np.ndarray:
    """``lidar2ego`` (4x4) or, in older files, ``lidar2ego_rotation`` + ``_translation``; checked."""
    if "lidar2ego" in frame.frame:
        m = frame.numbers("lidar2ego", frame.frame["lidar2ego"], (4, 4), "a 4x4 matrix of numbers")
        _check_finite(frame, "lidar2ego", m)
        _check_rotation_matrix(frame, "lidar2ego[:3, :3]", m[:3, :3])
        if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
            frame.fail("lidar2ego[3]", m[3], "[0, 0, 0, 1]", _HINT_CALIBRATION)
        return m
    q = frame.numbers("lidar2ego_rotation", frame.get("lidar2ego_rotation", name="lidar2ego (or "
                      "lidar2ego_rotation)"), (4,), "a [w, x, y, z] quaternion")  # fmt: skip
    t = frame.numbers("lidar2ego_translation", frame.get("lidar2ego_translation"), (3,), "3 numbers (m)")
    _check_finite(frame, "lidar2ego_translation", t)
    _check_finite(frame, "lidar2ego_rotation", q)
    norm = float(np.sqrt(np.sum(q * q)))
    if norm < MIN_QUATERNION_NORM:
        raise SourceError(
            frame.path,
            f"{frame.where}: lidar2ego_rotation {q.tolist()} is not a rotation (quaternion norm {norm:.3g})",
            _HINT_CALIBRATION,
        )
    return make_transform(q, t)


def _camera(frame: _Frame, channel: str, cam: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(translation (3,), [w, x, y, z] rotation, intrinsic (3, 3), distortion (5,)) of one camera; checked."""
    key = f"cams[{channel!r}]"
    t = frame.numbers(f"{key}['sensor2lidar_translation']", frame.get(
        "sensor2lidar_translation", cam, f"{key}['sensor2lidar_translation']"), (3,), "3 numbers (m)")  # fmt: skip
    r = frame.numbers(f"{key}['sensor2lidar_rotation']", frame.get(
        "sensor2lidar_rotation", cam, f"{key}['sensor2lidar_rotation']"), (3, 3), "a 3x3 rotation matrix")  # fmt: skip
    k = frame.numbers(f"{key}['cam_intrinsic']", frame.get(
        "cam_intrinsic", cam, f"{key}['cam_intrinsic']"), (3, 3), "a 3x3 camera matrix")  # fmt: skip
    d = frame.numbers(f"{key}['distortion']", cam.get("distortion", np.zeros(5)), (5,), "5 numbers")
    _check_finite(frame, f"{key}['sensor2lidar_translation']", t)
    _check_rotation_matrix(frame, f"{key}['sensor2lidar_rotation']", r)
    if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise SourceError(
            frame.path,
            f"{frame.where}: {key}['cam_intrinsic'] {k.tolist()} is not a camera matrix (expected finite values "
            "and focal lengths fx = [0][0], fy = [1][1] > 0 pixels)",
            _HINT_CALIBRATION,
        )
    _check_finite(frame, f"{key}['distortion']", d)
    return t, matrix_to_quaternion(r), k, d


def _check_frame(frame: _Frame) -> None:
    """Types of the keys every frame has (the numbers are read, and checked, where they are used)."""
    for key in ("token", "log_name", "log_token", "vehicle_name", "scene_name", "scene_token", "map_location",
                "lidar_path"):  # fmt: skip
        frame.text(key)
    frame.integer("timestamp")
    frame.strings("roadblock_ids", frame.get("roadblock_ids"), "a list of roadblock id strings")
    cams = frame.get("cams")
    if not isinstance(cams, dict) or not all(isinstance(c, dict) for c in cams.values()):
        frame.fail("cams", cams, "a dict of camera channel -> camera dict")
    for channel in CAMERA_CHANNELS:
        if channel in cams and not isinstance(cams[channel].get("data_path", ""), str):
            frame.fail(f"cams[{channel!r}]['data_path']", cams[channel]["data_path"], "a string")
    lights = frame.get("traffic_lights")
    if not isinstance(lights, list | tuple) or not all(
        isinstance(tl, list | tuple | np.ndarray)
        and len(tl) == 2
        and isinstance(tl[0], int | np.integer)
        and isinstance(tl[1], bool | int | np.bool_ | np.integer)
        for tl in lights
    ):
        frame.fail("traffic_lights", lights, "a list of (lane_connector_id, is_red) pairs")
    anns = frame.frame.get("anns")
    if anns is not None and not isinstance(anns, dict):
        frame.fail("anns", anns, "a dict of box arrays (or no anns)")


def _boxes(frame: _Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(gt_boxes (N, 7), gt_velocity_3d (N, 3), gt_names, instance_tokens, track_tokens) of one frame."""
    anns = frame.frame.get("anns") or {}
    names = frame.strings("anns['gt_names']", anns.get("gt_names", []), "a list of category names")
    n = len(names)
    if n == 0:
        empty = np.zeros(0, dtype="<U1")
        return np.zeros((0, 7)), np.zeros((0, 3)), empty, empty, empty
    boxes = frame.numbers("anns['gt_boxes']", frame.get("gt_boxes", anns, "anns['gt_boxes']"), (n, 7),
                          f"{n} boxes of 7 numbers [x, y, z, l, w, h, yaw], one per gt_names entry")  # fmt: skip
    velocity = frame.numbers(
        "anns['gt_velocity_3d']", frame.get("gt_velocity_3d", anns, "anns['gt_velocity_3d']"), (n, 3),
        f"{n} velocities of 3 numbers, one per gt_names entry",
    )  # fmt: skip
    tokens = []
    for key in ("instance_tokens", "track_tokens"):
        values = frame.strings(
            f"anns[{key!r}]", frame.get(key, anns, f"anns[{key!r}]"), "a list of token strings"
        )
        if len(values) != n:
            frame.fail(f"anns[{key!r}]", anns[key], f"{n} tokens, one per gt_names entry")
        tokens.append(values)
    return boxes, velocity, names, tokens[0], tokens[1]


def _category_index(names: np.ndarray, path: Path) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(CATEGORIES)}
    unknown = sorted(set(names.tolist()) - set(lookup))
    if unknown:
        raise SourceError(path, f"unknown box categories {unknown[:5]}; expected {', '.join(CATEGORIES)}")
    return np.array([lookup[n] for n in names.tolist()], dtype=np.int8)


def read_openscene_log(path: str | PathLike[str]) -> LogData:
    """Read one OpenScene v1.1 metadata file into a validated :class:`LogData` (see the module doc).

    Every frame dict is checked: a missing key, a value of the wrong type or shape (a string or None where
    numbers belong, a list where a dict belongs, ...) is one :class:`SourceError` naming the file, the
    frame (index in the file and token), the key, what it holds and what was expected. Calibration is
    checked too (finite values, rotation matrices, a non-zero quaternion, positive focal lengths). Ego poses
    (``can_bus``) are passed through as stored, non-finite ones included (the frame stage drops those
    frames and counts them); their boxes then come out non-finite as well, without numpy warnings.

    Raises:
        UnsafePickleError: the pickle is not plain data (nothing in it was run).
        SourceError: the file is unreadable, empty, or holds malformed frames or calibration.
    """
    path = Path(path)
    raw_frames = load_openscene_pickle(path)
    if not raw_frames:
        raise SourceError(
            path, "holds no frames", "the log has no key frames; remove it or re-create the metadata"
        )
    for i, f in enumerate(raw_frames):
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise SourceError(path, f"frame {i} lacks keys {missing}; is this OpenScene v1.1 metadata?")
    checked = [_Frame(path, i, f) for i, f in enumerate(raw_frames)]
    for frame in checked:
        _check_frame(frame)
    checked.sort(key=lambda c: (int(c.frame["timestamp"]), c.frame["token"]))
    frames = [c.frame for c in checked]
    n = len(frames)
    first = frames[0]
    log_name = first["log_name"]

    can_bus = np.stack(
        [c.numbers("can_bus", c.frame["can_bus"], (18,), "18 numbers (x, y, z, qw, qx, qy, qz, ...)")
         for c in checked]
    )  # fmt: skip
    t_ego, q_ego = can_bus[:, 0:3], can_bus[:, 3:7]
    ego_from_lidar = _ego_from_lidar(checked[0])

    # Scenes in order of appearance.
    scene_tokens: list[str] = []
    scene_index: dict[str, int] = {}
    scene_names: list[str] = []
    roadblocks: list[list[str]] = []
    sweep_scene = np.empty(n, dtype=np.int32)
    for i, f in enumerate(frames):
        tok = f["scene_token"]
        if tok not in scene_index:
            scene_index[tok] = len(scene_tokens)
            scene_tokens.append(tok)
            name = f["scene_name"]
            name = (
                name.removeprefix(f"{log_name}-")
                if name.startswith(f"{log_name}-")
                else _OPENSCENE_SCENE_PREFIX.sub("", name)
            )
            scene_names.append(name)
            roadblocks.append(
                checked[i].strings("roadblock_ids", f["roadblock_ids"], "a list of strings").tolist()
            )
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
        have = [i for i, f in enumerate(frames) if ch in f["cams"]]
        if not have:
            continue
        cam_t[j], cam_q[j], cam_k[j], cam_d[j] = _camera(checked[have[0]], ch, frames[have[0]]["cams"][ch])
        cam_token[j] = hashlib.sha1(f"{first['log_token']}{ch}".encode()).hexdigest()[:16]
        for i in have:
            image_path[i, j] = frames[i]["cams"][ch].get("data_path", "")

    # Boxes: ego frame -> global (non-finite ego poses give non-finite boxes, quietly).
    per_frame = [_boxes(cf) for cf in checked]
    counts = np.array([len(b[2]) for b in per_frame], dtype=np.int64)
    box_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(box_offsets[-1])
    if m:
        boxes = np.concatenate([b[0] for b in per_frame])
        vel_lidar = np.concatenate([b[1] for b in per_frame])
        names = np.concatenate([b[2] for b in per_frame])
        box_tok = np.concatenate([b[3] for b in per_frame])
        track_tok = np.concatenate([b[4] for b in per_frame])
        row = np.repeat(np.arange(n), counts)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
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
        log_token=first["log_token"],
        vehicle_name=first["vehicle_name"],
        location="",
        map_version=first["map_location"],
        lidar_token="",
        ego_from_lidar=ego_from_lidar,
        sweep_token=np.array([f["token"] for f in frames]),
        sweep_timestamp_us=np.array([int(f["timestamp"]) for f in frames], dtype=np.int64),
        sweep_lidar_path=np.array([f["lidar_path"] for f in frames]),
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
        camera_channels=CAMERA_CHANNELS,
        categories=CATEGORIES,
        category_class=np.array(CATEGORY_CLASS, dtype=np.uint8),
    )
    try:
        log.validate()
    except ValueError as exc:
        raise SourceError(path, f"inconsistent metadata ({exc})") from None
    return log
