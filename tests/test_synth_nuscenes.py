"""The synthetic world as a nuScenes release: schema, links, rates, frames, truth, faults, splits, devkit."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from driveengine.splits import load_split
from PIL import Image

from driveengine.geometry import (
    invert_transform,
    make_transform,
    quaternion_to_matrix,
    quaternion_yaw,
    transform_points,
)
from driveengine.sources.pcd import read_pcd
from driveengine.synth import synthesize
from driveengine.synth.nuplan_db import SynthError
from driveengine.synth.nuscenes import (
    CAMERA_CHANNELS,
    CATEGORY_INDEX,
    LIDAR_CHANNEL,
    RADAR_CHANNELS,
    NuScenesFaults,
    default_scene_names,
    ground_class,
    loop_offset_m,
    official_scene_names,
    world_ego_from_nuscenes_ego,
    write_nuscenes,
    write_nuscenes_metadata,
)
from driveengine.synth.sensors import CLASS_COLOURS, lidar_sweep
from driveengine.synth.world import EGO_Z_M

SEED = 3
SECONDS = 4.0
RAYS = 4096
IMAGE_SIZE = (96, 54)
VERSION = "v1.0-mini"

#: nuScenes' schema (docs/schema_nuscenes.md of the devkit), written out independently of the writer.
REFERENCE_SCHEMA = {
    "attribute": "token name description",
    "calibrated_sensor": "token sensor_token translation rotation camera_intrinsic",
    "category": "token name description index",
    "ego_pose": "token translation rotation timestamp",
    "instance": "token category_token nbr_annotations first_annotation_token last_annotation_token",
    "log": "token logfile vehicle date_captured location",
    "map": "token log_tokens category filename",
    "sample": "token timestamp scene_token next prev",
    "sample_annotation": "token sample_token instance_token attribute_tokens visibility_token translation size "
    "rotation num_lidar_pts num_radar_pts next prev",
    "sample_data": "token sample_token ego_pose_token calibrated_sensor_token filename fileformat width height "
    "timestamp is_key_frame next prev",
    "scene": "token name description log_token nbr_samples first_sample_token last_sample_token",
    "sensor": "token channel modality",
    "visibility": "token level description",
    "lidarseg": "token filename sample_data_token",
}
#: Foreign keys: (table, field) -> target table ('' allowed where the schema says "empty if ...").
FOREIGN_KEYS = {
    ("scene", "log_token"): ("log", False),
    ("scene", "first_sample_token"): ("sample", False),
    ("scene", "last_sample_token"): ("sample", False),
    ("sample", "scene_token"): ("scene", False),
    ("sample", "prev"): ("sample", True),
    ("sample", "next"): ("sample", True),
    ("sample_data", "sample_token"): ("sample", False),
    ("sample_data", "ego_pose_token"): ("ego_pose", False),
    ("sample_data", "calibrated_sensor_token"): ("calibrated_sensor", False),
    ("sample_data", "prev"): ("sample_data", True),
    ("sample_data", "next"): ("sample_data", True),
    ("sample_annotation", "sample_token"): ("sample", False),
    ("sample_annotation", "instance_token"): ("instance", False),
    ("sample_annotation", "visibility_token"): ("visibility", False),
    ("sample_annotation", "prev"): ("sample_annotation", True),
    ("sample_annotation", "next"): ("sample_annotation", True),
    ("instance", "category_token"): ("category", False),
    ("instance", "first_annotation_token"): ("sample_annotation", False),
    ("instance", "last_annotation_token"): ("sample_annotation", False),
    ("calibrated_sensor", "sensor_token"): ("sensor", False),
    ("lidarseg", "sample_data_token"): ("sample_data", False),
}
HEX32 = re.compile(r"[0-9a-f]{32}")


def load_tables(root: Path, version: str = VERSION) -> dict[str, list[dict]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / version).glob("*.json"))}


def by_token(rows: list[dict]) -> dict[str, dict]:
    return {r["token"]: r for r in rows}


def check_links(tables: dict[str, list[dict]]) -> None:
    """Every foreign key resolves, chains are consistent both ways, instances and scenes count right."""
    index = {t: by_token(rows) for t, rows in tables.items()}
    for t, rows in tables.items():
        assert len(index[t]) == len(rows), f"{t}: duplicate tokens"
    for (table, fld), (target, may_be_empty) in FOREIGN_KEYS.items():
        for row in tables.get(table, []):
            value = row[fld]
            if value == "" and may_be_empty:
                continue
            assert value in index[target], f"{table}.{fld} = {value!r} resolves nowhere"
    for table in ("sample", "sample_data", "sample_annotation"):
        rows = index[table]
        for tok, row in rows.items():
            if row["next"]:
                assert rows[row["next"]]["prev"] == tok, f"{table} {tok}: next.prev is not itself"
            if row["prev"]:
                assert rows[row["prev"]]["next"] == tok
    for row in tables["sample_annotation"]:
        for t in row["attribute_tokens"]:
            assert t in index["attribute"]
    for inst in tables["instance"]:
        chain, tok = [], inst["first_annotation_token"]
        while tok:
            chain.append(tok)
            ann = index["sample_annotation"][tok]
            assert ann["instance_token"] == inst["token"]
            tok = ann["next"]
        assert len(chain) == inst["nbr_annotations"] and chain[-1] == inst["last_annotation_token"]
    for scene in tables["scene"]:
        chain, tok = [], scene["first_sample_token"]
        while tok:
            chain.append(tok)
            assert index["sample"][tok]["scene_token"] == scene["token"]
            tok = index["sample"][tok]["next"]
        assert len(chain) == scene["nbr_samples"] and chain[-1] == scene["last_sample_token"]
    for m in tables["map"]:
        for log in m["log_tokens"]:
            assert log in index["log"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("nuscenes")
    scenes = write_nuscenes(
        root, scenes=2, seconds=SECONDS, seed=SEED, points=RAYS, image_size=IMAGE_SIZE, lidarseg=True
    )
    return root, scenes, load_tables(root)


def test_tables_have_the_schema_and_nuscenes_json_format(release) -> None:
    root, _, tables = release
    assert set(tables) == set(REFERENCE_SCHEMA)
    for name, fields in REFERENCE_SCHEMA.items():
        for row in tables[name]:
            assert set(row) == set(fields.split()), name
        text = (root / VERSION / f"{name}.json").read_text()
        assert json.dumps(tables[name], indent=0) == text, f"{name}.json is not json.dump(indent=0) output"
    assert len(tables["category"]) == 32 and sorted(c["index"] for c in tables["category"]) == list(range(32))
    assert {v["token"] for v in tables["visibility"]} == {"1", "2", "3", "4"}
    for name, rows in tables.items():
        if name != "visibility":
            assert all(HEX32.fullmatch(r["token"]) for r in rows), name
    assert {p.name for p in (root / "maps").iterdir()} == {f"{m['token']}.png" for m in tables["map"]}


def test_every_link_resolves_and_every_file_exists(release) -> None:
    root, _, tables = release
    check_links(tables)
    for sd in tables["sample_data"]:
        assert (root / sd["filename"]).is_file(), sd["filename"]
        assert sd["filename"].startswith("samples/" if sd["is_key_frame"] else "sweeps/")
    for seg in tables["lidarseg"]:
        assert (root / seg["filename"]).is_file() and seg["token"] == seg["sample_data_token"]
    assert (
        len(list((root / "lidarseg" / VERSION).iterdir())) == len(tables["lidarseg"]) == len(tables["sample"])
    )


def test_rates_counts_and_key_frames(release) -> None:
    _, scenes, tables = release
    sensors = {
        c["token"]: by_token(tables["sensor"])[c["sensor_token"]]["channel"]
        for c in tables["calibrated_sensor"]
    }
    samples = by_token(tables["sample"])
    for scene in scenes:
        n_samples = (round(SECONDS * 20) - 1) // 10 + 1
        assert len(scene.samples.token) == n_samples
        assert np.all(np.diff(scene.samples.timestamp_us) == 500_000)  # 2 Hz
        rows = [r for r in tables["sample_data"] if samples[r["sample_token"]]["scene_token"] == scene.token]
        by_channel: dict[str, list[dict]] = {}
        for r in rows:
            by_channel.setdefault(sensors[r["calibrated_sensor_token"]], []).append(r)
        assert set(by_channel) == {LIDAR_CHANNEL, *CAMERA_CHANNELS}
        for ch, chain in by_channel.items():
            chain.sort(key=lambda r: r["timestamp"])
            ts = np.array([r["timestamp"] for r in chain])
            step = np.diff(ts)
            if ch == LIDAR_CHANNEL:
                assert np.all(step == 50_000) and len(chain) == 10 * (n_samples - 1) + 1  # 20 Hz
                assert all(r["fileformat"] == "pcd" and r["width"] == r["height"] == 0 for r in chain)
            else:
                assert (
                    set(step.tolist()) <= {83_333, 83_334} and len(chain) == 6 * (n_samples - 1) + 1
                )  # 12 Hz
                assert all(
                    r["fileformat"] == "jpg" and (r["width"], r["height"]) == IMAGE_SIZE for r in chain
                )
            key = [r for r in chain if r["is_key_frame"]]
            assert [r["sample_token"] for r in key] == list(scene.samples.token)  # one key frame per sample
            assert chain[0]["prev"] == "" and chain[-1]["next"] == "" and chain[0]["is_key_frame"]
            for r in chain:  # key frames near their sample, the others point at the next sample
                st = samples[r["sample_token"]]["timestamp"]
                if r["is_key_frame"]:
                    assert 0 <= r["timestamp"] - st <= 50_000
                else:
                    assert r["timestamp"] < st and (
                        samples[r["sample_token"]]["prev"] == ""
                        or r["timestamp"] > samples[samples[r["sample_token"]]["prev"]]["timestamp"]
                    )
        # ego_pose: one per sample_data, same timestamp, on the ground
        poses = by_token(tables["ego_pose"])
        for r in rows:
            pose = poses[r["ego_pose_token"]]
            assert pose["timestamp"] == r["timestamp"] and pose["translation"][2] == 0.0


def test_pcd_bin_points_are_the_worlds_hits_in_the_lidar_frame(release) -> None:
    root, scenes, tables = release
    sd_index, poses, cs = (
        by_token(tables["sample_data"]),
        by_token(tables["ego_pose"]),
        by_token(tables["calibrated_sensor"]),
    )
    scene = scenes[0]
    world = scene.world
    lidar_rows = scene.rows(LIDAR_CHANNEL)
    for r in lidar_rows[[0, 3, 10, -1]].tolist():  # key frames and sweeps
        rec = sd_index[scene.sample_data.token[r]]
        data = (root / rec["filename"]).read_bytes()
        assert len(data) % 20 == 0
        pts = np.frombuffer(data, dtype=np.float32).reshape(-1, 5)
        calib = cs[rec["calibrated_sensor_token"]]
        pose = poses[rec["ego_pose_token"]]
        global_from_lidar = make_transform(pose["rotation"], pose["translation"]) @ make_transform(
            calib["rotation"], calib["translation"]
        )
        xyz = transform_points(global_from_lidar, pts[:, :3]) + scene.global_offset_m  # back to world global
        ts = rec["timestamp"]
        truth = lidar_sweep(world, ts, RAYS, int(scene.sample_data.sweep_index[r]))
        assert len(truth.global_xyz) == len(pts)
        np.testing.assert_allclose(xyz, truth.global_xyz, atol=2e-3)
        np.testing.assert_array_equal(pts[:, 4], truth.ring.astype(np.float32))
        assert set(np.unique(pts[:, 4]).astype(int).tolist()) <= set(range(64))
        # LIDAR_TOP's x points to the right of the vehicle: the ego's +y is the lidar's -x
        q = np.array(calib["rotation"])
        np.testing.assert_allclose(quaternion_to_matrix(q)[:, 0], [0.0, -1.0, 0.0], atol=0.05)


def test_same_geometry_as_the_nuplan_synth(release, tmp_path: Path) -> None:
    """The nuPlan logs of the same seed: same ego poses, boxes and key-frame points (up to the frames' shift)."""
    root, scenes, tables = release
    (log,) = synthesize(
        tmp_path / "nuplan",
        logs=1,
        seconds=SECONDS,
        seed=SEED,
        points=RAYS,
        image_size=IMAGE_SIZE,
        key_frames_only=True,
    )
    scene = scenes[0]
    conn = sqlite3.connect(log.db_path)
    lidar_pc = {
        ts: (tok, pose, fn)
        for tok, ts, pose, fn in conn.execute(
            "SELECT token, timestamp, ego_pose_token, filename FROM lidar_pc"
        )
    }
    ego = {tok: row for tok, *row in conn.execute("SELECT token, x, y, z, qw, qx, qy, qz FROM ego_pose")}
    track_token = {tok: tt.hex() for tok, tt in conn.execute("SELECT token, track_token FROM lidar_box")}
    sd_index, poses, cs = (
        by_token(tables["sample_data"]),
        by_token(tables["ego_pose"]),
        by_token(tables["calibrated_sensor"]),
    )
    anns = by_token(tables["sample_annotation"])
    inst_track = dict(zip(scene.instances.token.tolist(), scene.instances.track_index.tolist(), strict=True))
    offset = scene.global_offset_m
    for m, sample_tok in enumerate(scene.samples.token.tolist()):
        ts = int(scene.samples.timestamp_us[m])
        pc_tok, pose_tok, pcd_name = lidar_pc[ts]
        r = int(
            np.flatnonzero(
                (scene.sample_data.channel == LIDAR_CHANNEL)
                & (scene.sample_data.sample_index == m)
                & scene.sample_data.is_key_frame
            )[0]
        )
        rec = sd_index[scene.sample_data.token[r]]
        pose = poses[rec["ego_pose_token"]]
        x, y, z, *q = ego[pose_tok]
        np.testing.assert_allclose(np.array(pose["translation"]) + offset, [x, y, z - EGO_Z_M], atol=1e-6)
        np.testing.assert_allclose(pose["rotation"], q, atol=1e-12)
        # boxes: the nuPlan lidar_box rows of that lidar_pc, matched by track token
        nuplan_boxes = {
            track_token[tok]: (bx, by, bz, w, length, h, yaw)
            for tok, bx, by, bz, w, length, h, yaw in conn.execute(
                "SELECT token, x, y, z, width, length, height, yaw FROM lidar_box WHERE lidar_pc_token = ?",
                (pc_tok,),
            )
        }
        ours = {}
        for a in (a for a in anns.values() if a["sample_token"] == sample_tok):
            t = scene.world.tracks.token[inst_track[a["instance_token"]]]
            ours[t] = (
                *(np.array(a["translation"]) + offset),
                *a["size"],
                float(quaternion_yaw(a["rotation"])),
            )
        assert set(ours) == set(nuplan_boxes) and ours
        for t, box in ours.items():
            np.testing.assert_allclose(box[:6], nuplan_boxes[t][:6], atol=1e-6)
            assert abs(np.angle(np.exp(1j * (box[6] - nuplan_boxes[t][6])))) < 1e-9
        # points: ours (lidar frame -> nuScenes ego -> world ego) equal nuPlan's ego-frame .pcd
        pts = np.fromfile(root / rec["filename"], dtype=np.float32).reshape(-1, 5)
        calib = cs[rec["calibrated_sensor_token"]]
        ours_ego = transform_points(
            world_ego_from_nuscenes_ego() @ make_transform(calib["rotation"], calib["translation"]),
            pts[:, :3],
        )
        cloud = read_pcd(log.sensor_root / pcd_name)
        theirs = np.column_stack([cloud.fields["x"], cloud.fields["y"], cloud.fields["z"]])
        assert theirs.shape == ours_ego.shape
        np.testing.assert_allclose(ours_ego, theirs, atol=2e-3)
        np.testing.assert_array_equal(pts[:, 3], cloud.fields["intensity"])
    conn.close()


def test_annotations_are_the_worlds_boxes(release) -> None:
    root, scenes, tables = release
    anns = by_token(tables["sample_annotation"])
    categories = {c["token"]: c["name"] for c in tables["category"]}
    instances = by_token(tables["instance"])
    for scene in scenes:
        a = scene.annotations
        world = scene.world
        for m, ts in enumerate(scene.samples.timestamp_us.tolist()):
            boxes = world.boxes_at(ts, max_range_m=60.0)
            here = np.flatnonzero(a.sample_index == m)
            assert sorted(a.track_index[here].tolist()) == sorted(boxes.track_index.tolist())
            for i in here.tolist():
                row = anns[a.token[i]]
                k = int(np.flatnonzero(boxes.track_index == a.track_index[i])[0])
                np.testing.assert_allclose(
                    np.array(row["translation"]) + scene.global_offset_m, boxes.center[k], atol=1e-9
                )
                np.testing.assert_allclose(row["size"], boxes.size[k][[1, 0, 2]])  # width, length, height
                assert abs(np.angle(np.exp(1j * (quaternion_yaw(row["rotation"]) - boxes.yaw[k])))) < 1e-12
                np.testing.assert_allclose(a.velocity[i], boxes.velocity[k])
                assert row["num_lidar_pts"] == a.num_lidar_pts[i] and row["num_radar_pts"] == 0
                inst = instances[row["instance_token"]]
                assert categories[inst["category_token"]] == a.category[i]
        # num_lidar_pts against an independent count: key-frame points inside the box (+1 cm)
        agree = 0
        for m in range(len(scene.samples.token)):
            r = int(
                np.flatnonzero(
                    (scene.sample_data.channel == LIDAR_CHANNEL)
                    & scene.sample_data.is_key_frame
                    & (scene.sample_data.sample_index == m)
                )[0]
            )
            pts = np.fromfile(root / scene.sample_data.filename[r], dtype=np.float32).reshape(-1, 5)[:, :3]
            g = scene.world_global_from_nuscenes_ego(r) @ scene.calibration[LIDAR_CHANNEL].ego_from_sensor()
            xyz = transform_points(g, pts)
            for i in np.flatnonzero(a.sample_index == m).tolist():
                center = a.translation[i] + scene.global_offset_m
                local = transform_points(invert_transform(make_transform(a.rotation[i], center)), xyz)
                half = a.size_wlh[i][[1, 0, 2]] / 2 + 0.01
                inside = np.all(np.abs(local) <= half, axis=1) & (xyz[:, 2] > 0.005)
                agree += int(abs(int(inside.sum()) - int(a.num_lidar_pts[i])) <= 1)
        assert agree >= 0.97 * len(a.token)
        assert a.num_lidar_pts.max() > 50


def test_velocities_follow_the_devkit_definition_and_physics(release) -> None:
    _, scenes, _ = release
    for scene in scenes:
        a = scene.annotations
        ts = scene.samples.timestamp_us / 1e6
        for i in range(len(a.token)):
            p, n = a.prev[i], a.next[i]
            first, last = (p if p >= 0 else i), (n if n >= 0 else i)
            dt = ts[a.sample_index[last]] - ts[a.sample_index[first]]
            if (p < 0 and n < 0) or dt > (3.0 if p >= 0 and n >= 0 else 1.5):
                assert np.isnan(a.velocity_nuscenes[i]).all()
                continue
            np.testing.assert_allclose(
                a.velocity_nuscenes[i], (a.translation[last] - a.translation[first]) / dt, atol=1e-9
            )
            if p >= 0 and n >= 0 and dt <= 1.0:  # a centred difference over 1 s is close to the true velocity
                assert np.linalg.norm(a.velocity_nuscenes[i] - a.velocity[i]) < 1.5
        moving = np.linalg.norm(a.velocity, axis=1) > 1.0
        assert moving.sum() > 10


def test_attributes_visibility_and_the_unoccluded_lead_vehicle(release) -> None:
    _, scenes, tables = release
    attr = {t["token"]: t["name"] for t in tables["attribute"]}
    for scene in scenes:
        a = scene.annotations
        names = [[attr[t] for t in ts] for ts in a.attribute_tokens]
        speed = np.linalg.norm(a.velocity, axis=1)
        for cat, attrs, v in zip(a.category, names, speed, strict=True):
            if cat == "vehicle.car":
                assert attrs == (["vehicle.moving"] if v >= 0.2 else ["vehicle.stopped"])
            elif cat == "human.pedestrian.adult":
                assert attrs == ["pedestrian.moving"]
            elif cat == "vehicle.bicycle":
                assert attrs == ["cycle.with_rider"]
            else:
                assert attrs == []
        assert np.all(a.visibility_token[a.num_lidar_pts == 0] == "1")
        lead = np.flatnonzero(scene.world.tracks.follows_ego[a.track_index] & (a.num_lidar_pts > 0))
        assert len(lead) and np.all(a.visibility_token[lead] == "4")  # nothing between the ego and its lead


def test_camera_calibration_sees_the_lead_vehicle(release) -> None:
    """Project the lead vehicle's centre with calibrated_sensor + ego_pose + intrinsic: the pixel is vehicle red."""
    root, scenes, _ = release
    red = np.array(CLASS_COLOURS[0], dtype=float)
    for scene in scenes:
        a = scene.annotations
        cam = scene.calibration["CAM_FRONT"]
        hits = 0
        for r in np.flatnonzero(
            (scene.sample_data.channel == "CAM_FRONT") & scene.sample_data.is_key_frame
        ).tolist():
            m = scene.sample_data.sample_index[r]
            lead = np.flatnonzero((a.sample_index == m) & scene.world.tracks.follows_ego[a.track_index])
            if not len(lead):
                continue
            # where the lead vehicle is at the image's own time (the camera fires after the sample)
            box = scene.world.boxes_at(int(scene.sample_data.timestamp_us[r]))
            k = int(np.flatnonzero(box.track_index == a.track_index[lead[0]])[0])
            center = box.center[k] - scene.global_offset_m
            pose = make_transform(scene.sample_data.ego_rotation[r], scene.sample_data.ego_translation[r])
            p = transform_points(invert_transform(pose @ cam.ego_from_sensor()), center[None])[0]
            u, v, w = cam.camera_intrinsic @ p
            assert w > 0
            img = np.asarray(Image.open(root / scene.sample_data.filename[r]).convert("RGB"), dtype=float)
            px = img[int(v / w), int(u / w)]
            hits += int(
                np.argmax(px) == 0 and px[0] > 100 and np.abs(px / px.sum() - red / red.sum()).max() < 0.12
            )
        assert hits >= 3


def test_lidarseg_labels(release) -> None:
    root, scenes, _ = release
    for scene in scenes:
        for r in np.flatnonzero(
            (scene.sample_data.channel == LIDAR_CHANNEL) & scene.sample_data.is_key_frame
        ).tolist():
            pts = np.fromfile(root / scene.sample_data.filename[r], dtype=np.float32).reshape(-1, 5)
            labels = np.fromfile(
                root / "lidarseg" / VERSION / f"{scene.sample_data.token[r]}_lidarseg.bin", dtype=np.uint8
            )
            assert labels.shape == (len(pts),)
            g = scene.world_global_from_nuscenes_ego(r) @ scene.calibration[LIDAR_CHANNEL].ego_from_sensor()
            xyz = transform_points(g, pts[:, :3])
            flat_ids = [
                CATEGORY_INDEX[n]
                for n in ("flat.driveable_surface", "flat.other", "flat.sidewalk", "flat.terrain")
            ]
            flat = np.isin(labels, flat_ids)
            assert np.all(np.abs(xyz[flat, 2]) < 2e-3) and flat.mean() > 0.3  # flat classes are the ground
            np.testing.assert_array_equal(labels[flat], ground_class(scene.world.loop, xyz[flat, :2]))
            assert np.all(np.isin(ground_class(scene.world.loop, xyz[flat, :2]), flat_ids))
            assert len(np.unique(labels[flat])) >= 3  # road, sidewalk/curb, terrain all seen
            high = xyz[:, 2] > 2.5  # above every annotated object: buildings and poles
            assert np.all(labels[high] == CATEGORY_INDEX["static.manmade"])
            cars = labels == CATEGORY_INDEX["vehicle.car"]
            assert cars.sum() > 0 and np.all(xyz[cars, 2] < 2.1)


def test_ground_bands_and_map_mask(release) -> None:
    root, scenes, _ = release
    for scene in scenes:
        loop = scene.world.loop
        s = np.linspace(0, loop.length_m, 50, endpoint=False)
        for d in (-9.0, -4.0, 0.0, 3.0, 8.5, 15.0, -20.0):
            xy, _, _ = loop.evaluate(s, d)
            np.testing.assert_allclose(loop_offset_m(loop, xy), d, atol=1e-9)
        mask = np.array(Image.open(root / "maps" / f"{scene.map_token}.png"))
        h = mask.shape[0]
        for r in scene.rows(LIDAR_CHANNEL).tolist():
            x, y, _ = scene.sample_data.ego_translation[r]
            assert mask[round(h - y / 0.1), round(x / 0.1)] == 255  # the ego drives on the road
        xy, _, _ = loop.evaluate(s, -13.0)  # between the sidewalk and the buildings: off the mask
        px = np.round((xy - scene.global_offset_m[:2]) / 0.1).astype(int)
        assert np.all(mask[h - px[:, 1], px[:, 0]] == 0)


def test_output_is_deterministic(tmp_path: Path) -> None:
    kw = dict(scenes=1, seconds=1.0, points=1024, image_size=(32, 18), lidarseg=True)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(write_nuscenes(tmp_path / "a", seed=5, **kw)[0].root)
    b = files(write_nuscenes(tmp_path / "b", seed=5, **kw)[0].root)
    c = files(write_nuscenes(tmp_path / "c", seed=6, **kw)[0].root)
    assert a == b and len(a) > 30
    assert a.keys() != c.keys() and a[f"{VERSION}/sample.json"] != c[f"{VERSION}/sample.json"]


def test_faults_are_injected_as_asked(tmp_path: Path) -> None:
    faults = NuScenesFaults(
        missing_tables=("instance",), missing_sweeps=((0, 2),), truncated_sweeps=((0, 10),),
        missing_images=((0, "CAM_BACK", 0),), broken_links=((0, "sample_data", "ego_pose_token", 5),),
    )  # fmt: skip
    (scene,) = write_nuscenes(tmp_path, scenes=1, seconds=1.0, points=512, image_size=(32, 18), faults=faults)
    assert (
        not (tmp_path / VERSION / "instance.json").exists() and (tmp_path / VERSION / "sample.json").exists()
    )
    sd = scene.sample_data
    lidar = scene.rows(LIDAR_CHANNEL)
    assert scene.missing_files == [sd.filename[lidar[2]], sd.filename[scene.rows("CAM_BACK")[0]]]
    assert not (tmp_path / sd.filename[lidar[2]]).exists() and (tmp_path / sd.filename[lidar[1]]).exists()
    assert scene.truncated_files == [sd.filename[lidar[10]]]
    assert (tmp_path / sd.filename[lidar[10]]).stat().st_size % 20 == 14
    tables = load_tables(tmp_path)
    poses = by_token(tables["ego_pose"])
    broken = by_token(tables["sample_data"])[sd.token[5]]
    assert broken["ego_pose_token"] not in poses and scene.broken_links == [
        ("sample_data", "ego_pose_token", sd.token[5])
    ]
    assert sum(r["ego_pose_token"] not in poses for r in tables["sample_data"]) == 1
    with pytest.raises(SynthError, match="cannot break"):
        write_nuscenes(
            tmp_path / "x",
            scenes=1,
            seconds=0.5,
            blobs=False,
            faults={"broken_links": [(0, "sample", "token", 0)]},
        )
    with pytest.raises(SynthError, match="unknown table"):
        write_nuscenes(
            tmp_path / "x", scenes=1, seconds=0.5, blobs=False, faults={"missing_tables": ["scenes"]}
        )


def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SynthError, match="blobs=False"):
        write_nuscenes(tmp_path, scenes=1, radar=True)
    with pytest.raises(SynthError, match="only 10 scene names"):
        write_nuscenes(tmp_path, scenes=11, blobs=False)
    with pytest.raises(SynthError, match="invalid nuScenes version"):
        write_nuscenes(tmp_path, version="../v1.0-mini", blobs=False)
    with pytest.raises(SynthError, match="test release"):
        write_nuscenes(tmp_path, version="v1.0-test", lidarseg=True)
    with pytest.raises(SynthError, match="unique"):
        write_nuscenes(tmp_path, scenes=2, blobs=False, scene_names=["scene-1", "scene-1"])
    assert not (tmp_path / "v1.0-mini" / "scene.json").exists()


