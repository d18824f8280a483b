"""Reader of nuPlan log databases (``<split>/<log>.db``, SQLite) into :class:`LogData`.

One read-only connection per log and a fixed number of set-based queries (one per table, never one per
frame). Rows are fetched straight into numpy structured arrays; tokens are read as their raw 8-byte BLOBs,
used as big-endian ``uint64`` keys for joining and sorting in numpy (their order is the order of their hex
form) and turned into 16-hex strings in bulk. The database's row order is never relied on: everything
is sorted explicitly.

Spec: ``/work/shared/reference/openscene-nuplan.md`` section 1. Units: timestamps microseconds, metres,
radians, m/s; ego poses and boxes in the global frame, calibration in the ego frame.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import urllib.parse
from os import PathLike
from pathlib import Path

import numpy as np

from driveengine.errors import SourceError
from driveengine.geometry import make_transform
from driveengine.schemas.classes import (
    CAMERA_CHANNELS,
    CATEGORIES,
    LIDAR_CHANNEL,
    TRAFFIC_LIGHT_CODES,
    TRAFFIC_LIGHT_UNKNOWN,
)
from driveengine.sources.logdata import LogData
from driveengine.sources.safe_pickle import load_calibration

#: An image belongs to a sweep when ``|image.timestamp - lidar_pc.timestamp| <= IMAGE_WINDOW_US``.
IMAGE_WINDOW_US = 50_000

_HINT_NOT_A_LOG = "is this a nuPlan log database? expected <nuplan>/splits/<split>/<log>.db"

#: Columns the reader needs, per table.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "log": ("token", "vehicle_name", "logfile", "location", "map_version"),
    "lidar": ("token", "channel", "translation", "rotation"),
    "camera": ("token", "channel", "translation", "rotation", "intrinsic", "distortion", "width", "height"),
    "lidar_pc": ("token", "ego_pose_token", "lidar_token", "scene_token", "filename", "timestamp"),
    "ego_pose": (
        "token", "x", "y", "z", "qw", "qx", "qy", "qz", "vx", "vy", "vz",
        "acceleration_x", "acceleration_y", "acceleration_z",
        "angular_rate_x", "angular_rate_y", "angular_rate_z",
    ),
    "image": ("token", "camera_token", "filename_jpg", "timestamp"),
    "lidar_box": (
        "token", "lidar_pc_token", "track_token", "x", "y", "z", "width", "length", "height",
        "vx", "vy", "vz", "yaw", "confidence",
    ),
    "track": ("token", "category_token"),
    "category": ("token", "name"),
    "scene": ("token", "name", "roadblock_ids"),
    "scenario_tag": ("token", "lidar_pc_token", "type", "agent_track_token"),
    "traffic_light_status": ("token", "lidar_pc_token", "lane_connector_id", "status"),
}  # fmt: skip

_CATEGORY_CASE = " ".join(f"WHEN '{name}' THEN {i}" for i, name in enumerate(CATEGORIES))
_STATUS_CASE = " ".join(f"WHEN '{name}' THEN {code}" for name, code in TRAFFIC_LIGHT_CODES.items())

# Box category codes below 0.
_UNKNOWN_CATEGORY, _NO_CATEGORY_ROW, _NO_TRACK_ROW = -1, -2, -3

_SQL_SWEEPS = """
SELECT lp.token, ifnull(lp.scene_token, x''), lp.timestamp, ifnull(lp.filename, ''), ep.token IS NOT NULL,
       ep.x, ep.y, ep.z, ep.qw, ep.qx, ep.qy, ep.qz, ep.vx, ep.vy, ep.vz,
       ep.acceleration_x, ep.acceleration_y, ep.acceleration_z,
       ep.angular_rate_x, ep.angular_rate_y, ep.angular_rate_z
