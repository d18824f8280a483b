"""Reader of nuPlan log databases (``<split>/<log>.db``, SQLite) into :class:`LogData`.

One read-only connection per log and a fixed number of set-based queries (one per table, never one per
frame). Rows are fetched straight into numpy structured arrays. Tokens are BLOBs: real nuPlan's are 8
bytes, read as big-endian ``uint64`` keys for joining and sorting in numpy (their order is the order of
their hex form) and turned into 16-hex strings in bulk. nuPlan-schema databases written by other tools
use other lengths (4, 16, ...): every query also returns its tokens' lengths, and when any is not 8 (or 0,
an empty BLOB standing for NULL) the log is read again on a general path that maps the distinct tokens to
integer keys in hex order and hex-encodes them as they are. The database's row order is never relied on:
everything is sorted explicitly.

Hostile files: only real tables are accepted for the tables read (a view may be a recursive query that
never ends), and every query runs under a progress budget proportional to the file's size
(:data:`PROGRESS_STEPS_PER_BYTE`), so no database can hang the reader.

Spec: ``/work/shared/reference/openscene-nuplan.md`` section 1. Units: timestamps microseconds, metres,
radians, m/s; ego poses and boxes in the global frame, calibration in the ego frame.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import urllib.parse
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from driveengine.errors import SourceError
from driveengine.geometry import MIN_QUATERNION_NORM, make_transform
from driveengine.sources.logdata import LogData
from driveengine.sources.nuplan.constants import (
    CAMERA_CHANNELS,
    CATEGORIES,
    CATEGORY_CLASS,
    LIDAR_CHANNEL,
    TRAFFIC_LIGHT_CODES,
    TRAFFIC_LIGHT_UNKNOWN,
)
from driveengine.sources.safe_pickle import load_calibration

#: An image belongs to a sweep when ``|image.timestamp - lidar_pc.timestamp| <= IMAGE_WINDOW_US``.
IMAGE_WINDOW_US = 50_000

#: Progress budget of the whole read: SQLite virtual-machine steps per byte of the database file (a full
#: read of a nuPlan log takes 0.15-0.2 per byte, both token paths together under 0.4), with a floor for
#: tiny files (200M steps: a few seconds).
PROGRESS_STEPS_PER_BYTE = 20
PROGRESS_STEPS_FLOOR = 200_000_000
#: SQLite calls the progress handler every this many steps.
_PROGRESS_PERIOD = 10_000

_HINT_NOT_A_LOG = "is this a nuPlan log database? expected <nuplan>/splits/<split>/<log>.db"
_HINT_CALIBRATION = "the log's calibration is corrupt: fix it in the database or leave this log out"

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

#: nuPlan's token length in bytes: the fast path.
_NUPLAN_TOKEN_BYTES = 8
#: The field type of a token column (``S8`` on the fast path, Python bytes on the general one).
_TOKEN = "token"


#: An SQL expression that aborts the query (SQLite has no raise() outside triggers): "integer overflow".
_SQL_ABORT = "abs(-9223372036854775807 - 1)"
_SQL_ABORT_MESSAGE = "integer overflow"


@dataclass(frozen=True)
class _Token:
    """A token column of a query: its SQL and whether it references another row (NULL allowed)."""

    column: str
    reference: bool = False

    def sql(self, general: bool) -> str:
        """The column on the general path; on the fast path a check that aborts the query unless the BLOB
        is 8 bytes (or empty/NULL for a reference): cheaper than returning lengths (bench_reader)."""
        c, n = self.column, _NUPLAN_TOKEN_BYTES
        if general:
            return f"ifnull({c}, x'')" if self.reference else c
        if self.reference:
            return f"CASE WHEN length({c}) = {n} THEN {c} WHEN ifnull(length({c}), 0) = 0 THEN x'' ELSE {_SQL_ABORT} END"
        return f"CASE WHEN length({c}) = {n} THEN {c} ELSE {_SQL_ABORT} END"


@dataclass(frozen=True)
class _Query:
    """One set-based query: its SQL with a ``{tN}`` slot per token column, and the numpy fields of its rows
    (token fields typed :data:`_TOKEN`, in the order of the slots)."""

    table: str
    sql: str
    fields: tuple[tuple[str, str], ...]
    tokens: tuple[_Token, ...]

    def statement(self, general: bool) -> str:
        return self.sql.format(**{f"t{i}": token.sql(general) for i, token in enumerate(self.tokens)})

    def dtype(self, general: bool) -> np.dtype:
        token_type = "O" if general else f"S{_NUPLAN_TOKEN_BYTES}"
        return np.dtype([(name, token_type if kind == _TOKEN else kind) for name, kind in self.fields])

    def token_fields(self) -> list[str]:
        return [name for name, kind in self.fields if kind == _TOKEN]


_POSE_COLUMNS = REQUIRED_COLUMNS["ego_pose"][1:]

_SWEEPS = _Query(
    "lidar_pc",
    """