def test_a_test_release_has_no_annotations(tmp_path: Path) -> None:
    (scene,) = write_nuscenes(tmp_path, scenes=1, seconds=1.0, version="v1.0-test", blobs=False)
    tables = load_tables(tmp_path, "v1.0-test")
    assert tables["sample_annotation"] == [] and tables["instance"] == [] and len(tables["category"]) == 32
    assert (
        scene.name == official_scene_names("test")[0] and not scene.annotated and len(scene.annotations.token)
    )


def test_key_frame_only_cameras_and_radar_rows(tmp_path: Path) -> None:
    (scene,) = write_nuscenes(tmp_path, scenes=1, seconds=2.0, blobs=False, camera_sweeps=False, radar=True)
    sd = scene.sample_data
    n = len(scene.samples.token)
    for ch in CAMERA_CHANNELS:
        assert len(scene.rows(ch)) == n and sd.is_key_frame[scene.rows(ch)].all()
    for ch in RADAR_CHANNELS:
        rows = scene.rows(ch)
        assert sd.is_key_frame[rows].sum() == n and set(np.diff(sd.timestamp_us[rows]).tolist()) <= {
            76_923,
            76_924,
        }
        assert (
            sd.timestamp_us[rows][-1] - scene.samples.timestamp_us[-1] <= 38_462
        )  # ends at the last key frame
    check_links(load_tables(tmp_path))
    with pytest.raises(SynthError, match="positive scale"):
        write_nuscenes_metadata(tmp_path / "m", scale=0.0)


