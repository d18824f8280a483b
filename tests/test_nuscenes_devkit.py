"""The official nuscenes-devkit (its own cached venv, numpy < 2: tests/nuscenes_oracle.py) as the oracle of
the nuScenes source: it loads the synthetic tables and agrees with our frames and sweeps on ego poses,
boxes (centre, size, heading; the sweeps' interpolated ones too) and box velocities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from driveengine.splits import load_split

from driveengine.collect.config import CollectConfig
from driveengine.collect.runner import collect
from driveengine.geometry import invert_transform, quaternion_to_matrix, transform_points
from driveengine.sources import get_source
from driveengine.store.dataset import open_split
from driveengine.synth.nuscenes import write_nuscenes


@pytest.mark.slow
def test_the_devkit_agrees_with_our_frames_and_sweeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nuscenes_oracle import DevkitUnavailable, devkit_dump

    monkeypatch.setenv("DRIVEENGINE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ns"
    write_nuscenes(root, scenes=2, seconds=4.0, seed=11, points=1024, image_size=(32, 18))
    try:
        dump = devkit_dump(root, "v1.0-mini", tmp_path / "dump.json")
    except DevkitUnavailable as exc:
        pytest.skip(str(exc))
    assert dump["numpy"].startswith("1.")
    split = tmp_path / "all.yaml"
    split.write_text(yaml.safe_dump({"name": "all", "dataset": "nuscenes", "folder": "v1.0-mini"}))
    source = get_source("nuscenes")
    compared_boxes = interpolated = 0
    for inp in source.find_logs(root, load_split(split)):
        log = source.read_log(inp)
        lidar = log.global_from_ego() @ log.ego_from_lidar
        for k, sd_token in enumerate(log.sweep_sample_data_token.tolist()):
            d = dump["sample_data"][sd_token]
            assert d["channel"] == "LIDAR_TOP" and d["timestamp"] == log.sweep_timestamp_us[k]
            np.testing.assert_allclose(log.ego_translation[k], d["ego_translation"], atol=1e-9)
            np.testing.assert_allclose(log.ego_rotation[k], d["ego_rotation"], atol=1e-12)
            np.testing.assert_allclose(log.ego_from_lidar[:3, 3], d["cs_translation"], atol=1e-12)
            sensor_from_global = invert_transform(lidar[k])
            b = log.boxes(k)
            assert sorted(log.box_token[b]) == sorted(d["boxes"]), "the devkit's get_boxes, same annotations"
            for j in range(b.start, b.stop):
                box = d["boxes"][str(log.box_token[j])]
                centre = transform_points(sensor_from_global, log.box_center[j][None])[0]
                np.testing.assert_allclose(centre, box["center"], atol=1e-6)
                heading = sensor_from_global[:3, :3] @ [np.cos(log.box_yaw[j]), np.sin(log.box_yaw[j]), 0.0]
                np.testing.assert_allclose(heading, quaternion_to_matrix(box["rotation"])[:, 0], atol=1e-6)
                np.testing.assert_allclose(log.box_size[j], np.array(box["wlh"])[[1, 0, 2]], atol=1e-12)
                assert box["name"] == log.categories[log.box_category[j]]
                compared_boxes += 1
                interpolated += int(not d["is_key_frame"])
    assert compared_boxes > 500 and interpolated > 300
    # frames: poses and velocities (the devkit's NaN is 0 in our rows)
    summary = collect(CollectConfig.from_options(source="nuscenes", root=root, out=tmp_path / "out",
                                                 split=str(split), labels=False, progress=False),
                      echo=lambda _: None)  # fmt: skip
    assert summary.ok
    nan_seen = 0
    samples = {tok: s for s in dump["scenes"] for tok in s["samples"]}
    key_sd = {
        v["sample_token"]: v
        for v in dump["sample_data"].values()
        if v["is_key_frame"] and v["channel"] == "LIDAR_TOP"
    }
    for committed in open_split(tmp_path / "out" / "all").logs:
        for row in committed.frames().to_pylist():
            assert samples[row["token"]]["name"] == committed.name
            d = key_sd[row["token"]]
            np.testing.assert_allclose(row["ego2global_translation"], d["ego_translation"], atol=1e-9)
            rot = quaternion_to_matrix(row["ego2global_rotation"])
            for tok, v in zip(row["anns"]["instance_tokens"], row["anns"]["gt_velocity_3d"], strict=True):
                want = np.array([np.nan if x is None else x for x in dump["annotations"][tok]["velocity"]])
                if np.isnan(want).any():
                    nan_seen += 1
                    assert v == [0.0, 0.0, 0.0]
                else:
                    np.testing.assert_allclose(rot @ np.array(v), want, atol=1e-6)
    assert nan_seen > 0
