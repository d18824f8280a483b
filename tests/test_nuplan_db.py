"""nuPlan log reader: bad inputs, restricted calibration pickles, image matching, round-trips.

Small nuPlan-schema databases are built here with ``sqlite3`` (rows inserted in shuffled order, so a
reader relying on row order fails); the round-trip against the synthetic world lives at the end.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from bounded_reader import read_in_child

from driveengine.errors import SourceError, UnsafePickleError
from driveengine.sources import safe_pickle
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS, CATEGORIES
from driveengine.sources.nuplan.reader import IMAGE_WINDOW_US, match_images, read_nuplan_log

SCHEMA = """
CREATE TABLE log (token BLOB PRIMARY KEY, vehicle_name TEXT, date TEXT, timestamp INTEGER, logfile TEXT,
                  location TEXT, map_version TEXT);
CREATE TABLE ego_pose (token BLOB PRIMARY KEY, timestamp INTEGER, x REAL, y REAL, z REAL, qw REAL, qx REAL,
                       qy REAL, qz REAL, vx REAL, vy REAL, vz REAL, acceleration_x REAL, acceleration_y REAL,
                       acceleration_z REAL, angular_rate_x REAL, angular_rate_y REAL, angular_rate_z REAL,
                       epsg INTEGER, log_token BLOB);
CREATE TABLE camera (token BLOB PRIMARY KEY, log_token BLOB, channel TEXT, model TEXT, translation BLOB,
                     rotation BLOB, intrinsic BLOB, distortion BLOB, width INTEGER, height INTEGER);
CREATE TABLE image (token BLOB PRIMARY KEY, next_token BLOB, prev_token BLOB, ego_pose_token BLOB,
                    camera_token BLOB, filename_jpg TEXT, timestamp INTEGER);
CREATE TABLE lidar (token BLOB PRIMARY KEY, log_token BLOB, channel TEXT, model TEXT, translation BLOB,
                    rotation BLOB);
CREATE TABLE lidar_pc (token BLOB PRIMARY KEY, next_token BLOB, prev_token BLOB, ego_pose_token BLOB,
                       lidar_token BLOB, scene_token BLOB, filename TEXT, timestamp INTEGER);
CREATE TABLE lidar_box (token BLOB PRIMARY KEY, lidar_pc_token BLOB, track_token BLOB, next_token BLOB,
                        prev_token BLOB, x REAL, y REAL, z REAL, width REAL, length REAL, height REAL,
                        vx REAL, vy REAL, vz REAL, yaw REAL, confidence REAL);
CREATE TABLE track (token BLOB PRIMARY KEY, category_token BLOB, width REAL, length REAL, height REAL);
CREATE TABLE category (token BLOB PRIMARY KEY, name TEXT, description TEXT);
CREATE TABLE scene (token BLOB PRIMARY KEY, log_token BLOB, name TEXT, goal_ego_pose_token BLOB,
                    roadblock_ids TEXT);
CREATE TABLE scenario_tag (token BLOB PRIMARY KEY, lidar_pc_token BLOB, type TEXT, agent_track_token BLOB);
CREATE TABLE traffic_light_status (token BLOB PRIMARY KEY, lidar_pc_token BLOB, lane_connector_id INTEGER,
                                   status TEXT);
"""

LOG_NAME = "2021.05.12.22.00.38_veh-35_01008_01518"


def tok(table: int, i: int) -> bytes:
    """A distinct 8-byte token per (table, row)."""
    return bytes([table, 0x5A]) + i.to_bytes(6, "big")


def insert(con: sqlite3.Connection, table: str, rows: list[tuple], rng: np.random.Generator) -> None:
    """Insert ``rows`` in a random order (readers must not rely on row order)."""
    if not rows:
        return
    rows = [rows[i] for i in rng.permutation(len(rows))]
    con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)


def devkit_pickle(values: list, kind: str, protocol: int = 2) -> bytes:
    """Pickle ``values`` as ``nuplan.database.common.data_types.<kind>`` (a list subclass), like the
    devkit's own DBs, without the devkit: stand-in modules exist only while pickling."""
    names = ["nuplan", "nuplan.database", "nuplan.database.common", "nuplan.database.common.data_types"]
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    module = sys.modules[names[-1]]
    cls = type(kind, (list,), {"__module__": names[-1], "__qualname__": kind})
    setattr(module, kind, cls)
    try:
        return pickle.dumps(cls(values), protocol=protocol)
    finally:
        for name in added:
            del sys.modules[name]


