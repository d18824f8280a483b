"""One synthetic world written in both formats (nuPlan ``synthesize`` and nuScenes ``write_nuscenes`` with the
same seed) and collected by both sources: the same geometry in both datasets' frame rows, up to the
conventions the synth module documents (nuScenes' global origin is shifted by ``global_offset_m``, its ego
origin lies ``EGO_Z_M`` lower, its LIDAR_TOP is turned by -90 degrees about z)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from driveengine.splits import load_split

from driveengine.collect.config import CollectConfig
from driveengine.collect.runner import collect
from driveengine.geometry import quaternion_to_matrix, wrap_angle
from driveengine.sources import get_source
from driveengine.store.dataset import open_split
from driveengine.synth import synthesize
from driveengine.synth.nuscenes import write_nuscenes
from driveengine.synth.world import EGO_Z_M

SEED = 9
SECONDS = 3.0
RAYS = 2048


def test_both_formats_give_the_same_geometry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIVEENGINE_CACHE", str(tmp_path / "cache"))
    (log,) = synthesize(
        tmp_path / "nuplan", logs=1, seconds=SECONDS, seed=SEED, points=RAYS, image_size=(32, 18)
    )
    (scene,) = write_nuscenes(tmp_path / "nuscenes", scenes=1, seconds=SECONDS, seed=SEED, points=RAYS,
                              image_size=(32, 18))  # fmt: skip
    split = tmp_path / "all.yaml"
    split.write_text(yaml.safe_dump({"name": "all", "dataset": "nuscenes", "folder": "v1.0-mini"}))
    a = collect(CollectConfig.from_options(source="nuplan", root=tmp_path / "nuplan", out=tmp_path / "out",
                                           split="mini", sample_interval=1, labels=False, progress=False),
                echo=lambda _: None)  # fmt: skip
    b = collect(CollectConfig.from_options(source="nuscenes", root=tmp_path / "nuscenes", out=tmp_path / "out",
                                           split=str(split), labels=False, progress=False), echo=lambda _: None)  # fmt: skip
    assert a.ok and b.ok
    nuplan = {
        r["timestamp"]: r
        for r in open_split(tmp_path / "out" / "mini").log(log.log_name).frames().to_pylist()
    }
    nuscenes = open_split(tmp_path / "out" / "all").log(scene.name).frames().to_pylist()
    offset = scene.global_offset_m
    track_of = dict(zip(scene.instances.token.tolist(), scene.world.tracks.token[scene.instances.track_index].tolist(),
                        strict=True))  # fmt: skip
    common = boxes = 0
    for ns in nuscenes:
        npl = nuplan.get(ns["timestamp"])
        if npl is None:  # nuPlan's key-frame grid starts where all 8 cameras have an image
            continue
        common += 1
        # ego poses: nuScenes global = world global - offset, ego origin EGO_Z_M lower
        np.testing.assert_allclose(np.array(ns["ego2global_translation"]) + offset,
                                   np.array(npl["ego2global_translation"]) - [0, 0, EGO_Z_M], atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(ns["ego2global_rotation"], npl["ego2global_rotation"], atol=1e-12)
        # the same LiDAR: its origin EGO_Z_M higher above nuScenes' ego origin, its axes turned by -90 deg
        np.testing.assert_allclose(np.array(ns["lidar2ego_translation"]) - [0, 0, EGO_Z_M],
                                   npl["lidar2ego_translation"], atol=1e-9)  # fmt: skip
        r_ns = np.array(ns["lidar2ego"])[:3, :3]
        r_np = np.array(npl["lidar2ego"])[:3, :3]
        np.testing.assert_allclose(r_ns, r_np @ np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]), atol=1e-9)
        # boxes by track (nuScenes instance -> world track = nuPlan track): same box, z EGO_Z_M higher
        theirs = {t: box for t, box in zip(npl["anns"]["track_tokens"], npl["anns"]["gt_boxes"], strict=True)}
        ours = {
            track_of[t]: box
            for t, box in zip(ns["anns"]["track_tokens"], ns["anns"]["gt_boxes"], strict=True)
        }
        assert set(ours) == set(theirs) and ours
        rot = quaternion_to_matrix(ns["ego2global_rotation"])
        lift = rot.T @ [0.0, 0.0, EGO_Z_M]
        for t, box in ours.items():
            other = np.array(theirs[t])
            np.testing.assert_allclose(np.array(box[:3]) - lift, other[:3], atol=1e-6)
            np.testing.assert_allclose(box[3:6], other[3:6], atol=1e-9)
            assert abs(wrap_angle(box[6] - other[6])) < 1e-9
            boxes += 1
    assert common >= len(nuscenes) - 1 and boxes > 50
    # the points of a key frame through both sources' readers, in their ego frames
    ns_source, np_source = get_source("nuscenes"), get_source("nuplan")
    (inp,) = ns_source.find_logs(tmp_path / "nuscenes", load_split(split))
    ns_log = ns_source.read_log(inp)
    np_log = np_source.read_log(np_source.find_logs(tmp_path / "nuplan", load_split("mini"))[0])
    for k in ns_source.key_frame_candidates(ns_log, 10)[1:3].tolist():
        j = int(np.flatnonzero(np_log.sweep_timestamp_us == ns_log.sweep_timestamp_us[k])[0])
        path_ns = tmp_path / "nuscenes" / ns_log.sweep_lidar_path[k]
        path_np = log.sensor_root / np_log.sweep_lidar_path[j]
        p_ns = ns_source.points_ego(path_ns.read_bytes(), str(path_ns), ns_log.ego_from_lidar)
        p_np = np_source.points_ego(path_np.read_bytes(), str(path_np), np_log.ego_from_lidar)
        assert p_ns.shape == p_np.shape and len(p_ns) > 500
        np.testing.assert_allclose(p_ns[:, :3] - [0, 0, EGO_Z_M], p_np[:, :3], atol=3e-3)
        np.testing.assert_array_equal(p_ns[:, 3], p_np[:, 3])