SELECT {t0}, {t1}, lp.timestamp, ifnull(lp.filename, ''), ep.token IS NOT NULL,
       ep.x, ep.y, ep.z, ep.qw, ep.qx, ep.qy, ep.qz, ep.vx, ep.vy, ep.vz,
       ep.acceleration_x, ep.acceleration_y, ep.acceleration_z,
       ep.angular_rate_x, ep.angular_rate_y, ep.angular_rate_z
FROM lidar_pc AS lp LEFT JOIN ego_pose AS ep ON ep.token = lp.ego_pose_token
WHERE lp.lidar_token = ?
""",
    (
        ("token", _TOKEN),
        ("scene", _TOKEN),
        ("timestamp", "i8"),
        ("filename", "O"),
        ("has_pose", "?"),
        *((c, "f8") for c in _POSE_COLUMNS),
    ),
    (_Token("lp.token"), _Token("lp.scene_token", reference=True)),
)

_BOX_NUMBERS = ("x", "y", "z", "length", "width", "height", "yaw", "vx", "vy", "vz", "confidence")

# lidar_box is joined with track and category in numpy (uint64 keys): an SQL join costs one B-tree lookup
# per box and doubled the time of the largest query (see benchmarks/bench_reader.py).
_BOXES = _Query(
    "lidar_box",
    """
SELECT {t0}, {t1}, {t2}, b.x, b.y, b.z, b.length, b.width, b.height, b.yaw, b.vx, b.vy, b.vz, b.confidence
FROM lidar_box AS b
""",
    (("token", _TOKEN), ("sweep", _TOKEN), ("track", _TOKEN), *((c, "f8") for c in _BOX_NUMBERS)),
    (_Token("b.token"), _Token("b.lidar_pc_token", reference=True), _Token("b.track_token", reference=True)),
)

_TRACKS = _Query(
    "track",
    "SELECT {t0}, {t1} FROM track",
    (("token", _TOKEN), ("category", _TOKEN)),
    (_Token("token"), _Token("category_token", reference=True)),
)

_CATEGORIES = _Query(
    "category",
    f"SELECT {{t0}}, CASE name {_CATEGORY_CASE} ELSE {_UNKNOWN_CATEGORY} END, name FROM category",
    (("token", _TOKEN), ("code", "i1"), ("name", "O")),
    (_Token("token"),),
)

_SCENES = _Query(
    "scene",
    "SELECT {t0}, ifnull(name, ''), ifnull(roadblock_ids, '') FROM scene",
    (("token", _TOKEN), ("name", "O"), ("roadblock_ids", "O")),
    (_Token("token"),),
)

_IMAGES = _Query(
    "image",
    "SELECT {t0}, {t1}, timestamp, ifnull(filename_jpg, '') FROM image",
    (("token", _TOKEN), ("camera", _TOKEN), ("timestamp", "i8"), ("filename", "O")),
    (_Token("token"), _Token("camera_token", reference=True)),
)

_LIGHTS = _Query(
    "traffic_light_status",
    f"""
