"""Writing a :class:`~driveengine.synth.world.World` as a nuPlan log database (SQLite).

Every table and column of the nuPlan schema (reference §1) is written. Tokens are 8 random bytes
(BLOB), rows are inserted in shuffled order with ``executemany`` in one transaction, and every
``token`` / ``*_token`` column gets an index, as in nuPlan's databases. The calibration columns hold
pickles: by default of the nuplan-devkit list types ``Translation``, ``Rotation`` and
``CameraIntrinsic`` from ``nuplan.database.common.data_types`` (registered as a temporary fake module
while pickling, so the pickle names that module path), or of plain lists.

All per-row data is computed vectorised over the whole log (one ``track_states`` call for all
sweeps); only the final ``executemany`` rows are Python tuples.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sqlite3
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.geometry import matrix_to_quaternion
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES, LIDAR_CHANNEL
from driveengine.synth.world import BOX_RANGE_M, World

#: nuPlan's tables and columns with their SQLite types (reference §1), in nuPlan's column order.
SCHEMA: dict[str, list[tuple[str, str]]] = {
    "log": [
        ("token", "BLOB"), ("vehicle_name", "TEXT"), ("date", "TEXT"), ("timestamp", "INTEGER"),
        ("logfile", "TEXT"), ("location", "TEXT"), ("map_version", "TEXT"),
    ],
    "ego_pose": [
        ("token", "BLOB"), ("timestamp", "INTEGER"), ("x", "REAL"), ("y", "REAL"), ("z", "REAL"),
        ("qw", "REAL"), ("qx", "REAL"), ("qy", "REAL"), ("qz", "REAL"), ("vx", "REAL"), ("vy", "REAL"),
        ("vz", "REAL"), ("acceleration_x", "REAL"), ("acceleration_y", "REAL"), ("acceleration_z", "REAL"),
        ("angular_rate_x", "REAL"), ("angular_rate_y", "REAL"), ("angular_rate_z", "REAL"),
        ("epsg", "INTEGER"), ("log_token", "BLOB"),
    ],
    "camera": [
        ("token", "BLOB"), ("log_token", "BLOB"), ("channel", "TEXT"), ("model", "TEXT"),
        ("translation", "BLOB"), ("rotation", "BLOB"), ("intrinsic", "BLOB"), ("distortion", "BLOB"),
        ("width", "INTEGER"), ("height", "INTEGER"),
    ],
    "image": [
        ("token", "BLOB"), ("next_token", "BLOB"), ("prev_token", "BLOB"), ("ego_pose_token", "BLOB"),
        ("camera_token", "BLOB"), ("filename_jpg", "TEXT"), ("timestamp", "INTEGER"),
    ],
    "lidar": [
        ("token", "BLOB"), ("log_token", "BLOB"), ("channel", "TEXT"), ("model", "TEXT"),
        ("translation", "BLOB"), ("rotation", "BLOB"),
    ],
    "lidar_pc": [
        ("token", "BLOB"), ("next_token", "BLOB"), ("prev_token", "BLOB"), ("ego_pose_token", "BLOB"),
        ("lidar_token", "BLOB"), ("scene_token", "BLOB"), ("filename", "TEXT"), ("timestamp", "INTEGER"),
    ],
    "lidar_box": [
        ("token", "BLOB"), ("lidar_pc_token", "BLOB"), ("track_token", "BLOB"), ("next_token", "BLOB"),
        ("prev_token", "BLOB"), ("x", "REAL"), ("y", "REAL"), ("z", "REAL"), ("width", "REAL"),
        ("length", "REAL"), ("height", "REAL"), ("vx", "REAL"), ("vy", "REAL"), ("vz", "REAL"),
        ("yaw", "REAL"), ("confidence", "REAL"),
    ],
    "track": [("token", "BLOB"), ("category_token", "BLOB"), ("width", "REAL"), ("length", "REAL"), ("height", "REAL")],
    "category": [("token", "BLOB"), ("name", "TEXT"), ("description", "TEXT")],
    "scene": [
        ("token", "BLOB"), ("log_token", "BLOB"), ("name", "TEXT"), ("goal_ego_pose_token", "BLOB"),
        ("roadblock_ids", "TEXT"),
    ],
    "scenario_tag": [("token", "BLOB"), ("lidar_pc_token", "BLOB"), ("type", "TEXT"), ("agent_track_token", "BLOB")],
    "traffic_light_status": [
        ("token", "BLOB"), ("lidar_pc_token", "BLOB"), ("lane_connector_id", "INTEGER"), ("status", "TEXT"),
    ],
}  # fmt: skip

#: Sweeps per scene (20 s at 20 Hz).
SCENE_SWEEPS = 400
LOCATION = "las_vegas"
MAP_VERSION = "us-nv-las-vegas-strip"
EPSG = 32611  # UTM zone 11N (Las Vegas)
DEVKIT_MODULE = "nuplan.database.common.data_types"


class SynthError(DriveEngineError):
    """The synthetic data cannot be written (bad option or output path)."""


@dataclass
class LogPlan:
    """Tokens, timestamps and file names of one synthetic log, shared by the DB and blob writers.

    Tokens are 16-hex strings. Arrays are in time order.
    """

    sweep_token: np.ndarray  #: (N,)
    sweep_filename: np.ndarray  #: (N,) "<log>/MergedPointCloud/<token>.pcd"
    image_token: dict[str, np.ndarray] = field(default_factory=dict)  #: channel -> (K,)
    image_timestamp_us: dict[str, np.ndarray] = field(default_factory=dict)  #: channel -> (K,)
    image_filename: dict[str, np.ndarray] = field(default_factory=dict)  #: channel -> "<log>/<CAM>/<tok>.jpg"
    counts: dict[str, int] = field(default_factory=dict)  #: rows written per table
    tokens: _Tokens | None = None  #: the token source the DB writer continues to draw from


class _Tokens:
    """Unique 8-byte tokens drawn from a generator."""

    def __init__(self, rng: np.random.Generator, reserved: Sequence[str] = ()) -> None:
        self.rng = rng
        self.seen: set[bytes] = {bytes.fromhex(t) for t in reserved}

    def raw(self, n: int) -> list[bytes]:
        """``n`` new tokens as 8-byte ``bytes`` (the BLOB form)."""
        out = np.frombuffer(self.rng.bytes(8 * n), dtype="V8").tolist() if n else []
        fresh = set(out)
        if len(fresh) != n or not self.seen.isdisjoint(fresh):  # astronomically rare: redraw
            return self.raw(n)
        self.seen |= fresh
        return out

    def __call__(self, n: int) -> np.ndarray:
        """``n`` new tokens as 16-hex strings (the public form)."""
        return np.array([b.hex() for b in self.raw(n)], dtype=object)


def _blob(hex_tokens: np.ndarray) -> list[bytes | None]:
    return [bytes.fromhex(t) if t else None for t in hex_tokens.tolist()]


@contextlib.contextmanager
def _devkit_types() -> Iterator[tuple[type, type, type]]:
    """The devkit's ``Translation``, ``Rotation``, ``CameraIntrinsic`` (list subclasses).

    If nuplan-devkit is importable its classes are used; otherwise fake classes are registered under
    ``nuplan.database.common.data_types`` in ``sys.modules`` for the duration of the block only.
    """
    try:
        mod = __import__(DEVKIT_MODULE, fromlist=["Translation"])
        yield mod.Translation, mod.Rotation, mod.CameraIntrinsic
        return
    except ImportError:
        pass
    names = ["nuplan", "nuplan.database", "nuplan.database.common", DEVKIT_MODULE]
    added = []
    try:
        for name in names:
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        mod = sys.modules[DEVKIT_MODULE]
        classes = []
        for cls_name in ("Translation", "Rotation", "CameraIntrinsic"):
            cls = type(cls_name, (list,), {"__module__": DEVKIT_MODULE})
            setattr(mod, cls_name, cls)
            classes.append(cls)
        yield tuple(classes)  # type: ignore[misc]
    finally:
        for name in reversed(added):
            sys.modules.pop(name, None)


def _calibration_pickles(world: World, mode: str) -> tuple[dict[str, tuple[bytes, ...]], tuple[bytes, bytes]]:
    """Pickled (translation, rotation, intrinsic, distortion) per camera and (translation, rotation) of the lidar."""
    if mode not in ("devkit", "list"):
        raise SynthError(f"unknown calibration_pickle {mode!r}: use 'devkit' or 'list'")

    def dump(obj) -> bytes:
        return pickle.dumps(obj, protocol=4)

    with _devkit_types() if mode == "devkit" else contextlib.nullcontext((list, list, list)) as (tr, ro, ki):
        cams = {
            c.channel: (
                dump(tr(float(v) for v in c.translation)),
                dump(ro(float(v) for v in c.rotation)),
                dump(ki([float(v) for v in row] for row in c.intrinsic)),
                dump([float(v) for v in c.distortion]),
            )
            for c in world.cameras
        }
        q = matrix_to_quaternion(world.ego_from_lidar[:3, :3])
        lidar = (dump(tr(float(v) for v in world.ego_from_lidar[:3, 3])), dump(ro(float(v) for v in q)))
    return cams, lidar


def plan_log(world: World, *, camera_gap: tuple[str, float, float] | None = None) -> LogPlan:
    """Tokens and file names of the sweeps and images of ``world``'s log.

    Args:
        world: the world.
        camera_gap: ``(channel, start_s, end_s)``: that camera has no image rows for timestamps in
            ``[t0 + start_s, t0 + end_s)`` (frames with fewer than 8 cameras).
    """
    tokens = _Tokens(np.random.default_rng([world.seed, world.log_index, 2]), world.tracks.token)
    n = len(world.lidar_timestamps_us)
    sweep_token = tokens(n)
    log = world.log_name
    plan = LogPlan(
        sweep_token=sweep_token,
        sweep_filename=np.array([f"{log}/{LIDAR_CHANNEL}/{t}.pcd" for t in sweep_token], dtype=object),
    )
    for ch in CAMERA_CHANNELS:
        ts = world.image_timestamps_us[ch]
        if camera_gap is not None and camera_gap[0] == ch:
            sec = world.seconds_since_start(ts)
            ts = ts[(sec < camera_gap[1]) | (sec >= camera_gap[2])]
        tok = tokens(len(ts))
        plan.image_token[ch] = tok
        plan.image_timestamp_us[ch] = ts
        plan.image_filename[ch] = np.array([f"{log}/{ch}/{t}.jpg" for t in tok], dtype=object)
    plan.tokens = tokens
    return plan


def _linked(tokens: np.ndarray) -> tuple[list, list]:
    """next/prev token lists of a time-ordered token chain (None at the ends; empty for no tokens)."""
    if len(tokens) == 0:  # e.g. a camera_gap that removes every image of a channel
        return [], []
    nxt = [*_blob(tokens[1:]), None]
    prv = [None, *_blob(tokens[:-1])]
    return nxt, prv


def _shuffled(rng: np.random.Generator, rows: list[tuple]) -> list[tuple]:
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def build_rows(world: World, plan: LogPlan, calibration_pickle: str = "devkit") -> dict[str, list[tuple]]:
    """All rows of all tables of the log (time order; shuffled by :func:`write_db`)."""
    tokens = plan.tokens
    assert tokens is not None, "plan_log() makes the token source"
    rng = np.random.default_rng([world.seed, world.log_index, 3])
    rows: dict[str, list[tuple]] = {}
    n = len(world.lidar_timestamps_us)

    log_tok = bytes.fromhex(tokens(1)[0])
    rows["log"] = [
        (log_tok, world.vehicle_name, world.date, int(world.t0_us), world.log_name, LOCATION, MAP_VERSION)
    ]

    cat_tok = tokens(len(CATEGORIES))
    rows["category"] = [
        (bytes.fromhex(t), name, f"synthetic {name}") for t, name in zip(cat_tok, CATEGORIES, strict=True)
    ]
    tr = world.tracks
    rows["track"] = list(
        zip(
            _blob(tr.token),
            _blob(cat_tok[tr.category]),
            tr.size[:, 1].tolist(),
            tr.size[:, 0].tolist(),
            tr.size[:, 2].tolist(),
            strict=True,
        )
    )

    cam_pickles, lidar_pickles = _calibration_pickles(world, calibration_pickle)
    lidar_tok = bytes.fromhex(tokens(1)[0])
    rows["lidar"] = [(lidar_tok, log_tok, LIDAR_CHANNEL, "synthetic-merged", *lidar_pickles)]
    cam_tok = dict(zip(CAMERA_CHANNELS, _blob(tokens(len(CAMERA_CHANNELS))), strict=True))
    rows["camera"] = [
        (
            cam_tok[c.channel],
            log_tok,
            c.channel,
            "synthetic-pinhole",
            *cam_pickles[c.channel],
            c.width,
            c.height,
        )
        for c in world.cameras
    ]

    # ego poses (100 Hz)
    pose_ts = world.ego_pose_timestamps_us
    ego = world.ego_state(pose_ts)
    pose_blob = tokens.raw(len(pose_ts))
    p = len(pose_ts)
    rows["ego_pose"] = list(
        zip(
            pose_blob,
            pose_ts.tolist(),
            *ego.translation.T.tolist(),
            *ego.rotation.T.tolist(),
            *ego.velocity.T.tolist(),
            *ego.acceleration.T.tolist(),
            *ego.angular_rate.T.tolist(),
            [EPSG] * p,
            [log_tok] * p,
            strict=True,
        )
    )

    # scenes of SCENE_SWEEPS sweeps
    lidar_ts = world.lidar_timestamps_us
    sweep_pose = world.nearest_ego_pose_index(lidar_ts)
    n_scenes = max(1, int(np.ceil(n / SCENE_SWEEPS)))
    scene_tok = tokens(n_scenes)
    scene_of_sweep = np.arange(n) // SCENE_SWEEPS
    block = int(rng.integers(10_000, 90_000))
    rows["scene"] = []
    for i in range(n_scenes):
        last = min(n, (i + 1) * SCENE_SWEEPS) - 1
        roadblocks = " ".join(str(block + 3 * i + k) for k in range(3))
        rows["scene"].append(
            (bytes.fromhex(scene_tok[i]), log_tok, f"scene-{i:04d}", pose_blob[sweep_pose[last]], roadblocks)
        )

    # lidar_pc
    nxt, prv = _linked(plan.sweep_token)
    rows["lidar_pc"] = list(
        zip(
            _blob(plan.sweep_token),
            nxt,
            prv,
            [pose_blob[i] for i in sweep_pose.tolist()],
            [lidar_tok] * n,
            [bytes.fromhex(scene_tok[i]) for i in scene_of_sweep.tolist()],
            plan.sweep_filename.tolist(),
            lidar_ts.tolist(),
            strict=True,
        )
    )

    # images
    rows["image"] = []
    for ch in CAMERA_CHANNELS:
        ts = plan.image_timestamp_us[ch]
        tok = plan.image_token[ch]
        nx, pv = _linked(tok)
        link = world.nearest_ego_pose_index(ts)
        rows["image"] += list(
            zip(
                _blob(tok),
                nx,
                pv,
                [pose_blob[i] for i in link.tolist()],
                [cam_tok[ch]] * len(ts),
                plan.image_filename[ch].tolist(),
                ts.tolist(),
                strict=True,
            )
        )

    # lidar_box: tracks that exist and are within BOX_RANGE_M of the ego, all sweeps at once
    states = world.track_states(lidar_ts)
    ego_xy = world.ego_state(lidar_ts).translation[:, :2]
    dist = np.linalg.norm(states["center"][..., :2] - ego_xy[:, None, :], axis=-1)
    mask = states["exists"] & (dist <= BOX_RANGE_M)
    sweep_i, track_i = np.nonzero(mask)  # sweep-major order
    m = len(sweep_i)
    box_blob = tokens.raw(m)
    order = np.lexsort((sweep_i, track_i))  # by track, then time
    prev_idx = np.full(m, -1)
    next_idx = np.full(m, -1)
    same = track_i[order[1:]] == track_i[order[:-1]]
    prev_idx[order[1:][same]] = order[:-1][same]
    next_idx[order[:-1][same]] = order[1:][same]
    center = states["center"][sweep_i, track_i]
    vel = states["velocity"][sweep_i, track_i]
    size = tr.size[track_i]
    sweep_blob = _blob(plan.sweep_token)
    track_blob = _blob(tr.token)
    rows["lidar_box"] = list(
        zip(
            box_blob,
            [sweep_blob[i] for i in sweep_i.tolist()],
            [track_blob[i] for i in track_i.tolist()],
            [box_blob[i] if i >= 0 else None for i in next_idx.tolist()],
            [box_blob[i] if i >= 0 else None for i in prev_idx.tolist()],
            *center.T.tolist(),
            size[:, 1].tolist(),
            size[:, 0].tolist(),
            size[:, 2].tolist(),
            *vel.T.tolist(),
            states["yaw"][sweep_i, track_i].tolist(),
            np.round(rng.uniform(0.5, 1.0, m), 3).tolist(),
            strict=True,
        )
    )

    # traffic lights: three lane connectors cycling green 15 s, yellow 3 s, red 12 s
    connectors = rng.integers(10_000, 99_999, 3)
    phases = rng.uniform(0, 30, 3)
    sec = world.seconds_since_start(lidar_ts)
    cyc = np.mod(sec[:, None] + phases[None, :], 30.0)
    status = np.where(cyc < 15.0, "green", np.where(cyc < 18.0, "yellow", "red"))
    tl_tok = tokens.raw(3 * n)
    rows["traffic_light_status"] = list(
        zip(
            tl_tok,
            [sweep_blob[i] for i in np.repeat(np.arange(n), 3).tolist()],
            np.tile(connectors, n).tolist(),
            status.ravel().tolist(),
            strict=True,
        )
    )

    # scenario tags from the ego's motion and the objects around it
    ego_at = world.ego_state(lidar_ts)
    speed = ego_at.velocity[:, 0]
    turning = np.abs(ego_at.angular_rate[:, 2]) > 1e-9
    vehicle = tr.category == CATEGORIES.index("vehicle")
    near_veh = (mask & (dist <= 20.0) & vehicle[None, :]).sum(axis=1)
    lead = np.flatnonzero(tr.follows_ego)
    tags: list[tuple[int, str, bytes | None]] = []
    for name, cond in (
        ("stationary", speed < 0.05),
        ("on_intersection", turning),
        ("starting_left_turn", turning),
        ("high_magnitude_speed", speed > 9.0),
        ("near_multiple_vehicles", near_veh >= 3),
    ):
        tags += [(i, name, None) for i in np.flatnonzero(cond).tolist()]
    for j in lead.tolist():
        tags += [(i, "following_lane_with_lead", track_blob[j]) for i in np.flatnonzero(mask[:, j]).tolist()]
    tag_tok = tokens.raw(len(tags))
    rows["scenario_tag"] = [
        (tag_tok[k], sweep_blob[i], name, agent) for k, (i, name, agent) in enumerate(tags)
    ]
    return rows


def write_db(
    world: World, plan: LogPlan, db_path: str | os.PathLike[str], *, calibration_pickle: str = "devkit"
) -> dict[str, int]:
    """Write the log database to ``db_path`` (atomically: a temporary file renamed into place).

    Rows of every table are inserted in a shuffled order (readers must not rely on row order), in one
    transaction, and every ``token``/``*_token`` column is indexed afterwards.

    Returns:
        Rows written per table.
    """
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(db_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    rows = build_rows(world, plan, calibration_pickle)
    rng = np.random.default_rng([world.seed, world.log_index, 4])
    conn = sqlite3.connect(tmp)
    try:
        conn.execute("PRAGMA page_size=65536")  # before the first table: halves the index build time
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB page cache: index builds stay in memory
        conn.execute("PRAGMA temp_store=MEMORY")
        with conn:
            for table, cols in SCHEMA.items():
                conn.execute(f"CREATE TABLE {table} ({', '.join(f'{name} {typ}' for name, typ in cols)})")
                marks = ", ".join("?" * len(cols))
                conn.executemany(f"INSERT INTO {table} VALUES ({marks})", _shuffled(rng, rows[table]))
            # indexes after the inserts (one sorted build each instead of random B-tree inserts)
            for table, cols in SCHEMA.items():
                conn.execute(f"CREATE UNIQUE INDEX idx_{table}_token ON {table} (token)")
                for name, _ in cols:
                    if name.endswith("_token"):
                        conn.execute(f"CREATE INDEX idx_{table}_{name} ON {table} ({name})")
    finally:
        conn.close()
    os.replace(tmp, db_path)
    counts = {t: len(r) for t, r in rows.items()}
    plan.counts = counts
    return counts