FROM lidar_pc AS lp LEFT JOIN ego_pose AS ep ON ep.token = lp.ego_pose_token
WHERE lp.lidar_token = ?
"""
_SWEEP_DTYPE = np.dtype(
    [("token", "S8"), ("scene", "S8"), ("timestamp", "i8"), ("filename", "O"), ("has_pose", "?")]
    + [(c, "f8") for c in REQUIRED_COLUMNS["ego_pose"][1:]]
)

# lidar_box is joined with track and category in numpy (uint64 keys): an SQL join costs one B-tree lookup
# per box and doubled the time of the largest query (see benchmarks/bench_reader.py).
_SQL_BOXES = """
SELECT b.token, ifnull(b.lidar_pc_token, x''), ifnull(b.track_token, x''),
       b.x, b.y, b.z, b.length, b.width, b.height, b.yaw, b.vx, b.vy, b.vz, b.confidence
FROM lidar_box AS b
"""
_BOX_DTYPE = np.dtype(
    [("token", "S8"), ("sweep", "S8"), ("track", "S8")]
    + [(c, "f8") for c in ("x", "y", "z", "length", "width", "height", "yaw", "vx", "vy", "vz", "confidence")]
)

_SQL_TRACKS = "SELECT token, ifnull(category_token, x'') FROM track"
_TRACK_DTYPE = np.dtype([("token", "S8"), ("category", "S8")])

_SQL_CATEGORIES = f"SELECT token, CASE name {_CATEGORY_CASE} ELSE {_UNKNOWN_CATEGORY} END, name FROM category"
_CATEGORY_DTYPE = np.dtype([("token", "S8"), ("code", "i1"), ("name", "O")])

_SQL_SCENES = "SELECT token, ifnull(name, ''), ifnull(roadblock_ids, '') FROM scene"
_SCENE_DTYPE = np.dtype([("token", "S8"), ("name", "O"), ("roadblock_ids", "O")])

_SQL_IMAGES = "SELECT token, ifnull(camera_token, x''), timestamp, ifnull(filename_jpg, '') FROM image"
_IMAGE_DTYPE = np.dtype([("token", "S8"), ("camera", "S8"), ("timestamp", "i8"), ("filename", "O")])

_SQL_LIGHTS = f"""
SELECT token, ifnull(lidar_pc_token, x''), lane_connector_id,
       CASE lower(status) {_STATUS_CASE} ELSE {TRAFFIC_LIGHT_UNKNOWN} END