SELECT {{t0}}, {{t1}}, lane_connector_id, CASE lower(status) {_STATUS_CASE} ELSE {TRAFFIC_LIGHT_UNKNOWN} END
FROM traffic_light_status
""",
    (("token", _TOKEN), ("sweep", _TOKEN), ("lane", "i8"), ("status", "i1")),
    (_Token("token"), _Token("lidar_pc_token", reference=True)),
)

_TAGS = _Query(
    "scenario_tag",
    "SELECT {t0}, {t1}, ifnull(type, ''), {t2} FROM scenario_tag",
    (("token", _TOKEN), ("sweep", _TOKEN), ("type", "O"), ("agent", _TOKEN)),
    (_Token("token"), _Token("lidar_pc_token", reference=True), _Token("agent_track_token", reference=True)),
)

#: byte -> its two lowercase hex digits as two UCS-4 code points packed in one native uint64
_HEX_PAIRS = np.array([[ord(c) for c in f"{b:02x}"] for b in range(256)], dtype="=u4").view("=u8").reshape(-1)


class _OtherTokenLength(Exception):
    """Raised on the fast path when a token is not 8 bytes long: the log is read again, generally."""


def read_nuplan_log(db_path: str | PathLike[str]) -> LogData:
    """Read one nuPlan log database into a validated :class:`LogData`.

    Sweeps are the ``lidar_pc`` rows of the ``MergedPointCloud`` lidar, sorted by their own timestamp
    (then token); each carries the ego pose it links to (global frame, rear axle), its boxes (global
    frame, size as length/width/height), traffic lights and scenario tags, and for each camera of
    :data:`CAMERA_CHANNELS` the closest image within +-50 ms (ties: earlier timestamp, then smaller
    token).

    Ego poses are passed through as stored: a NULL column reads as NaN, an infinite one as inf, a zero
    quaternion as zeros (the frame stage drops such frames and counts them). Calibration is checked: the
    lidar's and every present camera's translation must be finite, its quaternion finite and non-zero,
    the intrinsic finite with positive focal lengths. A camera channel the log lacks has an empty token
    and NaN calibration (see :class:`LogData`).

    Args:
        db_path: path of ``<log>.db``; opened read-only.

    Raises:
        SourceError: the file is missing, not SQLite, not a nuPlan log (missing table or column, a view
            where a table belongs), holds no sweeps, no merged lidar or no nuPlan camera, has corrupt
            calibration (the message names the table, token and value), or a query exceeds the progress
            budget; :class:`UnsafePickleError` (a subclass) when a calibration pickle asks for anything
            but lists, numbers and numpy arrays.
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
    budget = _ProgressBudget(path)
    connection.set_progress_handler(budget, _PROGRESS_PERIOD)
    try:
        try:
            return _read(connection, path, general=False)
        except _OtherTokenLength:
            return _read(connection, path, general=True)
    except sqlite3.OperationalError as exc:
        if str(exc) == "interrupted" and not budget.exceeded:
            # Only the progress handler interrupts queries, and it stops them on its own only past the
            # budget: here it raised instead, i.e. a Ctrl-C (KeyboardInterrupt) arrived while it ran, which
            # SQLite swallows. Stop the caller as the user asked, instead of failing the log.
            raise KeyboardInterrupt from None
        if budget.exceeded:
            raise SourceError(
                path,
                f"a query did not finish within {budget.limit} SQLite steps ({PROGRESS_STEPS_PER_BYTE} per "
                "byte of the file; reading a nuPlan log takes under 1): the database is corrupt or hostile",
                _HINT_NOT_A_LOG,
            ) from None
        raise SourceError(path, f"SQLite cannot read it ({exc})", _HINT_NOT_A_LOG) from exc
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise SourceError(path, f"SQLite cannot read it ({exc})", _HINT_NOT_A_LOG) from exc
    finally:
        connection.close()


class _ProgressBudget:
    """SQLite progress handler: aborts the running query once the steps exceed a budget relative to the
    file's size (the whole read shares it)."""

    def __init__(self, path: Path) -> None:
        self.limit = max(PROGRESS_STEPS_FLOOR, PROGRESS_STEPS_PER_BYTE * path.stat().st_size)
        self.steps = 0
        self.exceeded = False

    def __call__(self) -> int:
        self.steps += _PROGRESS_PERIOD
        self.exceeded = self.steps > self.limit
        return int(self.exceeded)