def test_official_splits_ship_as_data() -> None:
    sizes = {
        "mini_train": 8,
        "mini_val": 2,
        "train": 700,
        "val": 150,
        "test": 150,
        "train_detect": 350,
        "train_track": 350,
    }
    names = {k: official_scene_names(k) for k in sizes}
    assert {k: len(v) for k, v in names.items()} == sizes
    assert all(
        len(set(v)) == len(v) and all(re.fullmatch(r"scene-\d{4}", s) for s in v) for v in names.values()
    )
    train, val, test = set(names["train"]), set(names["val"]), set(names["test"])
    assert not (train & val or train & test or val & test) and len(train | val | test) == 1000
    assert train == set(names["train_detect"]) | set(names["train_track"])
    assert set(names["mini_train"]) | set(names["mini_val"]) <= train | val
    assert names["mini_val"] == ("scene-0103", "scene-0916") and "scene-0061" in names["mini_train"]
    split = load_split("nuscenes_train")  # the split loader of today reads them as log (= scene) lists
    assert split.folder == "v1.0-trainval" and split.log_names == train and "splits.py" in split.provenance
    assert (
        load_split("nuscenes_mini_val").folder == "v1.0-mini"
        and load_split("nuscenes_test").folder == "v1.0-test"
    )
    assert default_scene_names("v1.0-mini")[:3] == ["scene-0061", "scene-0103", "scene-0553"]
    assert default_scene_names("T4")[:2] == ["scene-0001", "scene-0002"]