FROM traffic_light_status
"""
_LIGHT_DTYPE = np.dtype([("token", "S8"), ("sweep", "S8"), ("lane", "i8"), ("status", "i1")])

_SQL_TAGS = (
    "SELECT token, ifnull(lidar_pc_token, x''), ifnull(type, ''), ifnull(agent_track_token, x'') "
    "FROM scenario_tag"
)
_TAG_DTYPE = np.dtype([("token", "S8"), ("sweep", "S8"), ("type", "O"), ("agent", "S8")])

#: byte -> its two lowercase hex digits as two UCS-4 code points packed in one native uint64
_HEX_PAIRS = np.array([[ord(c) for c in f"{b:02x}"] for b in range(256)], dtype="=u4").view("=u8").reshape(-1)


def read_nuplan_log(db_path: str | PathLike[str]) -> LogData:
    """Read one nuPlan log database into a validated :class:`LogData`.

    Sweeps are the ``lidar_pc`` rows of the ``MergedPointCloud`` lidar, sorted by their own timestamp
    (then token); each carries the ego pose it links to (global frame, rear axle), its boxes (global
    frame, size as length/width/height), traffic lights and scenario tags, and for each camera of
    :data:`CAMERA_CHANNELS` the closest image within +-50 ms (ties: earlier timestamp, then smaller
    token).

    Args:
        db_path: path of ``<log>.db``; opened read-only.

    Raises:
        SourceError: the file is missing, not SQLite, not a nuPlan log (missing table or column), holds
            no sweeps or no merged lidar, or has corrupt calibration; :class:`UnsafePickleError` (a
            subclass) when a calibration pickle asks for anything but lists, numbers and numpy arrays.
    """
    path = Path(db_path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SourceError(path, f"{what}, expected a nuPlan log database", "check the path and the split")
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise SourceError(path, f"cannot open it read-only with SQLite ({exc})", _HINT_NOT_A_LOG) from exc
    try:
        return _read(connection, path)
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise SourceError(path, f"SQLite cannot read it ({exc})", _HINT_NOT_A_LOG) from exc
    finally:
        connection.close()


def _read(con: sqlite3.Connection, path: Path) -> LogData:
    _check_schema(con, path)
    notes: list[str] = []

    # -- log -----------------------------------------------------------------------------------
    logs = con.execute("SELECT token, vehicle_name, logfile, location, map_version FROM log").fetchall()
    if len(logs) != 1:
        raise SourceError(path, f"table log has {len(logs)} rows, expected exactly 1", _HINT_NOT_A_LOG)
    log_token, vehicle, logfile, location, map_version = logs[0]

    # -- merged lidar --------------------------------------------------------------------------
    lidars = con.execute(
        "SELECT token, translation, rotation FROM lidar WHERE channel = ? ORDER BY token", (LIDAR_CHANNEL,)
    ).fetchall()
    if not lidars:
        raise SourceError(path, f"no {LIDAR_CHANNEL} lidar in table lidar: the log is empty", _HINT_NOT_A_LOG)
    if len(lidars) > 1:
        notes.append(f"{len(lidars)} {LIDAR_CHANNEL} lidars; using the first by token")
    lidar_token, lidar_translation, lidar_rotation = lidars[0]
    _check_token(lidar_token, path, "lidar.token")
    where = f"column lidar.%s of channel {LIDAR_CHANNEL}"
    ego_from_lidar = make_transform(
        load_calibration(lidar_rotation, (4,), path, where % "rotation"),
        load_calibration(lidar_translation, (3,), path, where % "translation"),
    )

    # -- sweeps with their ego poses --------------------------------------------------------------
    sweeps = _fetch(con, _SQL_SWEEPS, _SWEEP_DTYPE, path, "lidar_pc", (lidar_token,))
    if sweeps.size == 0:
        raise SourceError(
            path, f"no lidar_pc rows of the {LIDAR_CHANNEL} lidar: the log is empty", "skip this log"
        )
    if not sweeps["has_pose"].all():
        missing = int((~sweeps["has_pose"]).sum())
        notes.append(f"skipped {missing} lidar_pc rows whose ego_pose_token matches no ego_pose")
        sweeps = sweeps[sweeps["has_pose"]]
        if sweeps.size == 0:
            raise SourceError(path, "no lidar_pc row has an ego pose", "the log is incomplete; skip it")
    sweep_key = _keys(sweeps["token"])
    sweeps = sweeps[np.lexsort((sweep_key, sweeps["timestamp"]))]
    sweep_key = _keys(sweeps["token"])
    n = sweeps.size
    sweep_of = _KeyIndex(sweep_key)

    # -- scenes, in the order of their first sweep (then token) ---------------------------------------
    scenes = _fetch(con, _SQL_SCENES, _SCENE_DTYPE, path, "scene")
    scene_key = _keys(scenes["token"])
    sweep_scene = _KeyIndex(scene_key).lookup(_keys(sweeps["scene"]))
    first_sweep = np.full(scenes.size, n, dtype=np.int64)
    np.minimum.at(first_sweep, sweep_scene[sweep_scene >= 0], np.flatnonzero(sweep_scene >= 0))
    scene_order = np.lexsort((scene_key, first_sweep))
    rank = np.empty(scenes.size + 1, dtype=np.int32)
    rank[scene_order] = np.arange(scenes.size, dtype=np.int32)
    rank[-1] = -1  # sweep_scene == -1: the sweep names no (known) scene
    sweep_scene = rank[sweep_scene]
    scenes, scene_key = scenes[scene_order], scene_key[scene_order]
    roadblocks = [[s for s in re.split(r"[\s,]+", text) if s] for text in scenes["roadblock_ids"].tolist()]

    # -- cameras and images --------------------------------------------------------------------------
    cameras = _read_cameras(con, path, notes)
    image_path, image_ts = _match_images(
        _fetch(con, _SQL_IMAGES, _IMAGE_DTYPE, path, "image"), cameras[0], sweeps["timestamp"]
    )

    # -- boxes -----------------------------------------------------------------------------------------
    boxes = _fetch(con, _SQL_BOXES, _BOX_DTYPE, path, "lidar_box")
    box_order, box_offsets = _ragged(boxes, sweep_of.lookup(_keys(boxes["sweep"])), n, "lidar_box", notes)
    box_track = _keys(boxes["track"])[box_order]
    # x, y, z, length, width, height, yaw, vx, vy, vz, confidence: one row gather of a float64 view
    box_numbers = _float_block(boxes, "x", 11)[box_order]
    box_category = _box_categories(
        box_track,
        _fetch(con, _SQL_TRACKS, _TRACK_DTYPE, path, "track"),
        _fetch(con, _SQL_CATEGORIES, _CATEGORY_DTYPE, path, "category"),
        path,
    )

    # -- traffic lights and scenario tags ------------------------------------------------------------
    lights = _fetch(con, _SQL_LIGHTS, _LIGHT_DTYPE, path, "traffic_light_status")
    order, light_offsets = _ragged(
        lights, sweep_of.lookup(_keys(lights["sweep"])), n, "traffic_light_status", notes, lights["lane"]
    )
    lights = lights[order]
    tags = _fetch(con, _SQL_TAGS, _TAG_DTYPE, path, "scenario_tag")
    order, tag_offsets = _ragged(tags, sweep_of.lookup(_keys(tags["sweep"])), n, "scenario_tag", notes)
    tags = tags[order]
    tag_agent = _hex(_keys(tags["agent"]))
    tag_agent[tags["agent"] == b""] = ""

    data = LogData(
        source="nuplan",
        path=str(path),
        log_name=logfile or "",
        log_token=bytes(log_token).hex(),
        vehicle_name=vehicle or "",
        location=location or "",
        map_version=map_version or "",
        lidar_token=bytes(lidar_token).hex(),
        ego_from_lidar=ego_from_lidar,
        sweep_token=_hex(sweep_key),
        sweep_timestamp_us=sweeps["timestamp"].copy(),
        sweep_lidar_path=sweeps["filename"].astype(np.str_),
        sweep_scene=sweep_scene,
        ego_translation=_columns(sweeps, "x", "y", "z"),
        ego_rotation=_columns(sweeps, "qw", "qx", "qy", "qz"),
        ego_velocity=_columns(sweeps, "vx", "vy", "vz"),
        ego_acceleration=_columns(sweeps, "acceleration_x", "acceleration_y", "acceleration_z"),
        ego_angular_rate=_columns(sweeps, "angular_rate_x", "angular_rate_y", "angular_rate_z"),
        camera_token=cameras[1],
        camera_translation=cameras[2],
        camera_rotation=cameras[3],
        camera_intrinsic=cameras[4],
        camera_distortion=cameras[5],
        camera_size=cameras[6],
        image_path=image_path,
        image_timestamp_us=image_ts,
        box_offsets=box_offsets,
        box_token=_hex(_keys(boxes["token"])[box_order]),
        box_track_token=_hex(box_track),
        box_category=box_category,
        box_center=np.ascontiguousarray(box_numbers[:, 0:3]),
        box_size=np.ascontiguousarray(box_numbers[:, 3:6]),
        box_yaw=np.ascontiguousarray(box_numbers[:, 6]),
        box_velocity=np.ascontiguousarray(box_numbers[:, 7:10]),
        box_confidence=np.ascontiguousarray(box_numbers[:, 10]),
        scene_token=_hex(scene_key),
        scene_name=scenes["name"].astype(np.str_) if scenes.size else np.zeros(0, dtype="<U1"),
        scene_roadblock_ids=roadblocks,
        traffic_light_offsets=light_offsets,
        traffic_light_lane_connector_id=lights["lane"].copy(),
        traffic_light_status=lights["status"].copy(),
        tag_offsets=tag_offsets,
        tag_type=tags["type"].astype(np.str_) if tags.size else np.zeros(0, dtype="<U1"),
        tag_agent_track_token=tag_agent,
        notes=notes,
    )
    data.validate()
    return data


# -- schema and fetching ------------------------------------------------------------------------------


def _check_schema(con: sqlite3.Connection, path: Path) -> None:
    """Raise a :class:`SourceError` naming the first missing table or column (one query)."""
    rows = con.execute(
        "SELECT m.name, p.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS p "
        "WHERE m.type IN ('table', 'view')"
    ).fetchall()
    present: dict[str, set[str]] = {}
    for table, column in rows:
        present.setdefault(table, set()).add(column)
    for table, columns in REQUIRED_COLUMNS.items():
        if table not in present:
            raise SourceError(path, f"no such table {table}", _HINT_NOT_A_LOG)
        missing = [c for c in columns if c not in present[table]]
        if missing:
            raise SourceError(
                path,
                f"table {table} lacks column(s) {', '.join(missing)}",
                f"not a nuPlan schema; {_HINT_NOT_A_LOG}",
            )


def _fetch(
    con: sqlite3.Connection, sql: str, dtype: np.dtype, path: Path, table: str, params: tuple = ()
) -> np.ndarray:
    """All rows of ``sql`` as a structured array of ``dtype``: one query, rows streamed from the cursor
    into numpy (``np.fromiter``; faster than ``fetchall`` since no list of tuples is kept)."""
    cursor = con.execute(sql, params)
    first = cursor.fetchone()
    if first is None:
        return np.zeros(0, dtype=dtype)
    for i, name in enumerate(dtype.names):
        if dtype[name].kind == "S":
            _check_token(first[i], path, f"{table} column {i + 1}")
    try:
        return np.fromiter(itertools.chain((first,), cursor), dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SourceError(
            path, f"table {table} holds values of unexpected types or NULLs ({exc})", "the log may be corrupt"
        ) from exc


def _check_token(value: object, path: Path, what: str) -> None:
    """Tokens are 8-byte BLOBs (an empty BLOB stands for NULL in the queries above)."""
    if not isinstance(value, bytes) or len(value) not in (0, 8):
        raise SourceError(
            path,
            f"{what} holds {type(value).__name__} {value!r:.40}, expected an 8-byte token BLOB",
            _HINT_NOT_A_LOG,
        )


def _keys(tokens: np.ndarray) -> np.ndarray:
    """``S8`` tokens as big-endian uint64 keys (same order as their hex form; empty -> 0)."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.dtype("S8"):
        tokens = tokens.astype("S8")
    return tokens.view(">u8").astype(np.uint64)  # a field of a structured array: one strided pass


