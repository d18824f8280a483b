"""``collect --source nuscenes`` on synthetic nuScenes releases (driveengine/synth/nuscenes.py) against their
known truth: frame rows, sweeps, interpolated boxes, velocities, the per-release index, splits, and bad
input (broken tables, links and sensor files fail their scene only, with one line naming the file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from driveengine.splits import SplitError, load_split
from typer.testing import CliRunner

from driveengine.cli import app
from driveengine.collect.config import CollectConfig, CollectError
from driveengine.collect.runner import collect
from driveengine.errors import SourceError
from driveengine.geometry import (
    quaternion_to_matrix,
    quaternion_yaw,
    wrap_angle,
)
from driveengine.sources import get_source
from driveengine.sources.base import InputLog
from driveengine.sources.nuscenes.constants import CAMERA_CHANNELS, CATEGORY_CLASS, LIDAR_CHANNEL
from driveengine.sources.nuscenes.index import SCENE_ARRAYS, cache_dir, open_index, read_arrays
from driveengine.sources.nuscenes.reader import slerp
from driveengine.store.dataset import open_split
from driveengine.synth.nuscenes import BREAKABLE_LINKS, NuScenesFaults, write_nuscenes

SEED = 5
SECONDS = 4.0
RAYS = 2048
IMAGE_SIZE = (48, 27)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIVEENGINE_CACHE", str(tmp_path_factory.getbasetemp() / "de-cache"))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("nuscenes")
    scenes = write_nuscenes(root, scenes=2, seconds=SECONDS, seed=SEED, points=RAYS, image_size=IMAGE_SIZE)
    return root, scenes


def _all_scenes_split(path: Path, version: str = "v1.0-mini") -> Path:
    path.write_text(yaml.safe_dump({"name": "all", "dataset": "nuscenes", "folder": version}))
    return path


def _collect(root: Path, out: Path, split: str | Path, **kw):
    config = CollectConfig.from_options(
        source="nuscenes", root=root, out=out, split=str(split), progress=False, **kw
    )
    return collect(config, echo=lambda _: None)


def _rows(split_dir: Path, log: str) -> list[dict]:
    return open_split(split_dir).log(log).frames().to_pylist()


def test_frame_rows_equal_the_synthetic_truth(release, tmp_path: Path) -> None:
    root, scenes = release
    split = _all_scenes_split(tmp_path / "all.yaml")
    summary = _collect(root, tmp_path / "out", split, labels=False)
    assert summary.ok and sorted(summary.done) == sorted(s.name for s in scenes) and not summary.dropped
    dataset = open_split(tmp_path / "out" / "all")
    assert dataset.dataset_name == "nuscenes" and dataset.cameras == CAMERA_CHANNELS
    assert dataset.classes.name == "occ3d-nuscenes" and dataset.grid.shape == (200, 200, 16)
    for scene in scenes:
        rows = _rows(tmp_path / "out" / "all", scene.name)
        sd, a = scene.sample_data, scene.annotations
        key = np.flatnonzero((sd.channel == LIDAR_CHANNEL) & sd.is_key_frame)
        key = key[np.argsort(sd.sample_index[key])]
        assert [r["token"] for r in rows] == scene.samples.token.tolist()
        assert [r["timestamp"] for r in rows] == scene.samples.timestamp_us.tolist()
        assert [r["sample_prev"] for r in rows] == [None, *scene.samples.token[:-1].tolist()]
        assert [r["sample_next"] for r in rows] == [*scene.samples.token[1:].tolist(), None]
        lidar = scene.calibration[LIDAR_CHANNEL]
        for m, (row, r) in enumerate(zip(rows, key.tolist(), strict=True)):
            assert row["log_name"] == scene.logfile and row["scene_name"] == f"{scene.logfile}-{scene.name}"
            assert row["source"] == "nuscenes" and row["scene_token"] == scene.token and row["split"] == "all"
            assert row["map_location"] == scene.location and row["lidar_path"] == sd.filename[r]
            t, q = sd.ego_translation[r], sd.ego_rotation[r]
            np.testing.assert_allclose(row["ego2global_translation"], t, atol=1e-12)
            np.testing.assert_allclose(row["ego2global_rotation"], q, atol=1e-12)
            np.testing.assert_allclose(row["lidar2ego"], lidar.ego_from_sensor(), atol=1e-12)
            assert all(np.isfinite(row["can_bus"])) and row["driving_command"].count(1) == 1
            for c, ch in enumerate(CAMERA_CHANNELS):
                cam = np.flatnonzero((sd.channel == ch) & sd.is_key_frame & (sd.sample_index == m))[0]
                got = row["cams"][ch]
                assert got["data_path"] == sd.filename[cam] and got["timestamp"] == sd.timestamp_us[cam]
                np.testing.assert_allclose(got["sensor2lidar_translation"], scene.calibration[ch].translation)
                np.testing.assert_allclose(
                    got["sensor2lidar_rotation"],
                    quaternion_to_matrix(scene.calibration[ch].rotation),
                    atol=1e-12,
                )
                np.testing.assert_allclose(got["cam_intrinsic"], scene.calibration[ch].camera_intrinsic)
                assert got["distortion"] == [0.0] * 5 and c == CAMERA_CHANNELS.index(ch)
            # boxes: the sample's annotations in the ego frame
            here = np.flatnonzero(a.sample_index == m)
            anns = row["anns"]
            assert sorted(anns["instance_tokens"]) == sorted(a.token[here].tolist())
            rot = quaternion_to_matrix(q)
            for j, tok in enumerate(anns["instance_tokens"]):
                i = int(np.flatnonzero(a.token == tok)[0])
                box = np.array(anns["gt_boxes"][j])
                np.testing.assert_allclose(box[:3], rot.T @ (a.translation[i] - t), atol=1e-9)
                np.testing.assert_allclose(box[3:6], a.size_wlh[i][[1, 0, 2]])
                assert abs(wrap_angle(box[6] - (a.yaw[i] - quaternion_yaw(q)))) < 1e-9
                v = a.velocity_nuscenes[i]
                expected_v = rot.T @ (np.zeros(3) if np.isnan(v).any() else v)
                np.testing.assert_allclose(anns["gt_velocity_3d"][j], expected_v, atol=1e-9)
                assert anns["gt_names"][j] == a.category[i]
                assert anns["track_tokens"][j] == scene.instances.token[a.instance_index[i]]


def _devkit_boxes(
    tables: dict[str, list[dict]], sd_token: str
) -> dict[str, tuple[np.ndarray, np.ndarray, list]]:
    """The devkit's ``NuScenes.get_boxes`` of one sample_data row, from plain dicts (independent of ours):
    annotation token -> (centre, rotation, wlh), global frame."""
    sd = {r["token"]: r for r in tables["sample_data"]}[sd_token]
    samples = {r["token"]: r for r in tables["sample"]}
    anns = {r["token"]: r for r in tables["sample_annotation"]}
    cur = samples[sd["sample_token"]]
    mine = [r for r in tables["sample_annotation"] if r["sample_token"] == cur["token"]]
    out = {}
    if cur["prev"] == "" or sd["is_key_frame"]:
        for r in mine:
            out[r["token"]] = (np.array(r["translation"]), np.array(r["rotation"]), r["size"])
        return out
    prev = samples[cur["prev"]]
    prev_map = {r["instance_token"]: r for r in anns.values() if r["sample_token"] == prev["token"]}
    t0, t1 = prev["timestamp"], cur["timestamp"]
    t = max(t0, min(t1, sd["timestamp"]))
    for r in mine:
        if r["instance_token"] in prev_map:
            p = prev_map[r["instance_token"]]
            centre = np.array(
                [
                    np.interp(t, [t0, t1], [c0, c1])
                    for c0, c1 in zip(p["translation"], r["translation"], strict=True)
                ]
            )
            q = slerp(np.array([p["rotation"]]), np.array([r["rotation"]]), np.array([(t - t0) / (t1 - t0)]))[
                0
            ]
            out[r["token"]] = (centre, q, r["size"])
        else:
            out[r["token"]] = (np.array(r["translation"]), np.array(r["rotation"]), r["size"])
    return out


def test_log_data_sweeps_are_20_hz_with_the_devkits_interpolated_boxes(release) -> None:
    root, scenes = release
    tables = {p.stem: json.loads(p.read_text()) for p in (root / "v1.0-mini").glob("*.json")}
    source = get_source("nuscenes")
    logs = {log.name: log for log in source.find_logs(root, load_split(_all_scenes_split(root / "all.yaml")))}
    for scene in scenes:
        log = source.read_log(logs[scene.name])
        sd = scene.sample_data
        lidar = scene.rows(LIDAR_CHANNEL)
        assert log.num_sweeps == len(lidar) == 10 * (len(scene.samples.token) - 1) + 1
        assert np.array_equal(log.sweep_timestamp_us, sd.timestamp_us[lidar])
        np.testing.assert_allclose(log.ego_translation, sd.ego_translation[lidar], atol=1e-12)
        keys = source.key_frame_candidates(log, 10)
        assert np.array_equal(keys, np.flatnonzero(sd.is_key_frame[lidar]))
        assert (log.image_path[keys] != "").all() and (np.delete(log.image_path, keys, axis=0) == "").all()
        assert list(log.sweep_token[keys]) == scene.samples.token.tolist()
        non_key = np.setdiff1d(np.arange(log.num_sweeps), keys)
        assert np.array_equal(log.sweep_token[non_key], sd.token[lidar][non_key])
        moved = 0
        for k in range(log.num_sweeps):
            want = _devkit_boxes(tables, str(sd.token[lidar][k]))
            b = log.boxes(k)
            assert sorted(log.box_token[b]) == sorted(want)
            for j in range(b.start, b.stop):
                centre, q, wlh = want[str(log.box_token[j])]
                np.testing.assert_allclose(log.box_center[j], centre, atol=1e-9)
                assert abs(wrap_angle(log.box_yaw[j] - quaternion_yaw(q))) < 1e-9
                np.testing.assert_allclose(log.box_size[j], np.array(wlh)[[1, 0, 2]])
                i = int(np.flatnonzero(scene.annotations.token == log.box_token[j])[0])
                moved += int(np.linalg.norm(centre - scene.annotations.translation[i]) > 0.05)
            # boxes of instances annotated in both samples are close to the world's truth at the sweep's time
            if k in keys:
                continue
            a = scene.annotations
            m = int(sd.sample_index[lidar][k])
            before = set(a.instance_index[a.sample_index == m - 1].tolist())
            truth = scene.world.boxes_at(int(log.sweep_timestamp_us[k]))
            for j in range(b.start, b.stop):
                i = int(np.flatnonzero(a.token == log.box_token[j])[0])
                hit = np.flatnonzero(truth.track_index == a.track_index[i])
                if a.instance_index[i] in before and hit.size:
                    assert (
                        np.linalg.norm(log.box_center[j] + scene.global_offset_m - truth.center[hit[0]])
                        < 0.35
                    )
        assert moved > 20  # moving objects were interpolated, not copied


def test_nan_velocities_become_zero_with_a_note(release) -> None:
    root, scenes = release
    source = get_source("nuscenes")
    logs = {log.name: log for log in source.find_logs(root, load_split(_all_scenes_split(root / "all.yaml")))}
    for scene in scenes:
        log = source.read_log(logs[scene.name])
        a = scene.annotations
        nan = np.isnan(a.velocity_nuscenes).any(axis=1)
        assert np.isfinite(log.box_velocity).all()
        keys = source.key_frame_candidates(log, 10)
        for k in keys.tolist():
            b = log.boxes(k)
            for j in range(b.start, b.stop):
                i = int(np.flatnonzero(a.token == log.box_token[j])[0])
                want = np.zeros(3) if nan[i] else a.velocity_nuscenes[i]
                np.testing.assert_allclose(log.box_velocity[j], want, atol=1e-12)
        if nan.any():
            assert any(f"{int(nan.sum())} of {len(nan)} annotations have no velocity" in n for n in log.notes)
    assert sum(int(np.isnan(s.annotations.velocity_nuscenes).any(axis=1).sum()) for s in scenes) > 0


def test_the_index_is_built_once_per_release_and_follows_the_tables(release, tmp_path: Path) -> None:
    root, scenes = release
    copy = tmp_path / "release"
    (copy / "v1.0-mini").mkdir(parents=True)
    for p in (root / "v1.0-mini").glob("*.json"):
        (copy / "v1.0-mini" / p.name).write_bytes(p.read_bytes())
    first = open_index(copy / "v1.0-mini", copy)
    assert first.seconds > 0 and [s.name for s in first.scenes] == [s.name for s in scenes]
    again = open_index(copy / "v1.0-mini", copy)
    assert again.seconds == 0 and again.folder == first.folder
    train = get_source("nuscenes").find_logs(copy, load_split("nuscenes_mini_train"))
    val = get_source("nuscenes").find_logs(copy, load_split("nuscenes_mini_val"))
    assert [log.name for log in train] == [scenes[0].name] and [log.name for log in val] == [scenes[1].name]
    assert Path(train[0].path).parent.parent == first.folder == Path(val[0].path).parent.parent
    assert (copy / "v1.0-mini" / "scene.json") in train[0].watched
    # a table changes: a new index, the old one removed
    scene_json = copy / "v1.0-mini" / "scene.json"
    rows = json.loads(scene_json.read_text())
    rows[0]["description"] = "changed"
    scene_json.write_text(json.dumps(rows, indent=0))
    changed = open_index(copy / "v1.0-mini", copy)
    assert changed.folder != first.folder and changed.seconds > 0 and not first.folder.exists()
    # an interrupted build (a temporary folder) is never used, and a damaged index is rebuilt
    (changed.folder / "index.json").write_text("{")
    rebuilt = open_index(copy / "v1.0-mini", copy)
    assert rebuilt.seconds > 0 and json.loads((rebuilt.folder / "index.json").read_text())["format"] == 1
    assert cache_dir() in rebuilt.folder.parents


def test_bad_input_fails_its_scene_only_with_one_line(tmp_path: Path) -> None:
    """Scene 0: a broken token link; 1: a missing sweep; 2: a truncated sweep; 3: clean but for a missing
    image (that frame is dropped, as for nuPlan)."""
    faults = NuScenesFaults(
        broken_links=((0, "sample_data", "ego_pose_token", 5),),
        missing_sweeps=((1, 3),),
        truncated_sweeps=((2, 7),),
        missing_images=((3, "CAM_BACK", 6),),
    )
    scenes = write_nuscenes(tmp_path / "ns", scenes=4, seconds=2.0, seed=1, points=512, image_size=(32, 18),
                            faults=faults)  # fmt: skip
    split = _all_scenes_split(tmp_path / "all.yaml")
    result = CliRunner().invoke(app, ["collect", "--source", "nuscenes", "--nuscenes-root", str(tmp_path / "ns"),
                                      "--split", str(split), "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert result.exit_code == 1, result.output
    failed = {line.split(":")[0].split()[-1]: line for line in result.output.splitlines() if "FAILED" in line}
    names = [s.name for s in scenes]
    assert set(failed) == set(names[:3]), result.output
    broken = scenes[0].broken_links[0][2]
    assert (
        "sample_data.json" in failed[names[0]]
        and broken in failed[names[0]]
        and "ego_pose_token" in failed[names[0]]
    )
    assert scenes[1].missing_files[0] in failed[names[1]] and "missing sweep file" in failed[names[1]]
    assert scenes[2].truncated_files[0] in failed[names[2]] and "truncated" in failed[names[2]]
    manifest = open_split(tmp_path / "out" / "all").manifest
    assert list(manifest.logs) == [names[3]] and manifest.logs[names[3]].dropped == {"missing_camera": 1}
    assert all(len(line) < 600 for line in failed.values())


@pytest.mark.parametrize("table", ["instance", "ego_pose", "sample_annotation"])
def test_a_missing_or_malformed_table_fails_every_scene(tmp_path: Path, table: str) -> None:
    write_nuscenes(tmp_path / "ns", scenes=2, seconds=1.0, seed=2, blobs=False)
    path = tmp_path / "ns" / "v1.0-mini" / f"{table}.json"
    split = _all_scenes_split(tmp_path / "all.yaml")
    path.unlink()
    summary = _collect(tmp_path / "ns", tmp_path / "out", split, labels=False, check_blobs=False)
    assert len(summary.failed) == 2 and not summary.done
    assert all(f"{table}.json: missing table" in why for why in summary.failed.values())
    path.write_text('[{"token": "x", "broken": ')  # present, but not JSON
    summary = _collect(tmp_path / "ns", tmp_path / "out", split, labels=False, check_blobs=False)
    assert len(summary.failed) == 2
    assert all(
        f"{table}.json: not a valid JSON list of records near byte" in why for why in summary.failed.values()
    )


def test_without_scene_json_or_with_unsafe_scene_names_the_run_does_not_start(tmp_path: Path) -> None:
    write_nuscenes(tmp_path / "ns", scenes=1, seconds=1.0, seed=2, blobs=False)
    (tmp_path / "ns" / "v1.0-mini" / "scene.json").unlink()
    result = CliRunner().invoke(app, ["collect", "--source", "nuscenes", "--nuscenes-root", str(tmp_path / "ns"),
                                      "--split", "nuscenes_mini_train", "--out", str(tmp_path / "out")])  # fmt: skip
    assert isinstance(result.exception, CollectError) and "scene.json: missing table" in str(result.exception)
    write_nuscenes(
        tmp_path / "evil", scenes=2, seconds=1.0, seed=2, blobs=False, scene_names=["../../escape", "ok"]
    )
    with pytest.raises(CollectError, match="not a plain file name"):
        _collect(tmp_path / "evil", tmp_path / "out", _all_scenes_split(tmp_path / "all.yaml"), labels=False)
    assert not (tmp_path / "escape.parquet").exists() and not list(tmp_path.glob("**/escape*"))
    with pytest.raises(CollectError, match="names nuplan logs; --source nuscenes"):
        _collect(tmp_path / "ns", tmp_path / "out", "mini", labels=False)


def test_blob_checks_and_the_metadata_only_release(release, tmp_path: Path) -> None:
    """A release without sensor folders reads as metadata: with blob checks the scenes fail with the
    nuPlan-style hint, without them they are collected."""
    root, scenes = release
    meta = tmp_path / "meta"
    (meta / "v1.0-mini").mkdir(parents=True)
    for p in (root / "v1.0-mini").glob("*.json"):
        os.symlink(p, meta / "v1.0-mini" / p.name)
    summary = _collect(meta, tmp_path / "a", "nuscenes_mini_train", labels=False)
    assert summary.failed and "--no-check-blobs --no-labels" in next(iter(summary.failed.values()))
    summary = _collect(meta, tmp_path / "b", "nuscenes_mini_train", labels=False, check_blobs=False)
    assert summary.ok and summary.frames == len(scenes[0].samples.token)


def test_category_map_is_the_lidarseg_one() -> None:
    from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES as T

    assert len(CATEGORY_CLASS) == 32
    assert {n for n, c in CATEGORY_CLASS.items() if c == T.id_of("pedestrian")} == {
        "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
        "human.pedestrian.police_officer",
    }  # fmt: skip
    assert (
        CATEGORY_CLASS["vehicle.emergency.police"]
        == CATEGORY_CLASS["animal"]
        == T.id_of("others")
        == T.background
    )
    assert CATEGORY_CLASS["flat.driveable_surface"] == 11 and CATEGORY_CLASS["static.vegetation"] == 16


def test_index_scene_files_are_plain_arrays(release) -> None:
    root, _ = release
    index = open_index(root / "v1.0-mini", root)
    arrays = read_arrays(index.scenes[0].file)
    assert set(arrays) == set(SCENE_ARRAYS) and all(a.dtype.kind in "Sbiuf" for a in arrays.values())
    with pytest.raises(SourceError, match="index file is missing"):
        get_source("nuscenes").read_log(InputLog("x", index.folder / "scenes" / "99999.arrays"))
    # a damaged file (an object dtype, an offset past the end, a truncation) is a clear error, never pickle
    data = index.scenes[0].file.read_bytes()
    for label, bad in {
        "object dtype": data.replace(b'"|S32"', b'"|O"  ', 1),
        "truncated": data[: len(data) // 2],
        "not ours": b"PK\x03\x04" + data[4:],
    }.items():
        path = index.folder / "scenes" / f"bad-{label.replace(' ', '_')}.arrays"
        path.write_bytes(bad)
        with pytest.raises(SourceError, match="index file is damaged"):
            get_source("nuscenes").read_log(InputLog("x", path))


def test_cli_synth_nuscenes_then_collect_and_splits(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "--format", "nuscenes", "--out", str(tmp_path / "ns"), "--logs", "2",
                                 "--seconds", "1", "--no-blobs", "--version", "v1.0-mini"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        tmp_path / "ns" / "v1.0-mini" / "sample_data.json"
    ).is_file() and "wrote 2 scenes" in result.output
    result = runner.invoke(app, ["collect", "--source", "nuscenes", "--nuscenes-root", str(tmp_path / "ns"),
                                 "--split", "nuscenes_mini_val", "--out", str(tmp_path / "out"), "--no-labels",
                                 "--no-check-blobs", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert list(open_split(tmp_path / "out" / "nuscenes_mini_val").manifest.logs) == ["scene-0103"]
    listing = runner.invoke(app, ["splits"]).output
    for name, count in (("nuscenes_mini_train", 8), ("nuscenes_val", 150), ("nuscenes_test", 150)):
        line = next(line for line in listing.splitlines() if line.startswith(name + " "))
        assert " nuscenes " in line and f"{count} logs" in line
    result = runner.invoke(app, ["synth", "--format", "kitti", "--out", str(tmp_path / "k")])
    assert "use one of nuplan, nuscenes" in str(result.exception)


def test_a_user_split_with_sample_tokens(release, tmp_path: Path) -> None:
    root, scenes = release
    keep = scenes[0].samples.token[[1, 3]].tolist()
    split = tmp_path / "few.yaml"
    split.write_text(yaml.safe_dump({"name": "few", "dataset": "nuscenes", "folder": "v1.0-mini",
                                     "log_names": [scenes[0].name], "tokens": keep}))  # fmt: skip
    summary = _collect(root, tmp_path / "out", split, labels=False)
    assert (
        summary.ok
        and summary.frames == 2
        and summary.dropped == {"not_in_split": len(scenes[0].samples.token) - 2}
    )
    assert [r["token"] for r in _rows(tmp_path / "out" / "few", scenes[0].name)] == keep
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"dataset": "nuscenes", "folder": "v1.0-mini", "tokens": ["0123456789abcdef"]})
    )
    with pytest.raises(SplitError, match="nuscenes tokens must be 32 lowercase hex characters"):
        load_split(bad)


def test_a_file_name_leaving_the_release_fails_its_scene(tmp_path: Path) -> None:
    scenes = write_nuscenes(tmp_path / "ns", scenes=2, seconds=1.0, seed=3, blobs=False)
    path = tmp_path / "ns" / "v1.0-mini" / "sample_data.json"
    rows = json.loads(path.read_text())
    victim = next(
        r for r in rows if r["token"] == scenes[0].sample_data.token[scenes[0].rows(LIDAR_CHANNEL)[1]]
    )
    victim["filename"] = "../../../../etc/passwd"
    path.write_text(json.dumps(rows, indent=0))
    summary = _collect(tmp_path / "ns", tmp_path / "out", _all_scenes_split(tmp_path / "all.yaml"), labels=False,
                       check_blobs=False)  # fmt: skip
    assert summary.done == [scenes[1].name] and "leaves the release folder" in summary.failed[scenes[0].name]


def test_every_broken_token_link_fails_its_own_scene_only(tmp_path: Path) -> None:
    """Scene i breaks the i-th foreign key the synthetic release can break (every link the reader follows);
    the last scene is clean. Each broken scene fails with one line naming the table file, the row's token
    and the link; the clean scene is collected; the exit status is 1."""
    links = [(table, name) for table, names in BREAKABLE_LINKS.items() for name in names]
    faults = NuScenesFaults(
        broken_links=tuple(
            (i, table, name, 0 if table in ("scene", "calibrated_sensor") else 1)
            for i, (table, name) in enumerate(links)
        )
    )
    scenes = write_nuscenes(tmp_path / "ns", scenes=len(links) + 1, seconds=1.0, seed=3, blobs=False,
                            faults=faults, version="v1.0-trainval")  # fmt: skip
    split = _all_scenes_split(tmp_path / "all.yaml", "v1.0-trainval")
    result = CliRunner().invoke(app, ["collect", "--source", "nuscenes", "--nuscenes-root", str(tmp_path / "ns"),
                                      "--split", str(split), "--out", str(tmp_path / "out"), "--no-labels",
                                      "--no-check-blobs", "--no-progress"])  # fmt: skip
    assert result.exit_code == 1, result.output
    failed = {line.split(":")[0].split()[-1]: line for line in result.output.splitlines() if "FAILED" in line}
    assert set(failed) == {s.name for s in scenes[:-1]}, result.output
    for scene, (table, name) in zip(scenes, links, strict=False):
        line = failed[scene.name]
        (broken_table, broken_field, row_token) = scene.broken_links[0]
        assert (broken_table, broken_field) == (table, name)
        # the row by its token (a scene row by its name), the link, the table file
        row = scene.name if table == "scene" else row_token
        assert f"{table}.json" in line and name in line and row in line, line
        assert len(line) < 600
    assert list(open_split(tmp_path / "out" / "all").manifest.logs) == [scenes[-1].name]


def test_a_missing_table_exits_non_zero_with_one_line_per_scene(tmp_path: Path) -> None:
    faults = NuScenesFaults(missing_tables=("sample_annotation",))
    scenes = write_nuscenes(tmp_path / "ns", scenes=2, seconds=1.0, seed=2, blobs=False, faults=faults)
    split = _all_scenes_split(tmp_path / "all.yaml")
    result = CliRunner().invoke(app, ["collect", "--source", "nuscenes", "--nuscenes-root", str(tmp_path / "ns"),
                                      "--split", str(split), "--out", str(tmp_path / "out"), "--no-labels",
                                      "--no-check-blobs", "--no-progress"])  # fmt: skip
    assert result.exit_code == 1, result.output
    # one line per scene (printed as it fails and again in the summary)
    failed = {line.split(":")[0].split()[-1]: line for line in result.output.splitlines() if "FAILED" in line}
    assert set(failed) == {s.name for s in scenes}, result.output
    assert all(
        "sample_annotation.json: missing table" in line and len(line) < 600 for line in failed.values()
    )