class _Tokens:
    """Token BLOBs as sortable ``uint64`` keys (0 for an empty BLOB, NULL) and back as hex strings.

    Fast path (``general=False``): 8-byte tokens viewed as big-endian integers. General path
    (:meth:`rekey`): every token of the log is encoded as a fixed-width, order-preserving byte string
    (zero-padded to the longest token, then its length, big-endian, and a final 1 so that no encoding ends
    in a zero byte), the encodings are ranked by one ``np.unique`` and each token field is replaced by its
    keys (rank + 1, so keys sort like the hex form, shorter prefixes first).
    """

    def __init__(self, general: bool) -> None:
        self.general = general
        self._hex = np.zeros(1, dtype="<U1")

    def rekey(
        self, tables: list[tuple[np.ndarray, list[str]]], extra: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """General path: ``tables`` with their token fields (Python bytes) replaced by uint64 keys, and the
        keys of ``extra`` (more tokens, e.g. the cameras')."""
        columns = [np.asarray(rows[name], dtype=object) for rows, names in tables for name in names]
        columns.append(np.asarray(extra, dtype=object))
        tokens = np.concatenate(columns)
        width = max(1, max(map(len, tokens), default=1))
        n = len(tokens)
        raw = np.zeros((n, width + 5), dtype=np.uint8)
        if n:
            raw[:, :width] = np.array(tokens.tolist(), dtype=f"S{width}").view(np.uint8).reshape(n, width)
            raw[:, width : width + 4] = (
                np.fromiter(map(len, tokens), dtype=">u4", count=n).view(np.uint8).reshape(n, 4)
            )
        raw[:, width + 4] = 1
        distinct, inverse = np.unique(raw.view(f"S{width + 5}").reshape(n), return_inverse=True)
        lengths = distinct.view(np.uint8).reshape(-1, width + 5)[:, width : width + 4].copy().view(">u4")
        lengths = lengths.reshape(-1).astype(np.int64)
        keys = inverse.reshape(-1).astype(np.uint64) + np.uint64(1)
        if lengths.size and lengths[0] == 0:  # the empty token sorts first: it is key 0, the others shift
            keys -= np.uint64(1)
            distinct, lengths = distinct[1:], lengths[1:]
        rows_of = distinct.view(np.uint8).reshape(-1, width + 5)
        texts = [bytes(row[:k]).hex() for row, k in zip(rows_of, lengths.tolist(), strict=True)]
        self._hex = np.array(["", *texts], dtype=f"<U{2 * width}")
        out: list[np.ndarray] = []
        start = 0
        for rows, names in tables:
            dtype = np.dtype([(f, "u8" if f in names else rows.dtype[f]) for f in rows.dtype.names])
            rekeyed = np.empty(rows.shape, dtype=dtype)
            for f in rows.dtype.names:
                if f in names:
                    rekeyed[f] = keys[start : start + rows.size]
                    start += rows.size
                else:
                    rekeyed[f] = rows[f]
            out.append(rekeyed)
        return out, keys[start:]

    def keys(self, tokens: np.ndarray) -> np.ndarray:
        """uint64 keys of a token field (same order as the hex form; empty -> 0)."""
        if self.general:
            return np.asarray(tokens, dtype=np.uint64)  # rekeyed already
        tokens = np.asarray(tokens)
        if tokens.dtype != np.dtype("S8"):
            tokens = tokens.astype("S8")
        return tokens.view(">u8").astype(np.uint64)  # a field of a structured array: one strided pass

    def hex(self, keys: np.ndarray) -> np.ndarray:
        """Hex strings of keys (16 characters on the fast path)."""
        if not self.general:
            return _hex(keys)
        return self._hex[np.asarray(keys, dtype=np.int64)]


def _read(con: sqlite3.Connection, path: Path, general: bool) -> LogData:
    _check_schema(con, path)
    notes: list[str] = []

    # -- log -----------------------------------------------------------------------------------
    logs = con.execute("SELECT token, vehicle_name, logfile, location, map_version FROM log").fetchall()
    if len(logs) != 1:
        raise SourceError(path, f"table log has {len(logs)} rows, expected exactly 1", _HINT_NOT_A_LOG)
    log_token, vehicle, logfile, location, map_version = logs[0]
    _check_token(log_token, path, "log.token")

    # -- merged lidar --------------------------------------------------------------------------
    lidars = con.execute(
        "SELECT token, translation, rotation FROM lidar WHERE channel = ? ORDER BY token", (LIDAR_CHANNEL,)
    ).fetchall()
    if not lidars:
        channels = [c for (c,) in con.execute("SELECT DISTINCT channel FROM lidar ORDER BY channel")]
        raise SourceError(
            path,
            f"table lidar has no {LIDAR_CHANNEL!r} channel (it has {_listing(channels)}); DriveEngine reads "
            f"nuPlan's merged point cloud, lidar.channel = {LIDAR_CHANNEL!r}",
            _HINT_NOT_A_LOG,
        )
    if len(lidars) > 1:
        notes.append(f"{len(lidars)} {LIDAR_CHANNEL} lidars; using the first by token")
    lidar_token, lidar_translation, lidar_rotation = lidars[0]
    _check_token(lidar_token, path, "lidar.token")
    where = f"column lidar.%s of channel {LIDAR_CHANNEL}"
    translation = load_calibration(lidar_translation, (3,), path, where % "translation")
    rotation = load_calibration(lidar_rotation, (4,), path, where % "rotation")
    _check_pose_calibration(path, "lidar", lidar_token, LIDAR_CHANNEL, translation, rotation)
    ego_from_lidar = make_transform(rotation, translation)

    # -- every table's rows (token lengths checked on the way) --------------------------------------
    sweeps = _fetch(con, _SWEEPS, path, general, (lidar_token,))
    if sweeps.size == 0:
        others = con.execute(
            "SELECT ifnull(l.channel, '<no lidar row>'), count(*) FROM lidar_pc AS lp "
            "LEFT JOIN lidar AS l ON l.token = lp.lidar_token GROUP BY 1 ORDER BY 1"
        ).fetchall()
        found = "; ".join(f"{count} of lidar channel {channel!r}" for channel, count in others)
        raise SourceError(
            path,
            f"no lidar_pc rows of the {LIDAR_CHANNEL} lidar (token {bytes(lidar_token).hex()}): "
            + (f"table lidar_pc has {found}" if others else "the log is empty"),
            "skip this log" if not others else _HINT_NOT_A_LOG,
        )
    scenes = _fetch(con, _SCENES, path, general)
    camera_rows = _read_camera_rows(con, path, notes)
    images = _fetch(con, _IMAGES, path, general)
    boxes = _fetch(con, _BOXES, path, general)
    tracks = _fetch(con, _TRACKS, path, general)
    categories = _fetch(con, _CATEGORIES, path, general)
    lights = _fetch(con, _LIGHTS, path, general)
    tags = _fetch(con, _TAGS, path, general)
    tk = _Tokens(general)
    if not general:
        if any(len(row.token) != _NUPLAN_TOKEN_BYTES for row in camera_rows):
            raise _OtherTokenLength
        camera_keys = tk.keys(np.array([row.token for row in camera_rows], dtype="S8"))
    else:
        tables = [sweeps, scenes, images, boxes, tracks, categories, lights, tags]
        queries = [_SWEEPS, _SCENES, _IMAGES, _BOXES, _TRACKS, _CATEGORIES, _LIGHTS, _TAGS]
        tables, camera_keys = tk.rekey(
            [(rows, q.token_fields()) for rows, q in zip(tables, queries, strict=True)],
            np.array([row.token for row in camera_rows], dtype=object),
        )
        sweeps, scenes, images, boxes, tracks, categories, lights, tags = tables

    # -- sweeps with their ego poses --------------------------------------------------------------
    if not sweeps["has_pose"].all():
        missing = int((~sweeps["has_pose"]).sum())
        notes.append(f"skipped {missing} lidar_pc rows whose ego_pose_token matches no ego_pose")
        sweeps = sweeps[sweeps["has_pose"]]
        if sweeps.size == 0:
            raise SourceError(path, "no lidar_pc row has an ego pose", "the log is incomplete; skip it")
    sweep_key = tk.keys(sweeps["token"])
    sweeps = sweeps[np.lexsort((sweep_key, sweeps["timestamp"]))]
    sweep_key = tk.keys(sweeps["token"])
    n = sweeps.size
    sweep_of = _KeyIndex(sweep_key)

    # -- scenes, in the order of their first sweep (then token) ---------------------------------------
    scene_key = tk.keys(scenes["token"])
    sweep_scene = _KeyIndex(scene_key).lookup(tk.keys(sweeps["scene"]))
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
    cameras = _cameras(camera_rows, camera_keys)
    image_path, image_ts = _match_images(images, cameras[0], sweeps["timestamp"], tk)

    # -- boxes -----------------------------------------------------------------------------------------
    box_order, box_offsets = _ragged(
        boxes, sweep_of.lookup(tk.keys(boxes["sweep"])), n, "lidar_box", notes, tk
    )
    box_track = tk.keys(boxes["track"])[box_order]
    # x, y, z, length, width, height, yaw, vx, vy, vz, confidence: one row gather of a float64 view
    box_numbers = _float_block(boxes, "x", 11)[box_order]
    box_category = _box_categories(box_track, tracks, categories, path, tk)

    # -- traffic lights and scenario tags ------------------------------------------------------------
    order, light_offsets = _ragged(
        lights, sweep_of.lookup(tk.keys(lights["sweep"])), n, "traffic_light_status", notes, tk,
        lights["lane"],
    )  # fmt: skip
    lights = lights[order]
    order, tag_offsets = _ragged(tags, sweep_of.lookup(tk.keys(tags["sweep"])), n, "scenario_tag", notes, tk)
    tags = tags[order]
    tag_agent_key = tk.keys(tags["agent"])
    tag_agent = tk.hex(tag_agent_key)
    tag_agent[tag_agent_key == 0] = ""

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
        sweep_token=tk.hex(sweep_key),
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
        box_token=tk.hex(tk.keys(boxes["token"])[box_order]),
        box_track_token=tk.hex(box_track),
        box_category=box_category,
        box_center=np.ascontiguousarray(box_numbers[:, 0:3]),
        box_size=np.ascontiguousarray(box_numbers[:, 3:6]),
        box_yaw=np.ascontiguousarray(box_numbers[:, 6]),
        box_velocity=np.ascontiguousarray(box_numbers[:, 7:10]),
        box_confidence=np.ascontiguousarray(box_numbers[:, 10]),
        scene_token=tk.hex(scene_key),
        scene_name=scenes["name"].astype(np.str_) if scenes.size else np.zeros(0, dtype="<U1"),
        scene_roadblock_ids=roadblocks,
        traffic_light_offsets=light_offsets,
        traffic_light_lane_connector_id=lights["lane"].copy(),
        traffic_light_status=lights["status"].copy(),
        tag_offsets=tag_offsets,
        tag_type=tags["type"].astype(np.str_) if tags.size else np.zeros(0, dtype="<U1"),
        tag_agent_track_token=tag_agent,
        camera_channels=CAMERA_CHANNELS,
        categories=CATEGORIES,
        category_class=np.array(CATEGORY_CLASS, dtype=np.uint8),
        notes=notes,
    )
    data.validate()
    return data