def _hex(keys: np.ndarray) -> np.ndarray:
    """uint64 keys as 16-character lowercase hex strings: one table look-up per byte, written straight
    into the ``U16`` code points (no intermediate ``bytes`` or per-string work)."""
    raw = np.ascontiguousarray(keys, dtype=">u8").view(np.uint8).reshape(-1, 8)
    return _HEX_PAIRS[raw].view("U16").reshape(-1)


def _columns(rows: np.ndarray, *names: str) -> np.ndarray:
    """(len(rows), len(names)) float64 array of the named fields."""
    out = np.empty((rows.size, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        out[:, j] = rows[name]
    return out


def _float_block(rows: np.ndarray, first: str, count: int) -> np.ndarray:
    """(len(rows), count) float64 view of ``count`` consecutive float64 fields of ``rows`` from ``first``."""
    offset = rows.dtype.fields[first][1]
    names = rows.dtype.names[rows.dtype.names.index(first) :][:count]
    assert len(names) == count and all(
        rows.dtype.fields[name][0] == np.float64 and rows.dtype.fields[name][1] == offset + 8 * i
        for i, name in enumerate(names)
    ), f"fields from {first} are not {count} packed float64"
    if rows.size == 0:
        return np.zeros((0, count), dtype=np.float64)
    rows = np.ascontiguousarray(rows)
    return np.ndarray(
        (rows.size, count), np.float64, buffer=rows, offset=offset, strides=(rows.dtype.itemsize, 8)
    )


class _KeyIndex:
    """Maps uint64 keys to their position in a key array (unique keys); unknown keys to -1."""

    def __init__(self, keys: np.ndarray) -> None:
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        if self._sorted.size == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted, keys)
        pos_clipped = np.minimum(pos, self._sorted.size - 1)
        found = self._sorted[pos_clipped] == keys
        return np.where(found, self._order[pos_clipped], -1).astype(np.int64)


def _ragged(
    rows: np.ndarray,
    sweep: np.ndarray,
    n: int,
    table: str,
    notes: list[str],
    secondary: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Order of ``rows`` grouped by sweep index (then ``secondary``, then token) and ``(n + 1,)`` offsets.

    Rows whose sweep is unknown (-1: another lidar, or a dangling token) are left out with a note.
    """
    keep = sweep >= 0
    rows_index = np.arange(rows.size)
    if not keep.all():
        notes.append(f"skipped {int((~keep).sum())} {table} rows whose lidar_pc_token matches no sweep")
        rows_index, sweep = rows_index[keep], sweep[keep]
        secondary = None if secondary is None else secondary[keep]
    token = _keys(rows["token"][rows_index])
    if secondary is None:
        # two passes beat np.lexsort: tokens, then a stable (radix for uint16) sort by sweep
        by_token = np.argsort(token)
        sweep_by_token = sweep[by_token].astype(np.uint16 if n <= np.iinfo(np.uint16).max else np.int64)
        order = by_token[np.argsort(sweep_by_token, kind="stable")]
    else:
        order = np.lexsort((token, secondary, sweep))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(sweep, minlength=n), out=offsets[1:])
    return rows_index[order], offsets


def _box_categories(
    box_track: np.ndarray, tracks: np.ndarray, categories: np.ndarray, path: Path
) -> np.ndarray:
    """(M,) int8 index into :data:`CATEGORIES` of each box (``box_track``: uint64 track keys), through
    ``track.category_token``.

    Raises a :class:`SourceError` for a box whose track or category row is missing or whose category name
    is not one of :data:`CATEGORIES`.
    """
    category_index = _KeyIndex(_keys(categories["token"])).lookup(_keys(tracks["category"]))
    category_code = np.append(categories["code"], np.int8(_NO_CATEGORY_ROW))  # index -1: no category row
    track_code = np.append(category_code[category_index], np.int8(_NO_TRACK_ROW))  # index -1: no track row
    codes = track_code[_KeyIndex(_keys(tracks["token"])).lookup(box_track)].astype(np.int8)
    bad = codes < 0
    if not bad.any():
        return codes
    kinds = set(np.unique(codes[bad]).tolist())
    if _UNKNOWN_CATEGORY in kinds:
        names = sorted(
            {str(name) for name, code in zip(categories["name"], categories["code"], strict=True) if code < 0}
        )
        raise SourceError(
            path,
            f"unknown box category {', '.join(map(repr, names))}; known: {', '.join(CATEGORIES)}",
            "add it to schemas/classes.py CATEGORIES (and CATEGORY_TO_CLASS) if it is a real nuPlan category",
        )
    what = (
        "track_token matches no track"
        if _NO_TRACK_ROW in kinds
        else "track's category_token matches no category"
    )
    raise SourceError(path, f"{int(bad.sum())} lidar_box rows whose {what}", "the log is corrupt; skip it")


# -- cameras and image matching -----------------------------------------------------------------------


def _read_cameras(
    con: sqlite3.Connection, path: Path, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cameras in :data:`CAMERA_CHANNELS` order: (uint64 keys (0 = absent), hex tokens, translation,
    rotation, intrinsic, distortion, size); an absent channel has an empty token and NaN calibration."""
    c = len(CAMERA_CHANNELS)
    keys = np.zeros(c, dtype=np.uint64)
    token = np.full(c, "", dtype="<U16")
    translation = np.full((c, 3), np.nan)
    rotation = np.full((c, 4), np.nan)
    intrinsic = np.full((c, 3, 3), np.nan)
    distortion = np.full((c, 5), np.nan)
    size = np.zeros((c, 2), dtype=np.int32)
    rows = con.execute(
        "SELECT token, channel, translation, rotation, intrinsic, distortion, width, height FROM camera "
        "ORDER BY token"
    ).fetchall()
    for row in rows:  # at most a handful of rows
        cam_token, channel, *blobs, width, height = row
        if channel not in CAMERA_CHANNELS:
            notes.append(f"ignored camera channel {channel!r}")
            continue
        i = CAMERA_CHANNELS.index(channel)
        if token[i]:
            notes.append(f"{channel} appears twice in table camera; using the first by token")
            continue
        _check_token(cam_token, path, f"camera.token of channel {channel}")
        where = f"column camera.%s of channel {channel}"
        translation[i] = load_calibration(blobs[0], (3,), path, where % "translation")
        rotation[i] = load_calibration(blobs[1], (4,), path, where % "rotation")
        intrinsic[i] = load_calibration(blobs[2], (3, 3), path, where % "intrinsic")
        distortion[i] = load_calibration(blobs[3], (5,), path, where % "distortion")
        keys[i] = _keys(np.array([cam_token], dtype="S8"))[0]
        token[i] = bytes(cam_token).hex()
        size[i] = (width or 0, height or 0)
    return keys, token, translation, rotation, intrinsic, distortion, size


def match_images(
    sweep_timestamp_us: np.ndarray, image_timestamp_us: np.ndarray, image_token: np.ndarray
) -> np.ndarray:
    """Index of the image of one camera closest in time to each sweep, or -1 if none within the window.

    An image matches a sweep when ``|image - sweep| <= IMAGE_WINDOW_US`` (inclusive). The closest image
    wins; at equal distance the earlier timestamp wins, then the smaller token. Vectorised with
    ``np.searchsorted``.

    Args:
        sweep_timestamp_us: (N,) int64 sweep timestamps, microseconds (any order).
        image_timestamp_us: (K,) int64 image timestamps of one camera, microseconds (any order).
        image_token: (K,) sortable tokens (uint64 keys or hex strings) breaking timestamp ties.

    Returns:
        (N,) int64 indices into the image arrays, -1 where no image lies in the window.
    """
    sweeps = np.asarray(sweep_timestamp_us, dtype=np.int64)
    if len(image_timestamp_us) == 0:
        return np.full(sweeps.shape, -1, dtype=np.int64)
    order = np.lexsort((image_token, image_timestamp_us))
    ts = np.asarray(image_timestamp_us, dtype=np.int64)[order]
    k = ts.size
    right = np.searchsorted(ts, sweeps, side="left")  # first image at or after the sweep
    # the first image (smallest token) among those sharing the timestamp just before the sweep
    left = np.searchsorted(ts, ts[np.maximum(right - 1, 0)], side="left")
    right_c = np.minimum(right, k - 1)
    d_left = np.where(right > 0, sweeps - ts[left], np.iinfo(np.int64).max)
    d_right = np.where(right < k, ts[right_c] - sweeps, np.iinfo(np.int64).max)
    take_right = d_right < d_left
    best = np.where(take_right, right_c, left)
    best_d = np.where(take_right, d_right, d_left)
    return np.where(best_d <= IMAGE_WINDOW_US, order[best], -1).astype(np.int64)


def _match_images(
    images: np.ndarray, camera_keys: np.ndarray, sweep_ts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) relative image paths ("" if none) and timestamps (-1 if none) matched to the sweeps."""
    n, c = sweep_ts.size, len(CAMERA_CHANNELS)
    paths = np.full((n, c), "", dtype=object)
    stamps = np.full((n, c), -1, dtype=np.int64)
    image_camera = _keys(images["camera"])
    image_key = _keys(images["token"])
    for i in range(c):  # per channel, vectorised over sweeps and images
        if camera_keys[i] == 0:
            continue
        mine = np.flatnonzero(image_camera == camera_keys[i])
        best = match_images(sweep_ts, images["timestamp"][mine], image_key[mine])
        hit = best >= 0
        chosen = mine[best[hit]]
        paths[hit, i] = images["filename"][chosen]
        stamps[hit, i] = images["timestamp"][chosen]
    return paths.astype(np.str_), stamps