def test_metadata_writer_replicates_valid_scenes_with_radar_rows(tmp_path: Path) -> None:
    stats = write_nuscenes_metadata(tmp_path, scenes=850, scale=6 / 850, distinct=2, seconds=2.0, points=1024)
    tables = load_tables(tmp_path, "v1.0-trainval")
    check_links(tables)
    assert stats.scenes == 6 and stats.distinct == 2 and len(tables["scene"]) == 6 and len(tables["map"]) == 2
    assert stats.rows["sample_data"] == len(tables["sample_data"]) == len(tables["ego_pose"])
    assert stats.bytes["sample_data"] == (tmp_path / "v1.0-trainval" / "sample_data.json").stat().st_size
    assert [s["name"] for s in tables["scene"]] == default_scene_names("v1.0-trainval")[:6]
    sensors = {
        c["token"]: by_token(tables["sensor"])[c["sensor_token"]]["channel"]
        for c in tables["calibrated_sensor"]
    }
    radar = [r for r in tables["sample_data"] if sensors[r["calibrated_sensor_token"]] in RADAR_CHANNELS]
    assert len(radar) and all(r["fileformat"] == "pcd" and r["filename"].endswith(".pcd") for r in radar)
    per_scene_keys = sum(r["is_key_frame"] for r in radar) / 6
    assert per_scene_keys == 5 * ((round(2.0 * 20) - 1) // 10 + 1)  # each radar: one key frame per sample
    samples = sorted(tables["sample"], key=lambda s: s["timestamp"])
    # scenes 0 and 2 replicate world 0, one hour apart, with their own tokens
    t_by_scene: dict[str, list[int]] = {}
    for s in samples:
        t_by_scene.setdefault(s["scene_token"], []).append(s["timestamp"])
    order = [s["token"] for s in tables["scene"]]
    assert t_by_scene[order[2]][0] - t_by_scene[order[0]][0] == 3_600_000_000
    assert stats.rows["sample_annotation"] == len(tables["sample_annotation"]) > 0


@pytest.mark.slow
def test_the_nuscenes_devkit_loads_the_release_and_agrees(release, tmp_path: Path) -> None:
    """nuscenes-devkit 1.2.0 (own venv, numpy 1.26) loads the tables; its poses, boxes, velocities match the truth."""
    from nuscenes_oracle import DevkitUnavailable, devkit_dump

    root, scenes, _ = release
    try:
        dump = devkit_dump(root, VERSION, tmp_path / "dump.json")
    except DevkitUnavailable as exc:
        pytest.skip(str(exc))
    assert dump["numpy"].startswith("1.")
    assert [s["name"] for s in dump["scenes"]] == [s.name for s in scenes]
    for scene, ds in zip(scenes, dump["scenes"], strict=True):
        assert ds["samples"] == scene.samples.token.tolist() and ds["nbr_samples"] == len(scene.samples.token)
        sd = scene.sample_data
        for r in range(len(sd.token)):
            d = dump["sample_data"][sd.token[r]]
            assert d["exists"] and d["channel"] == sd.channel[r] and d["timestamp"] == sd.timestamp_us[r]
            assert d["is_key_frame"] == sd.is_key_frame[r]
            np.testing.assert_allclose(d["ego_translation"], sd.ego_translation[r], atol=1e-9)
            np.testing.assert_allclose(d["ego_rotation"], sd.ego_rotation[r], atol=1e-12)
            cal = scene.calibration[sd.channel[r]]
            np.testing.assert_allclose(d["cs_translation"], cal.translation, atol=1e-12)
            if cal.camera_intrinsic is not None:
                np.testing.assert_allclose(np.reshape(d["intrinsic"], (3, 3)), cal.camera_intrinsic)
            if sd.channel[r] != LIDAR_CHANNEL:
                continue
            # the devkit's boxes in the LIDAR_TOP frame (interpolated between samples for sweeps)
            sensor_from_global = invert_transform(
                scene.world_global_from_nuscenes_ego(r) @ cal.ego_from_sensor()
            )
            truth = scene.world.boxes_at(int(sd.timestamp_us[r]))
            m = sd.sample_index[r]
            here = np.flatnonzero(scene.annotations.sample_index == m)
            prev_tracks = set(scene.annotations.track_index[scene.annotations.sample_index == m - 1].tolist())
            assert set(d["boxes"]) == set(scene.annotations.token[here].tolist())
            for i in here.tolist():
                box = d["boxes"][scene.annotations.token[i]]
                track = scene.annotations.track_index[i]
                if sd.is_key_frame[r]:
                    expected = transform_points(
                        sensor_from_global, scene.annotations.translation[i][None] + scene.global_offset_m
                    )[0]
                    np.testing.assert_allclose(box["center"], expected, atol=1e-6)
                elif m > 0 and track in prev_tracks and track in truth.track_index:
                    k = int(np.flatnonzero(truth.track_index == track)[0])
                    expected = transform_points(sensor_from_global, truth.center[k][None])[0]
                    assert np.linalg.norm(np.array(box["center"]) - expected) < 0.35  # linear vs true motion
                np.testing.assert_allclose(box["wlh"], scene.annotations.size_wlh[i])
        a = scene.annotations
        for i, tok in enumerate(a.token.tolist()):
            d = dump["annotations"][tok]
            v = np.array([np.nan if x is None else x for x in d["velocity"]])
            np.testing.assert_allclose(v, a.velocity_nuscenes[i], atol=1e-6, equal_nan=True)
            np.testing.assert_allclose(d["center"], a.translation[i], atol=1e-9)
            np.testing.assert_allclose(d["rotation"], a.rotation[i], atol=1e-12)
            assert d["name"] == a.category[i] and d["num_lidar_pts"] == a.num_lidar_pts[i]
        for r in np.flatnonzero((sd.channel == LIDAR_CHANNEL) & sd.is_key_frame).tolist():
            d = dump["lidar"][sd.token[r]]
            truth = lidar_sweep(scene.world, int(sd.timestamp_us[r]), RAYS, int(sd.sweep_index[r]))
            assert d["n"] == len(truth.global_xyz) and d["ego_on_map"]
            np.testing.assert_allclose(
                np.array(d["global_xyz"]) + scene.global_offset_m, truth.global_xyz, atol=3e-3
            )
            labels = np.fromfile(root / "lidarseg" / VERSION / f"{sd.token[r]}_lidarseg.bin", dtype=np.uint8)
            assert d["labels"] == np.bincount(labels, minlength=32).tolist()
    assert sum(len(v["boxes"]) for v in dump["sample_data"].values()) > 0