def _listing(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "none"


# -- schema and fetching ------------------------------------------------------------------------------


def _check_schema(con: sqlite3.Connection, path: Path) -> None:
    """Raise a :class:`SourceError` naming the first missing table or column, a required table that is a
    view, or a required column computed when read (one query; a view's columns are listed without running
    it). Views and virtual generated columns can run arbitrary SQL, e.g. a recursive query that never
    ends; nuPlan logs have neither."""
    rows = con.execute(
        "SELECT m.name, m.type, p.name, p.hidden FROM sqlite_master AS m JOIN pragma_table_xinfo(m.name) AS p "
        "WHERE m.type IN ('table', 'view')"
    ).fetchall()
    kinds: dict[str, str] = {}
    present: dict[str, set[str]] = {}
    computed: dict[str, set[str]] = {}
    for table, kind, column, hidden in rows:
        kinds[table] = kind
        present.setdefault(table, set()).add(column)
        if hidden == 2:  # a VIRTUAL generated column: its expression runs on every read
            computed.setdefault(table, set()).add(column)
    for table, columns in REQUIRED_COLUMNS.items():
        if kinds.get(table) == "view":
            raise SourceError(
                path,
                f"{table} is a view, not a table; a nuPlan log stores its rows in tables (a view can run "
                "any query, e.g. a recursive one that never ends), so it is not read",
                _HINT_NOT_A_LOG,
            )
        if table not in present:
            raise SourceError(path, f"no such table {table}", _HINT_NOT_A_LOG)
        missing = [c for c in columns if c not in present[table]]
        if missing:
            raise SourceError(
                path,
                f"table {table} lacks column(s) {', '.join(missing)}",
                f"not a nuPlan schema; {_HINT_NOT_A_LOG}",
            )
        generated = sorted(computed.get(table, set()) & set(columns))
        if generated:
            raise SourceError(
                path,
                f"table {table} computes column(s) {', '.join(generated)} when read (GENERATED ... VIRTUAL); "
                "a nuPlan log stores its values, so it is not read",
                _HINT_NOT_A_LOG,
            )


def _fetch(
    con: sqlite3.Connection, query: _Query, path: Path, general: bool, params: tuple = ()
) -> np.ndarray:
    """All rows of ``query`` as a structured array: one query, rows streamed from the cursor into numpy
    (``np.fromiter``; faster than ``fetchall`` since no list of tuples is kept).

    On the fast path the query aborts on a token that is not 8 bytes (or empty/NULL where it references
    another row), which raises :class:`_OtherTokenLength`; on the general path every token must be a BLOB.
    """
    dtype = query.dtype(general)
    try:
        cursor = con.execute(query.statement(general), params)
        first = cursor.fetchone()
        if first is None:
            return np.zeros(0, dtype=dtype)
        token_at = [i for i, (_, kind) in enumerate(query.fields) if kind == _TOKEN]
        for i, token in zip(token_at, query.tokens, strict=True):
            _check_token(first[i], path, f"{query.table}.{token.column.split('.')[-1]}", empty_ok=True)
        rows = np.fromiter(itertools.chain((first,), cursor), dtype=dtype)
    except sqlite3.OperationalError as exc:
        if not general and str(exc) == _SQL_ABORT_MESSAGE:
            raise _OtherTokenLength from None
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise SourceError(
            path,
            f"table {query.table} holds values of unexpected types or NULLs ({exc})",
            "the log may be corrupt",
        ) from exc
    if general:
        for name, token in zip(query.token_fields(), query.tokens, strict=True):
            bad = [t for t in rows[name].tolist() if type(t) is not bytes or (not t and not token.reference)]
            if bad:
                _check_token(bad[0], path, f"{query.table}.{token.column.split('.')[-1]}")
    return rows


def _check_token(value: object, path: Path, what: str, empty_ok: bool = False) -> None:
    """Tokens are BLOBs of any length (nuPlan's are 8 bytes); an empty BLOB stands for NULL in the queries
    above, where ``empty_ok``."""
    if not isinstance(value, bytes) or (not value and not empty_ok):
        raise SourceError(
            path,
            f"{what} holds {type(value).__name__} {value!r:.40}, expected a token BLOB (nuPlan's are 8 bytes)",
            _HINT_NOT_A_LOG,
        )


def _hex(keys: np.ndarray) -> np.ndarray:
    """uint64 keys as 16-character lowercase hex strings: one table look-up per byte, written straight
    into the ``U16`` code points (no intermediate ``bytes`` or per-string work)."""
    raw = np.ascontiguousarray(keys, dtype=">u8").view(np.uint8).reshape(-1, 8)
    return _HEX_PAIRS[raw].view("U16").reshape(-1)


# -- calibration ----------------------------------------------------------------------------------------


def _check_pose_calibration(
    path: Path, table: str, token: bytes, channel: str, translation: np.ndarray, rotation: np.ndarray
) -> None:
    """A calibration's translation must be finite and its ``[w, x, y, z]`` quaternion finite and non-zero."""
    row = f"table {table}, token {bytes(token).hex()} (channel {channel})"
    if not np.isfinite(translation).all():
        raise SourceError(path, f"{row}: translation {translation.tolist()} is not finite", _HINT_CALIBRATION)
    if not np.isfinite(rotation).all():
        raise SourceError(path, f"{row}: rotation {rotation.tolist()} is not finite", _HINT_CALIBRATION)
    norm = float(np.sqrt(np.sum(rotation * rotation)))
    if norm < MIN_QUATERNION_NORM:
        raise SourceError(
            path,
            f"{row}: rotation {rotation.tolist()} is not a rotation (quaternion norm {norm:.3g}, expected "
            "[w, x, y, z] of norm 1)",
            _HINT_CALIBRATION,
        )


def _check_intrinsic(
    path: Path, token: bytes, channel: str, intrinsic: np.ndarray, distortion: np.ndarray
) -> None:
    """A camera's intrinsic must be finite with positive focal lengths ``fx, fy`` (pixels); its
    distortion finite."""
    row = f"table camera, token {bytes(token).hex()} (channel {channel})"
    if not np.isfinite(intrinsic).all() or intrinsic[0, 0] <= 0 or intrinsic[1, 1] <= 0:
        raise SourceError(
            path,
            f"{row}: intrinsic {intrinsic.tolist()} is not a camera matrix (expected finite values and focal "
            f"lengths fx = [0][0], fy = [1][1] > 0 pixels)",
            _HINT_CALIBRATION,
        )
    if not np.isfinite(distortion).all():
        raise SourceError(path, f"{row}: distortion {distortion.tolist()} is not finite", _HINT_CALIBRATION)


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
    tk: _Tokens,
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
    token = tk.keys(rows["token"][rows_index])
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
    box_track: np.ndarray, tracks: np.ndarray, categories: np.ndarray, path: Path, tk: _Tokens
) -> np.ndarray:
    """(M,) int8 index into :data:`CATEGORIES` of each box (``box_track``: uint64 track keys), through
    ``track.category_token``.

    Raises a :class:`SourceError` for a box whose track or category row is missing or whose category name
    is not one of :data:`CATEGORIES`.
    """
    category_index = _KeyIndex(tk.keys(categories["token"])).lookup(tk.keys(tracks["category"]))
    category_code = np.append(categories["code"], np.int8(_NO_CATEGORY_ROW))  # index -1: no category row
    track_code = np.append(category_code[category_index], np.int8(_NO_TRACK_ROW))  # index -1: no track row
    codes = track_code[_KeyIndex(tk.keys(tracks["token"])).lookup(box_track)].astype(np.int8)
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