def make_log(
    path: Path,
    *,
    n_sweeps: int = 30,
    channels: tuple[str, ...] = CAMERA_CHANNELS,
    seed: int = 0,
    image_times: dict[str, list[int]] | None = None,
) -> dict:
    """Write a small, complete nuPlan log to ``path`` and return its ground truth (sorted by time).

    Sweeps at 20 Hz with 0..3 boxes each, images at 10 Hz per channel (or ``image_times``), two scenes,
    traffic lights and scenario tags; every table is inserted in shuffled order.
    """
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)
    t0 = 1_620_857_000_000_000
    log_token = tok(1, 0)
    insert(
        con, "log", [(log_token, "veh-35", "2021-05-12", t0, LOG_NAME, "las_vegas", "us-nv-las-vegas")], rng
    )

    lidar_token = tok(2, 0)
    lidar_t, lidar_q = [1.5, 0.0, 1.8], [0.7071067811865476, 0.0, 0.0, 0.7071067811865476]
    lidar_rows = [
        (lidar_token, log_token, "MergedPointCloud", "merged", devkit_pickle(lidar_t, "Translation"),
         devkit_pickle(lidar_q, "Rotation")),
        # another lidar whose sweeps must not be read
        (tok(2, 1), log_token, "OtherLidar", "x", pickle.dumps([0.0, 0, 0]), pickle.dumps([1.0, 0, 0, 0])),
    ]  # fmt: skip
    insert(con, "lidar", lidar_rows, rng)

    cams = {}
    cam_rows = []
    for i, ch in enumerate(channels):
        t = [float(i), 0.5, 1.6]
        q = list(np.array([1.0, 0.1 * i, 0.0, 0.2]) / np.linalg.norm([1.0, 0.1 * i, 0.0, 0.2]))
        k = [[1000.0 + i, 0.0, 960.0], [0.0, 1000.0 + i, 540.0], [0.0, 0.0, 1.0]]
        d = [0.01 * i, -0.02, 0.0, 0.001, 0.0]
        cams[ch] = dict(token=tok(3, i), t=t, q=q, k=k, d=d)
        # mix the pickle styles seen in the wild: devkit list types, numpy arrays, plain lists
        cam_rows.append(
            (tok(3, i), log_token, ch, "cam", devkit_pickle(t, "Translation", protocol=i % 3),
             pickle.dumps(np.array(q), protocol=4 + i % 2), devkit_pickle(k, "CameraIntrinsic"),
             pickle.dumps(d), 1920, 1080)
        )  # fmt: skip
    insert(con, "camera", cam_rows, rng)

    insert(con, "category", [(tok(4, i), name, "") for i, name in enumerate(CATEGORIES)], rng)
    n_tracks = 5
    track_cat = rng.integers(0, len(CATEGORIES), n_tracks)
    insert(
        con, "track", [(tok(5, j), tok(4, int(track_cat[j])), 2.0, 4.0, 1.5) for j in range(n_tracks)], rng
    )

    scenes = [
        # token order is the reverse of time order: scenes must come out in time order
        (tok(6, 1), log_token, "scene-0001", None, "rb1 rb2  rb3"),
        (tok(6, 0), log_token, "scene-0002", None, "rb4,rb5"),
        (tok(6, 2), log_token, "scene-unused", None, None),
    ]
    insert(con, "scene", scenes, rng)

    # sweeps at 20 Hz with a little jitter; ego_pose timestamps deliberately differ from lidar_pc's
    times = t0 + np.arange(n_sweeps) * 50_000 + rng.integers(-2000, 2000, n_sweeps)
    poses = rng.normal(size=(n_sweeps, 16))
    pose_rows, pc_rows, box_rows, light_rows, tag_rows = [], [], [], [], []
    truth_boxes: list[list[tuple]] = []
    truth_lights: list[list[tuple]] = []
    truth_tags: list[list[tuple]] = []
    box_i = 0
    for s in range(n_sweeps):
        pose_rows.append((tok(7, s), int(times[s]) - 777, *poses[s].tolist(), 32611, log_token))
        scene = tok(6, 1) if s < n_sweeps // 2 else tok(6, 0)
        pc_rows.append(
            (tok(8, s), None, None, tok(7, s), lidar_token, scene, f"{LOG_NAME}/MergedPointCloud/{tok(8, s).hex()}.pcd", int(times[s]))
        )  # fmt: skip
        sweep_boxes = []
        for j in rng.choice(n_tracks, rng.integers(0, 4), replace=False):
            v = rng.normal(size=11)
            box_rows.append((tok(9, box_i), tok(8, s), tok(5, int(j)), None, None, *v.tolist()))
            # truth: token, track, category, center, size (length, width, height), yaw, velocity, confidence
            sweep_boxes.append(
                (
                    tok(9, box_i).hex(),
                    tok(5, int(j)).hex(),
                    int(track_cat[j]),
                    v[0:3],
                    v[[4, 3, 5]],
                    v[9],
                    v[6:9],
                    v[10],
                )
            )
            box_i += 1
        truth_boxes.append(sorted(sweep_boxes, key=lambda b: b[0]))
        lights = [
            (tok(10, 100 * s + k), tok(8, s), 1000 + k, st)
            for k, st in enumerate(["red", "GREEN", "flashing"][: s % 4])
        ]
        light_rows += lights
        truth_lights.append(
            [
                (1000 + k, {"red": 2, "GREEN": 0, "flashing": 3}[st])
                for k, st in enumerate(["red", "GREEN", "flashing"][: s % 4])
            ]
        )
        tags = [(tok(11, s), tok(8, s), "on_intersection", None)] if s % 5 == 0 else []
        if s % 7 == 0:
            tags.append((tok(11, 1000 + s), tok(8, s), "following_lane", tok(5, 0)))
        tag_rows += tags
        truth_tags.append(sorted((t[0].hex(), t[2], t[3].hex() if t[3] else "") for t in tags))
    # sweeps of the other lidar, with boxes: must be ignored
    pc_rows.append((tok(8, 9999), None, None, tok(7, 0), tok(2, 1), None, "x.pcd", int(t0)))
    box_rows.append((tok(9, 99999), tok(8, 9999), tok(5, 0), None, None, *[0.0] * 11))
    for table, rows in (("ego_pose", pose_rows), ("lidar_pc", pc_rows), ("lidar_box", box_rows),
                        ("traffic_light_status", light_rows), ("scenario_tag", tag_rows)):  # fmt: skip
        insert(con, table, rows, rng)

    img_rows = []
    truth_images: dict[str, list[tuple[int, bytes, str]]] = {}
    for ci, ch in enumerate(channels):
        stamps = (image_times or {}).get(ch)
        if stamps is None:
            stamps = (
                t0
                + 5_000
                + np.arange(n_sweeps // 2 + 1) * 100_000
                + rng.integers(-1000, 1000, n_sweeps // 2 + 1)
            ).tolist()
        truth_images[ch] = []
        for k, ts in enumerate(stamps):
            token = tok(12 + ci, k)
            name = f"{LOG_NAME}/{ch}/{token.hex()}.jpg"
            img_rows.append((token, None, None, None, cams[ch]["token"], name, int(ts)))
            truth_images[ch].append((int(ts), token, name))
    insert(con, "image", img_rows, rng)
    con.commit()
    con.close()
    return dict(
        times=times, poses=poses, sweep_tokens=[tok(8, s).hex() for s in range(n_sweeps)], cams=cams,
        lidar_t=lidar_t, lidar_q=lidar_q, boxes=truth_boxes, lights=truth_lights, tags=truth_tags,
        images=truth_images, scene_of=[0 if s < n_sweeps // 2 else 1 for s in range(n_sweeps)],
    )  # fmt: skip


@pytest.fixture
def small_log(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / f"{LOG_NAME}.db"
    return path, make_log(path)


def expected_image(sweep_ts: int, candidates: list[tuple[int, bytes, str]]) -> tuple[str, int]:
    """Oracle: the closest image within the window, ties by earlier timestamp then smaller token."""
    inside = [c for c in candidates if abs(c[0] - sweep_ts) <= IMAGE_WINDOW_US]
    if not inside:
        return "", -1
    best = min(inside, key=lambda c: (abs(c[0] - sweep_ts), c[0], c[1]))
    return best[2], best[0]


def test_round_trip_small_log(small_log: tuple[Path, dict]) -> None:
    path, truth = small_log
    data = read_nuplan_log(path)
    n = len(truth["times"])
    assert data.source == "nuplan" and data.path == str(path)
    assert (data.log_name, data.vehicle_name, data.location, data.map_version) == (
        LOG_NAME,
        "veh-35",
        "las_vegas",
        "us-nv-las-vegas",
    )
    assert data.log_token == tok(1, 0).hex() and data.lidar_token == tok(2, 0).hex()
    # sweeps: only the merged lidar's, in time order, lidar_pc timestamps (not ego_pose's)
    assert data.num_sweeps == n
    assert data.sweep_token.tolist() == truth["sweep_tokens"]
    np.testing.assert_array_equal(data.sweep_timestamp_us, truth["times"])
    assert data.sweep_lidar_path[3] == f"{LOG_NAME}/MergedPointCloud/{tok(8, 3).hex()}.pcd"
    assert data.sweep_scene.tolist() == truth["scene_of"]
    # ego poses joined through ego_pose_token
    p = truth["poses"]
    np.testing.assert_array_equal(data.ego_translation, p[:, 0:3])
    np.testing.assert_array_equal(data.ego_rotation, p[:, 3:7])
    np.testing.assert_array_equal(data.ego_velocity, p[:, 7:10])
    np.testing.assert_array_equal(data.ego_acceleration, p[:, 10:13])
    np.testing.assert_array_equal(data.ego_angular_rate, p[:, 13:16])
    # lidar calibration: ego_from_lidar maps the lidar's x axis to the ego's y axis (90 deg yaw)
    np.testing.assert_allclose(data.ego_from_lidar[:3, 3], truth["lidar_t"])
    np.testing.assert_allclose(data.ego_from_lidar[:3, :3] @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)
    # cameras in CAMERA_CHANNELS order, calibration from devkit lists, numpy arrays and plain lists
    for i, ch in enumerate(CAMERA_CHANNELS):
        cam = truth["cams"][ch]
        assert data.camera_token[i] == cam["token"].hex()
        np.testing.assert_array_equal(data.camera_translation[i], cam["t"])
        np.testing.assert_array_equal(data.camera_rotation[i], cam["q"])
        np.testing.assert_array_equal(data.camera_intrinsic[i], cam["k"])
        np.testing.assert_array_equal(data.camera_distortion[i], cam["d"])
        assert data.camera_size[i].tolist() == [1920, 1080]
    # images: same answer as the brute-force oracle, for every sweep and channel
    for s in range(n):
        for i, ch in enumerate(CAMERA_CHANNELS):
            name, ts = expected_image(int(truth["times"][s]), truth["images"][ch])
            assert (data.image_path[s, i], data.image_timestamp_us[s, i]) == (name, ts)
    assert (data.image_path != "").sum() > n  # most sweeps found their images
    # boxes ragged per sweep, sorted by token, size as (length, width, height)
    assert data.box_offsets[-1] == sum(len(b) for b in truth["boxes"])
    for s in range(n):
        sl = data.boxes(s)
        want = truth["boxes"][s]
        assert data.box_token[sl].tolist() == [b[0] for b in want]
        assert data.box_track_token[sl].tolist() == [b[1] for b in want]
        assert data.box_category[sl].tolist() == [b[2] for b in want]
        for k, b in enumerate(want):
            np.testing.assert_array_equal(data.box_center[sl][k], b[3])
            np.testing.assert_array_equal(data.box_size[sl][k], b[4])
            assert data.box_yaw[sl][k] == b[5] and data.box_confidence[sl][k] == b[7]
            np.testing.assert_array_equal(data.box_velocity[sl][k], b[6])
    assert any("lidar_box" in note for note in data.notes)  # the other lidar's box was skipped, visibly
    # scenes, roadblocks split on whitespace and commas
    assert data.scene_name.tolist() == ["scene-0001", "scene-0002", "scene-unused"]
    assert data.scene_token.tolist() == [tok(6, 1).hex(), tok(6, 0).hex(), tok(6, 2).hex()]
    assert data.scene_roadblock_ids == [["rb1", "rb2", "rb3"], ["rb4", "rb5"], []]
    # traffic lights and scenario tags, ragged per sweep
    for s in range(n):
        sl = data.traffic_lights(s)
        got = list(
            zip(
                data.traffic_light_lane_connector_id[sl].tolist(),
                data.traffic_light_status[sl].tolist(),
                strict=True,
            )
        )
        assert got == truth["lights"][s]
        tl = data.tags(s)
        got_tags = list(zip(data.tag_type[tl].tolist(), data.tag_agent_track_token[tl].tolist(), strict=True))
        assert got_tags == [(t, a) for _, t, a in truth["tags"][s]]  # in token order


def test_quoted_path_and_read_only(tmp_path: Path) -> None:
    folder = tmp_path / "odd name #1 ?x=%20"
    folder.mkdir()
    path = folder / "log.db"
    make_log(path, n_sweeps=4)
    before = path.read_bytes()
    data = read_nuplan_log(path)
    assert data.num_sweeps == 4
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["log.db"]  # no journal or WAL left behind


# -- bad inputs ---------------------------------------------------------------------------------------


def test_text_file_named_db(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("this is not a database\n" * 100)
    with pytest.raises(SourceError, match="nuPlan log database") as info:
        read_nuplan_log(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        read_nuplan_log(tmp_path / "nope.db")
    with pytest.raises(SourceError, match="is a directory"):
        read_nuplan_log(tmp_path)


def mutate(path: Path, *statements: str, params: tuple = ()) -> None:
    con = sqlite3.connect(path)
    for sql in statements:
        con.execute(sql, params)
    con.commit()
    con.close()


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("DROP TABLE lidar_pc", "no such table lidar_pc.*is this a nuPlan log database"),
        ("ALTER TABLE lidar_box DROP COLUMN yaw", "table lidar_box lacks column.*yaw"),
        ("DELETE FROM lidar_pc", "no lidar_pc rows.*empty"),
        ("UPDATE lidar_pc SET lidar_token = (SELECT token FROM lidar WHERE channel = 'OtherLidar')",
         "no lidar_pc rows of the MergedPointCloud lidar .token 025a000000000000.: table lidar_pc has 7 of "
         "lidar channel 'OtherLidar'"),
        ("UPDATE lidar SET channel = 'Other' WHERE channel = 'MergedPointCloud'",
         r"table lidar has no 'MergedPointCloud' channel \(it has 'Other', 'OtherLidar'\)"),
        ("DELETE FROM log", "table log has 0 rows"),
        ("UPDATE category SET name = 'spaceship' WHERE name = 'vehicle'", "unknown box category 'spaceship'"),
        ("UPDATE camera SET rotation = x'80049502' WHERE channel = 'CAM_L1'",
         "column camera.rotation of channel CAM_L1 is not a valid pickle"),
        ("UPDATE camera SET intrinsic = ? WHERE channel = 'CAM_R2'", "camera.intrinsic of channel CAM_R2 has shape"),
        ("UPDATE lidar_box SET track_token = hex(track_token)",
         "lidar_box.track_token holds str '.*', expected a token BLOB"),
        ("DELETE FROM track", "lidar_box rows whose track_token matches no track"),
        ("DELETE FROM category WHERE name = 'vehicle'", "category_token matches no category"),
    ],
)  # fmt: skip
def test_bad_logs_raise_one_clear_error(tmp_path: Path, statement: str, message: str) -> None:
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=6, seed=3)
    mutate(path, statement, params=(pickle.dumps([1.0, 2.0]),) if "?" in statement else ())
    with pytest.raises(SourceError, match=message) as info:
        read_nuplan_log(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, UnsafePickleError)


def test_dangling_rows_are_skipped_with_notes(tmp_path: Path) -> None:
    """A sweep without ego pose is left out (with its boxes), visibly; a NULL scene maps to -1."""
    path = tmp_path / "log.db"
    truth = make_log(path, n_sweeps=10, seed=5)
    mutate(
        path,
        "DELETE FROM ego_pose WHERE token = ?",
        params=(tok(7, 4),),
    )
    mutate(path, "UPDATE lidar_pc SET scene_token = NULL WHERE token = ?", params=(tok(8, 6),))
    data = read_nuplan_log(path)
    kept = [s for s in range(10) if s != 4]
    assert data.sweep_token.tolist() == [truth["sweep_tokens"][s] for s in kept]
    assert data.box_offsets[-1] == sum(len(truth["boxes"][s]) for s in kept)
    assert data.sweep_scene.tolist() == [-1 if s == 6 else truth["scene_of"][s] for s in kept]
    assert any("ego_pose" in note for note in data.notes)


def test_log_without_boxes_lights_tags_or_scenes(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    truth = make_log(path, n_sweeps=5, seed=2)
    for table in ("lidar_box", "traffic_light_status", "scenario_tag", "scene"):
        mutate(path, f"DELETE FROM {table}")
    data = read_nuplan_log(path)
    assert data.sweep_token.tolist() == truth["sweep_tokens"]
    assert (
        data.box_offsets.tolist() == [0] * 6
        and data.box_center.shape == (0, 3)
        and data.box_size.shape == (0, 3)
    )
    assert data.traffic_light_offsets[-1] == 0 and data.tag_offsets[-1] == 0
    assert len(data.scene_token) == 0 and (data.sweep_scene == -1).all()


class _Payload:
    """Unpickling this runs ``os.system(command)`` under plain pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_calibration_pickle_is_refused_before_it_runs(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=4)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(f"touch '{marker}'"))
    # the payload works under plain pickle ... (proved on a second marker, then removed)
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(f"touch '{proof}'")))
    assert proof.exists()
    mutate(path, "UPDATE camera SET rotation = ? WHERE channel = 'CAM_F0'", params=(payload,))
    with pytest.raises(
        UnsafePickleError, match=r"camera\.rotation of channel CAM_F0 asks for (os|posix)\.system"
    ):
        read_nuplan_log(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", [("builtins", "eval"), ("subprocess", "Popen"), ("os", "system"), ("builtins", "getattr")]
)
def test_restricted_loads_refuses_globals(tmp_path: Path, target: tuple[str, str]) -> None:
    data = f"c{target[0]}\n{target[1]}\n(S'print(1)'\ntR.".encode()
    with pytest.raises(UnsafePickleError, match=f"asks for {target[0]}.{target[1]}"):
        safe_pickle.load_calibration(data, (3,), tmp_path / "x.db", "column lidar.translation")


def test_restricted_loads_admits_plain_data(tmp_path: Path) -> None:
    allowed = {**safe_pickle.BUILTIN_GLOBALS, **safe_pickle.NUMPY_GLOBALS}
    value = {"a": [1, 2.5, "s", None], "b": (np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(2.0))}
    for protocol in range(6):
        got = safe_pickle.restricted_loads(
            pickle.dumps(value, protocol=protocol), allowed, tmp_path / "m.pkl"
        )
        assert got["a"] == value["a"] and got["b"][1] == 2.0
        np.testing.assert_array_equal(got["b"][0], value["b"][0])
    from collections import OrderedDict

    with pytest.raises(UnsafePickleError, match=r"collections\.OrderedDict"):
        safe_pickle.restricted_loads(pickle.dumps(OrderedDict(a=1)), allowed, tmp_path / "m.pkl")
    # names only (imported on use, after the check)
    got = safe_pickle.restricted_loads(
        pickle.dumps(OrderedDict(a=1)), {("collections", "OrderedDict")}, tmp_path / "m.pkl"
    )
    assert got == OrderedDict(a=1) and type(got) is OrderedDict


# -- image matching -------------------------------------------------------------------------------------


def test_match_images_edge_cases() -> None:
    w = IMAGE_WINDOW_US
    sweeps = np.array([1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000, 6_000_000])
    images = np.array(
        [
            1_000_000 + w,  # exactly 50 ms after sweep 0: included
            2_000_000 - w - 1,  # 50.001 ms before sweep 1: excluded
            3_000_000 - 20_000, 3_000_000 + 10_000,  # two candidates: the closer (after) wins
            4_000_000 + 7_000, 4_000_000 - 7_000,  # equal distance: the earlier wins
            5_000_000 + 1_000, 5_000_000 + 1_000,  # same timestamp: the smaller token wins
        ]
    )  # fmt: skip
    tokens = np.array([10, 11, 12, 13, 14, 15, 17, 16], dtype=np.uint64)
    got = match_images(sweeps, images, tokens)
    assert got.tolist() == [0, -1, 3, 5, 7, -1]
    assert match_images(sweeps, images[:0], tokens[:0]).tolist() == [-1] * 6
    # input order does not matter
    perm = np.random.default_rng(0).permutation(len(images))
    regot = match_images(sweeps, images[perm], tokens[perm])
    assert [perm[i] if i >= 0 else -1 for i in regot] == got.tolist()


def test_image_matching_through_the_database(tmp_path: Path) -> None:
    """Window edges through SQL, and a channel without images and a channel absent from the log."""
    path = tmp_path / "log.db"
    channels = tuple(c for c in CAMERA_CHANNELS if c != "CAM_B0")
    base = 1_620_857_000_000_000
    times = {ch: [] for ch in channels}
    times["CAM_F0"] = [base + 50_000 + 2_000]  # sweeps 0..3 sit near base + 50 ms * k (jitter < 2 ms)
    truth = make_log(path, n_sweeps=8, channels=channels, image_times=times)
    data = read_nuplan_log(path)
    f0, b0, l0 = (
        CAMERA_CHANNELS.index("CAM_F0"),
        CAMERA_CHANNELS.index("CAM_B0"),
        CAMERA_CHANNELS.index("CAM_L0"),
    )
    for s in range(8):
        name, ts = expected_image(int(truth["times"][s]), truth["images"]["CAM_F0"])
        assert (data.image_path[s, f0], data.image_timestamp_us[s, f0]) == (name, ts)
    assert (data.image_path[:, f0] != "").sum() >= 2
    # CAM_L0 exists but has no images; CAM_B0 is absent from the log
    assert (data.image_path[:, l0] == "").all() and (data.image_timestamp_us[:, l0] == -1).all()
    assert data.camera_token[l0] != "" and np.isfinite(data.camera_intrinsic[l0]).all()
    assert data.camera_token[b0] == "" and np.isnan(data.camera_intrinsic[b0]).all()
    assert np.isnan(data.camera_rotation[b0]).all() and (data.image_path[:, b0] == "").all()


# -- round trip against the synthetic world -----------------------------------------------------------


@pytest.mark.parametrize("calibration", ["devkit", "list"])
def test_round_trip_synthetic_world(tmp_path: Path, calibration: str) -> None:
    """What the synthetic world wrote (shuffled rows) is what the reader returns, in time order."""
    from driveengine.synth import synthesize
    from driveengine.synth.world import BOX_RANGE_M

    (log,) = synthesize(tmp_path, logs=1, seconds=3.0, seed=7, blobs=False, calibration_pickle=calibration)
    world, plan = log.world, log.plan
    data = read_nuplan_log(log.db_path)
    ts = world.lidar_timestamps_us
    n = len(ts)
    assert data.log_name == world.log_name and data.vehicle_name == world.vehicle_name
    assert data.sweep_token.tolist() == list(plan.sweep_token)
    np.testing.assert_array_equal(data.sweep_timestamp_us, ts)
    assert data.sweep_lidar_path.tolist() == list(plan.sweep_filename)
    assert (
        (data.sweep_scene == 0).all() and len(data.scene_token) == 1 and len(data.scene_roadblock_ids[0]) == 3
    )

    # ego pose of each sweep: the ego_pose row closest in time (World.frame_pose), global frame
    expected = np.stack([world.frame_pose(int(t)) for t in ts])
    np.testing.assert_allclose(data.global_from_ego(), expected, atol=1e-9)
    linked = world.ego_state(world.ego_pose_timestamps_us[world.nearest_ego_pose_index(ts)])
    np.testing.assert_allclose(data.ego_velocity, linked.velocity, atol=1e-12)
    np.testing.assert_allclose(data.ego_acceleration, linked.acceleration, atol=1e-12)
    np.testing.assert_allclose(data.ego_angular_rate, linked.angular_rate, atol=1e-12)

    # calibration (devkit list types or plain lists)
    np.testing.assert_allclose(data.ego_from_lidar, world.ego_from_lidar, atol=1e-12)
    for cam in world.cameras:
        i = CAMERA_CHANNELS.index(cam.channel)
        np.testing.assert_allclose(data.ego_from_camera()[i], cam.ego_from_camera(), atol=1e-12)
        np.testing.assert_array_equal(data.camera_intrinsic[i], cam.intrinsic)
        np.testing.assert_array_equal(data.camera_distortion[i], cam.distortion)
        assert data.camera_size[i].tolist() == [cam.width, cam.height]

    # images: the oracle over the plan's image rows
    for i, ch in enumerate(CAMERA_CHANNELS):
        candidates = [
            (int(t), bytes.fromhex(tk), name)
            for t, tk, name in zip(
                plan.image_timestamp_us[ch], plan.image_token[ch], plan.image_filename[ch], strict=True
            )
        ]
        for s in range(n):
            assert (data.image_path[s, i], data.image_timestamp_us[s, i]) == expected_image(
                int(ts[s]), candidates
            )
    assert (data.image_path != "").mean() > 0.8  # 10 Hz cameras: most 20 Hz sweeps have an image in +-50 ms

    # boxes: the tracks that exist within BOX_RANGE_M of the ego, with their exact states
    states = world.track_states(ts)
    ego_xy = world.ego_state(ts).translation[:, :2]
    in_range = states["exists"] & (
        np.linalg.norm(states["center"][..., :2] - ego_xy[:, None], axis=-1) <= BOX_RANGE_M
    )
    assert data.box_offsets[-1] == in_range.sum() == log.counts["lidar_box"]
    track_index = {t: j for j, t in enumerate(world.tracks.token)}
    for s in range(n):
        sl = data.boxes(s)
        assert sorted(data.box_token[sl].tolist()) == data.box_token[sl].tolist()
        got = np.array([track_index[t] for t in data.box_track_token[sl]], dtype=np.int64)
        assert sorted(got.tolist()) == np.flatnonzero(in_range[s]).tolist()
        np.testing.assert_allclose(data.box_center[sl], states["center"][s, got], atol=1e-9)
        np.testing.assert_allclose(data.box_yaw[sl], states["yaw"][s, got], atol=1e-12)
        np.testing.assert_allclose(data.box_velocity[sl], states["velocity"][s, got], atol=1e-12)
        np.testing.assert_allclose(
            data.box_size[sl], world.tracks.size[got], atol=1e-12
        )  # length, width, height
        assert data.box_category[sl].tolist() == world.tracks.category[got].tolist()
    assert data.traffic_light_offsets[-1] == log.counts["traffic_light_status"]
    assert set(np.diff(data.traffic_light_offsets).tolist()) == {3}
    assert data.tag_offsets[-1] == log.counts["scenario_tag"]
    assert data.notes == []


# -- calibration is checked, ego poses pass through ---------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "channel", "column", "value", "words"),
    [
        # seen in nuPlan-schema fixture databases of other tools
        ("lidar", "MergedPointCloud", "rotation", [0.0, 0.0, 0.0, 0.0], "is not a rotation (quaternion norm 0,"),
        ("camera", "CAM_L1", "rotation", [float("nan"), 0.0, 0.0, 1.0], "is not finite"),
        ("camera", "CAM_F0", "rotation", [0.0, 0.0, 0.0, 0.0], "is not a rotation"),
        ("camera", "CAM_R0", "translation", [float("inf"), 0.5, 1.6], "translation [inf, 0.5, 1.6] is not finite"),
        ("lidar", "MergedPointCloud", "translation", [1.5, float("nan"), 1.8], "is not finite"),
        ("camera", "CAM_B0", "intrinsic", [[0.0, 0, 960], [0, 1000, 540], [0, 0, 1]], "is not a camera matrix"),
        ("camera", "CAM_B0", "intrinsic", [[1000.0, 0, 960], [0, -5, 540], [0, 0, 1]], "fy = [1][1] > 0"),
        ("camera", "CAM_L0", "intrinsic", [[1000.0, 0, 960], [0, 1000, float("nan")], [0, 0, 1]], "is not a camera"),
        ("camera", "CAM_L2", "distortion", [0.0, float("inf"), 0, 0, 0], "distortion [0.0, inf, 0.0, 0.0, 0.0]"),
    ],
)  # fmt: skip
def test_bad_calibration_is_refused_naming_table_token_and_value(
    tmp_path: Path, table: str, channel: str, column: str, value: list, words: str
) -> None:
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=4, seed=1)
    mutate(path, f"UPDATE {table} SET {column} = ? WHERE channel = ?", params=(pickle.dumps(value), channel))
    (token,) = (
        sqlite3.connect(path).execute(f"SELECT token FROM {table} WHERE channel = ?", (channel,)).fetchone()
    )
    with pytest.raises(SourceError) as info:
        read_nuplan_log(path)
    message = str(info.value)
    assert message.startswith(f"{path}: table {table}, token {token.hex()} (channel {channel}): {column} ")
    assert words in message, message
    assert "calibration is corrupt" in message


def test_calibration_of_an_absent_camera_stays_nan(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=4, channels=tuple(c for c in CAMERA_CHANNELS if c != "CAM_R1"))
    data = read_nuplan_log(path)
    r1 = CAMERA_CHANNELS.index("CAM_R1")
    assert data.camera_token[r1] == "" and np.isnan(data.camera_intrinsic[r1]).all()
    assert np.isfinite(np.delete(data.camera_intrinsic, r1, axis=0)).all()


def test_non_finite_ego_poses_flow_through_without_warnings(tmp_path: Path) -> None:
    """The reader passes bad ego poses on as they are (the frame stage drops and counts those frames):
    SQLite stores NaN as NULL, which reads as NaN; infinities stay; a zero quaternion stays zero."""
    path = tmp_path / "log.db"
    truth = make_log(path, n_sweeps=8, seed=4)
    mutate(path, "UPDATE ego_pose SET x = NULL WHERE token = ?", params=(tok(7, 1),))
    mutate(path, "UPDATE ego_pose SET y = 9e999 WHERE token = ?", params=(tok(7, 2),))
    mutate(path, "UPDATE ego_pose SET qw = 0, qx = 0, qy = 0, qz = 0 WHERE token = ?", params=(tok(7, 3),))
    mutate(path, "UPDATE ego_pose SET qx = NULL, vx = NULL WHERE token = ?", params=(tok(7, 5),))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = read_nuplan_log(path)
    assert data.sweep_token.tolist() == truth["sweep_tokens"]  # every sweep kept
    assert np.isnan(data.ego_translation[1, 0]) and np.isfinite(data.ego_translation[1, 1:]).all()
    assert data.ego_translation[2, 1] == np.inf
    assert (data.ego_rotation[3] == 0).all()
    assert np.isnan(data.ego_rotation[5, 1]) and np.isnan(data.ego_velocity[5, 0])
    good = [0, 4, 6, 7]
    np.testing.assert_array_equal(data.ego_translation[good], truth["poses"][good, 0:3])
    assert data.notes == [n for n in data.notes if "ego_pose" not in n]  # nothing skipped for it


# -- nuPlan-schema databases of other tools ---------------------------------------------------------------

TOKEN_COLUMNS = {
    "log": ("token",), "lidar": ("token", "log_token"), "camera": ("token", "log_token"),
    "ego_pose": ("token", "log_token"), "image": ("token", "camera_token", "ego_pose_token"),
    "lidar_pc": ("token", "ego_pose_token", "lidar_token", "scene_token"),
    "lidar_box": ("token", "lidar_pc_token", "track_token"), "track": ("token", "category_token"),
    "category": ("token",), "scene": ("token", "log_token"),
    "scenario_tag": ("token", "lidar_pc_token", "agent_track_token"),
    "traffic_light_status": ("token", "lidar_pc_token"),
}  # fmt: skip


def _reshape_tokens(path: Path, expression: str, tables: dict[str, tuple[str, ...]] = TOKEN_COLUMNS) -> None:
    """Rewrite every token BLOB ``{t}`` as ``expression`` (SQL over ``{t}``) in ``tables``."""
    con = sqlite3.connect(path)
    for table, columns in tables.items():
        sets = ", ".join(f"{c} = CAST({expression.format(t=c)} AS BLOB)" for c in columns)
        con.execute(f"UPDATE {table} SET {sets}")
    con.commit()
    con.close()


def _shrink(hex8: str) -> str:
    """tok(table, i) -> its 4-byte form: the table byte and the low 3 bytes of i (order kept)."""
    return hex8[:2] + hex8[10:] if hex8 else ""


@pytest.mark.parametrize(
    ("name", "expression", "convert"),
    [
        ("4 bytes", "substr({t}, 1, 1) || substr({t}, 6, 3)", _shrink),
        ("16 bytes", "{t} || {t}", lambda h: h + h),
    ],
)
def test_tokens_of_other_lengths_are_read_and_hex_encoded_as_they_are(
    tmp_path: Path, name: str, expression: str, convert
) -> None:
    reference = tmp_path / "nuplan.db"
    make_log(reference, n_sweeps=12, seed=6)
    other = tmp_path / "other.db"
    other.write_bytes(reference.read_bytes())
    _reshape_tokens(other, expression)
    want, got = read_nuplan_log(reference), read_nuplan_log(other)
    for field in ("sweep_token", "box_token", "box_track_token", "scene_token", "tag_agent_track_token",
                  "camera_token"):  # fmt: skip
        assert getattr(got, field).tolist() == [convert(h) for h in getattr(want, field).tolist()], field
    assert got.log_token == convert(want.log_token) and got.lidar_token == convert(want.lidar_token)
    for field in ("sweep_timestamp_us", "box_offsets", "box_category", "box_center", "image_path",
                  "image_timestamp_us", "traffic_light_offsets", "traffic_light_status", "tag_type",
                  "ego_translation", "camera_intrinsic", "sweep_scene"):  # fmt: skip
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert "" in got.tag_agent_track_token.tolist()  # an empty (NULL) token stays empty


def test_mixed_token_lengths_take_the_general_path(tmp_path: Path) -> None:
    """Only lidar_box's own tokens are 10 bytes: the fast path notices and the log is read generally."""
    reference = tmp_path / "nuplan.db"
    make_log(reference, n_sweeps=12, seed=8)
    other = tmp_path / "other.db"
    other.write_bytes(reference.read_bytes())
    mutate(other, "UPDATE lidar_box SET token = CAST(x'0102' || token AS BLOB)")
    want, got = read_nuplan_log(reference), read_nuplan_log(other)
    assert got.box_token.tolist() == ["0102" + h for h in want.box_token.tolist()]
    assert got.sweep_token.tolist() == want.sweep_token.tolist()
    np.testing.assert_array_equal(got.box_center, want.box_center)


def test_no_nuplan_camera_lists_the_channels_found(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=4, channels=("CAM_F0", "CAM_B0"))
    mutate(path, "UPDATE camera SET channel = replace(channel, 'CAM_', 'CAMERA_')")
    with pytest.raises(SourceError) as info:
        read_nuplan_log(path)
    assert (
        f"{path}: table camera has none of nuPlan's camera channels (it has 'CAMERA_B0', 'CAMERA_F0'; "
        f"expected {', '.join(CAMERA_CHANNELS)})"
    ) in str(info.value)


# -- hostile schemas ------------------------------------------------------------------------------------


def test_a_recursive_view_is_refused_fast(tmp_path: Path) -> None:
    """lidar_pc as a view over an endless recursive query (it hung collect with growing memory)."""
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=4)
    mutate(
        path,
        "DROP TABLE lidar_pc",
        "CREATE VIEW lidar_pc AS WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
        "SELECT randomblob(8) AS token, NULL AS next_token, NULL AS prev_token, NULL AS ego_pose_token, "
        "(SELECT token FROM lidar WHERE channel = 'MergedPointCloud') AS lidar_token, NULL AS scene_token, "
        "'x.pcd' AS filename, x AS timestamp FROM r",
    )
    report = read_in_child("nuplan", path)
    assert report["error"] == "SourceError", report
    assert report["message"].startswith(f"{path}: lidar_pc is a view, not a table;"), report


def test_a_computed_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=4)
    mutate(path, "ALTER TABLE track RENAME COLUMN category_token TO category_token_stored")
    mutate(
        path, "ALTER TABLE track ADD COLUMN category_token BLOB GENERATED ALWAYS AS (category_token_stored)"
    )
    with pytest.raises(SourceError, match=r"table track computes column\(s\) category_token when read"):
        read_nuplan_log(path)


def test_queries_run_under_a_progress_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line of defence: a query past the budget (here made tiny) is aborted, clearly."""
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=40)
    from driveengine.sources.nuplan import reader as nuplan_db

    assert read_nuplan_log(path).num_sweeps == 40  # the real budget leaves a normal log alone
    monkeypatch.setattr(nuplan_db, "PROGRESS_STEPS_FLOOR", 2_000)
    monkeypatch.setattr(nuplan_db, "PROGRESS_STEPS_PER_BYTE", 0)
    monkeypatch.setattr(nuplan_db, "_PROGRESS_PERIOD", 100)
    with pytest.raises(SourceError, match=r"a query did not finish within 2000 SQLite steps") as info:
        read_nuplan_log(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_ctrl_c_during_a_query_stops_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite swallows an exception raised in its progress handler (a Ctrl-C lands there while a query
    runs) and reports the query as "interrupted": that must reach the caller as the KeyboardInterrupt it
    was, not as a failed log (collect would go on with the next log)."""
    path = tmp_path / "log.db"
    make_log(path, n_sweeps=40)
    from driveengine.sources.nuplan import reader as nuplan_db

    def ctrl_c(self: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(nuplan_db._ProgressBudget, "__call__", ctrl_c)
    monkeypatch.setattr(nuplan_db, "_PROGRESS_PERIOD", 100)
    with pytest.raises(KeyboardInterrupt):
        read_nuplan_log(path)


def test_the_general_token_path_reads_a_nuplan_log_exactly_as_the_fast_path(tmp_path: Path) -> None:
    """White box: the two key schemes (uint64 views, ranked encodings) agree field by field."""
    from dataclasses import fields

    from driveengine.sources.nuplan import reader as nuplan_db

    path = tmp_path / "log.db"
    make_log(path, n_sweeps=30, seed=9)
    results = []
    for general in (False, True):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            results.append(nuplan_db._read(con, path, general=general))
        finally:
            con.close()
    fast, general = results
    for f in fields(fast):
        a, b = getattr(fast, f.name), getattr(general, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=f.name)
        else:
            assert a == b, f.name