@dataclass(frozen=True)
class _CameraRow:
    """One ``camera`` row of a channel in :data:`CAMERA_CHANNELS`, calibration unpickled and checked."""

    channel: str
    token: bytes
    translation: np.ndarray  #: (3,) m
    rotation: np.ndarray  #: (4,) [w, x, y, z]
    intrinsic: np.ndarray  #: (3, 3) pixels
    distortion: np.ndarray  #: (5,)
    size: tuple[int, int]  #: width, height in pixels


def _read_camera_rows(con: sqlite3.Connection, path: Path, notes: list[str]) -> list[_CameraRow]:
    """The first row by token of every nuPlan camera channel the log has (at least one), calibration
    checked (:func:`_check_pose_calibration`, :func:`_check_intrinsic`)."""
    rows = con.execute(
        "SELECT token, channel, translation, rotation, intrinsic, distortion, width, height FROM camera "
        "ORDER BY token"
    ).fetchall()
    found: dict[str, _CameraRow] = {}
    for cam_token, channel, *blobs, width, height in rows:  # at most a handful of rows
        if channel not in CAMERA_CHANNELS:
            notes.append(f"ignored camera channel {channel!r}")
            continue
        if channel in found:
            notes.append(f"{channel} appears twice in table camera; using the first by token")
            continue
        _check_token(cam_token, path, f"camera.token of channel {channel}")
        where = f"column camera.%s of channel {channel}"
        row = _CameraRow(
            channel=channel,
            token=bytes(cam_token),
            translation=load_calibration(blobs[0], (3,), path, where % "translation"),
            rotation=load_calibration(blobs[1], (4,), path, where % "rotation"),
            intrinsic=load_calibration(blobs[2], (3, 3), path, where % "intrinsic"),
            distortion=load_calibration(blobs[3], (5,), path, where % "distortion"),
            size=(width or 0, height or 0),
        )
        _check_pose_calibration(path, "camera", row.token, channel, row.translation, row.rotation)
        _check_intrinsic(path, row.token, channel, row.intrinsic, row.distortion)
        found[channel] = row
    if not found:
        channels = sorted({str(channel) for _, channel, *_ in rows})
        raise SourceError(
            path,
            f"table camera has none of nuPlan's camera channels (it has {_listing(channels)}; expected "
            f"{', '.join(CAMERA_CHANNELS)})",
            _HINT_NOT_A_LOG,
        )
    return list(found.values())


def _cameras(
    rows: list[_CameraRow], row_keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cameras in :data:`CAMERA_CHANNELS` order: (uint64 keys (0 = absent), hex tokens, translation,
    rotation, intrinsic, distortion, size); an absent channel has an empty token and NaN calibration.
    ``row_keys``: the token keys of ``rows``."""
    c = len(CAMERA_CHANNELS)
    keys = np.zeros(c, dtype=np.uint64)
    token = np.full(c, "", dtype=object)
    translation = np.full((c, 3), np.nan)
    rotation = np.full((c, 4), np.nan)
    intrinsic = np.full((c, 3, 3), np.nan)
    distortion = np.full((c, 5), np.nan)
    size = np.zeros((c, 2), dtype=np.int32)
    for row, key in zip(rows, row_keys.tolist(), strict=True):
        i = CAMERA_CHANNELS.index(row.channel)
        keys[i] = key
        token[i] = row.token.hex()
        translation[i], rotation[i] = row.translation, row.rotation
        intrinsic[i], distortion[i] = row.intrinsic, row.distortion
        size[i] = row.size
    return keys, token.astype(np.str_), translation, rotation, intrinsic, distortion, size


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
    images: np.ndarray, camera_keys: np.ndarray, sweep_ts: np.ndarray, tk: _Tokens
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) relative image paths ("" if none) and timestamps (-1 if none) matched to the sweeps."""
    n, c = sweep_ts.size, len(CAMERA_CHANNELS)
    paths = np.full((n, c), "", dtype=object)
    stamps = np.full((n, c), -1, dtype=np.int64)
    image_camera = tk.keys(images["camera"])
    image_key = tk.keys(images["token"])
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
