"""The OpenScene v1.1 reader: restricted unpickling, and metadata back into global-frame LogData."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_collect_frames import make_log, nuplan_select

from driveengine.collect.frames import FrameOptions, build_frame_table
from driveengine.errors import SourceError, UnsafePickleError
from driveengine.export.openscene import rows_to_openscene
from driveengine.geometry import quaternion_to_matrix
from driveengine.sources.openscene.reader import read_openscene_log


class _RunsAShellCommand:
    """A pickle payload that would run ``touch <marker>`` if unpickled with plain pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _metadata_file(tmp_path: Path, **make_kw) -> tuple[Path, object, np.ndarray]:
    log = make_log(**make_kw)
    opts = FrameOptions(split="mini", check_blobs=False)
    sel = nuplan_select(log, opts, None)
    frames = rows_to_openscene(build_frame_table(log, sel, opts).to_pylist())
    path = tmp_path / f"{log.log_name}.pkl"
    path.write_bytes(pickle.dumps(frames[::-1], protocol=pickle.HIGHEST_PROTOCOL))  # unsorted on purpose
    return path, log, sel.key_sweeps


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"token": _RunsAShellCommand(marker)}]))
    with pytest.raises(UnsafePickleError, match="system") as info:
        read_openscene_log(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # Plain pickle would have run it: the payload is real.
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_not_a_list_of_frames_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"token": "a"}))
    with pytest.raises(SourceError, match="list of frame dicts"):
        read_openscene_log(path)
    path.write_bytes(pickle.dumps([{"token": "a"}]))
    with pytest.raises(SourceError, match="lacks keys"):
        read_openscene_log(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(SourceError, match="not a valid pickle"):
        read_openscene_log(path)


def test_metadata_goes_back_to_the_global_frame(tmp_path: Path) -> None:
    path, truth, keys = _metadata_file(tmp_path, n=120)
    log = read_openscene_log(path)
    assert log.source == "openscene" and log.num_sweeps == len(keys)
    np.testing.assert_array_equal(log.sweep_timestamp_us, truth.sweep_timestamp_us[keys])
    np.testing.assert_array_equal(log.sweep_token, truth.sweep_token[keys])
    np.testing.assert_allclose(log.ego_translation, truth.ego_translation[keys])
    np.testing.assert_allclose(log.ego_velocity, truth.ego_velocity[keys])
    np.testing.assert_allclose(log.ego_from_lidar, truth.ego_from_lidar)
    for i, s in enumerate(keys.tolist()):
        a, b = log.boxes(i), truth.boxes(s)
        np.testing.assert_allclose(log.box_center[a], truth.box_center[b], atol=1e-6)
        np.testing.assert_allclose(np.cos(log.box_yaw[a] - truth.box_yaw[b]), 1.0, atol=1e-12)
        # gt_velocity_3d was written in the lidar frame (OpenScene's); it comes back global.
        np.testing.assert_allclose(log.box_velocity[a], truth.box_velocity[b], atol=1e-9)
        assert log.box_track_token[a].tolist() == truth.box_track_token[b].tolist()
        red = log.traffic_light_status[log.traffic_lights(i)] == 2
        assert red.tolist() == (truth.traffic_light_status[truth.traffic_lights(s)] == 2).tolist()
    np.testing.assert_allclose(
        quaternion_to_matrix(log.camera_rotation), quaternion_to_matrix(truth.camera_rotation), atol=1e-12
    )
    assert log.image_path.tolist() == truth.image_path[keys].tolist()
    assert log.scene_name.tolist() == truth.scene_name.tolist()


def test_openscene_scene_prefix_is_stripped(tmp_path: Path) -> None:
    path, truth, _ = _metadata_file(tmp_path, n=60, scenes=1)
    frames = pickle.loads(path.read_bytes())
    for f in frames:
        f["scene_name"] = "log-0017-" + str(truth.scene_name[0])
        f.pop("lidar2ego")  # older files: rebuilt from lidar2ego_rotation / _translation
    path.write_bytes(pickle.dumps(frames))
    log = read_openscene_log(path)
    assert log.scene_name.tolist() == [str(truth.scene_name[0])]
    np.testing.assert_allclose(log.ego_from_lidar, truth.ego_from_lidar, atol=1e-12)


# -- malformed fields, bad calibration, non-finite ego poses -------------------------------------------------


def _frames(tmp_path: Path, n: int = 60) -> tuple[Path, list[dict]]:
    path, _, _ = _metadata_file(tmp_path, n=n)
    return path, pickle.loads(path.read_bytes())  # our own file: plain pickle is fine here


def _cam(frame: dict, channel: str = "CAM_F0") -> dict:
    return frame["cams"][channel]


MALFORMED = [
    # (what to break, the key named, what the message says was expected)
    (lambda f: f.update(timestamp="1620000000000000"), "timestamp holds str '1620000000000000'", "an integer"),
    (lambda f: f.update(timestamp=None), "timestamp holds NoneType None", "an integer"),
    (lambda f: f.update(token=17), "frame 0: token holds int 17", "a string"),
    (lambda f: f.update(log_name=["a"]), "log_name holds a list of 1", "a string"),
    (lambda f: f.update(can_bus="0 0 0 1 0 0 0"), "can_bus holds str", "18 numbers"),
    (lambda f: f.update(can_bus=np.zeros(17)), "can_bus holds an array of float64 with shape (17,)", "18 numbers"),
    (lambda f: f.update(can_bus=[None] * 18), "can_bus holds a list of 18", "18 numbers"),
    (lambda f: f.update(roadblock_ids="1001 2001"), "roadblock_ids holds str", "a list of roadblock id strings"),
    (lambda f: f.update(roadblock_ids=[1001]), "roadblock_ids holds a list of 1", "a list of roadblock id"),
    (lambda f: f.update(cams=[]), "cams holds a list of 0", "a dict of camera channel -> camera dict"),
    (lambda f: f["cams"].update(CAM_F0="x"), "cams holds a dict of", "a dict of camera channel"),
    (lambda f: _cam(f).update(data_path=None), "cams['CAM_F0']['data_path'] holds NoneType None", "a string"),
    (lambda f: _cam(f).update(cam_intrinsic="K"), "cams['CAM_F0']['cam_intrinsic'] holds str 'K'", "a 3x3 camera"),
    (lambda f: _cam(f).pop("sensor2lidar_rotation"), "cams['CAM_F0']['sensor2lidar_rotation'] is missing", ""),
    (lambda f: _cam(f).update(distortion=[0, 0, 0]), "cams['CAM_F0']['distortion'] holds a list of 3", "5 numbers"),
    (lambda f: f.update(traffic_lights=[(1, True, 3)]), "traffic_lights holds a list of 1",
     "a list of (lane_connector_id, is_red) pairs"),
    (lambda f: f.update(traffic_lights=[("lane", True)]), "traffic_lights holds a list of 1",
     "a list of (lane_connector_id, is_red) pairs"),
    (lambda f: f.update(anns=[]), "anns holds a list of 0", "a dict of box arrays"),
    (lambda f: f["anns"].update(gt_boxes=None), "anns['gt_boxes'] holds NoneType None", "3 boxes of 7 numbers"),
    (lambda f: f["anns"].update(gt_boxes=f["anns"]["gt_boxes"][:, :6]),
     "anns['gt_boxes'] holds an array of float64 with shape (3, 6)", "3 boxes of 7 numbers"),
    (lambda f: f["anns"].update(gt_names=[None] * len(f["anns"]["gt_names"])), "anns['gt_names'] holds a list",
     "a list of category names"),
    (lambda f: f["anns"].update(track_tokens=f["anns"]["track_tokens"][:-1]), "anns['track_tokens'] holds",
     "3 tokens, one per gt_names entry"),
    (lambda f: f["anns"].pop("gt_velocity_3d"), "anns['gt_velocity_3d'] is missing", ""),
    (lambda f: f.pop("lidar2ego") is not None and f.pop("lidar2ego_rotation"),
     "lidar2ego (or lidar2ego_rotation) is missing", ""),
]  # fmt: skip


@pytest.mark.parametrize(("breaks", "names", "expects"), MALFORMED)
def test_malformed_fields_are_one_clear_error(tmp_path: Path, breaks, names: str, expects: str) -> None:
    path, frames = _frames(tmp_path)
    frames.sort(key=lambda f: f["timestamp"])  # frame 0 is the first: it has anns and every camera
    target = frames[0]
    assert len(target["anns"]["gt_names"]) == 3 and "CAM_F0" in target["cams"]
    breaks(target)
    path.write_bytes(pickle.dumps(frames, protocol=4))
    with pytest.raises(SourceError) as info:
        read_openscene_log(path)
    message = str(info.value)
    assert message.startswith(f"{path}: frame 0"), message
    token = target["token"]
    if isinstance(token, str):
        assert f"frame 0 (token {token!r})" in message
    assert names in message and f"expected {expects}" in message if expects else names in message, message
    assert "please report" not in message and not isinstance(info.value, UnsafePickleError)


@pytest.mark.parametrize(
    ("breaks", "words"),
    [
        (lambda f: _cam(f).update(sensor2lidar_rotation=np.zeros((3, 3))),
         "cams['CAM_F0']['sensor2lidar_rotation'] [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]] is not a "
         "rotation matrix"),
        (lambda f: _cam(f).update(sensor2lidar_rotation=np.full((3, 3), np.nan)),
         "cams['CAM_F0']['sensor2lidar_rotation'] holds an array of float64 with shape (3, 3), expected a finite"),
        (lambda f: _cam(f).update(sensor2lidar_translation=np.array([np.inf, 0, 0])),
         "cams['CAM_F0']['sensor2lidar_translation'] [inf, 0.0, 0.0] is not finite"),
        (lambda f: _cam(f).update(cam_intrinsic=np.diag([0.0, 1000.0, 1.0])),
         "cams['CAM_F0']['cam_intrinsic'] [[0.0, 0.0, 0.0], [0.0, 1000.0, 0.0], [0.0, 0.0, 1.0]] is not a camera "
         "matrix"),
        (lambda f: _cam(f).update(cam_intrinsic=np.diag([1000.0, np.nan, 1.0])), "is not a camera matrix"),
        (lambda f: _cam(f).update(distortion=np.array([0, np.nan, 0, 0, 0])),
         "cams['CAM_F0']['distortion'] [0.0, nan, 0.0, 0.0, 0.0] is not finite"),
        (lambda f: f.update(lidar2ego=np.zeros((4, 4))), "lidar2ego[:3, :3] [[0.0, 0.0, 0.0]"),
        (lambda f: f.pop("lidar2ego") is not None and f.update(lidar2ego_rotation=[0.0, 0.0, 0.0, 0.0]),
         "lidar2ego_rotation [0.0, 0.0, 0.0, 0.0] is not a rotation (quaternion norm 0)"),
        (lambda f: f.pop("lidar2ego") is not None and f.update(lidar2ego_translation=[0.0, np.nan, 0.0]),
         "lidar2ego_translation [0.0, nan, 0.0] is not finite"),
    ],
)  # fmt: skip
def test_bad_calibration_is_refused_naming_frame_key_and_value(tmp_path: Path, breaks, words: str) -> None:
    path, frames = _frames(tmp_path)
    frames.sort(key=lambda f: f["timestamp"])
    breaks(frames[0])
    path.write_bytes(pickle.dumps(frames, protocol=4))
    with pytest.raises(SourceError) as info:
        read_openscene_log(path)
    message = str(info.value)
    assert message.startswith(f"{path}: frame 0 (token {frames[0]['token']!r}): "), message
    assert words in message, message
    assert "calibration is corrupt" in message


def test_non_finite_ego_poses_flow_through_without_warnings(tmp_path: Path) -> None:
    """A NaN position, an infinite one or a zero quaternion in can_bus stays as it is (the frame stage drops
    and counts those frames); the boxes of those frames come out non-finite; no numpy warning."""
    path, frames = _frames(tmp_path)
    frames.sort(key=lambda f: f["timestamp"])
    frames[1]["can_bus"][0] = np.nan
    frames[2]["can_bus"][1] = np.inf
    frames[3]["can_bus"][3:7] = 0.0
    path.write_bytes(pickle.dumps(frames, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = read_openscene_log(path)
    assert log.num_sweeps == len(frames)
    assert np.isnan(log.ego_translation[1, 0]) and log.ego_translation[2, 1] == np.inf
    assert (log.ego_rotation[3] == 0).all()
    assert np.isfinite(log.ego_translation[[0, 4]]).all() and np.isfinite(log.box_center[log.boxes(0)]).all()
    for i in (1, 3):
        if log.box_offsets[i + 1] > log.box_offsets[i]:
            assert not np.isfinite(log.box_center[log.boxes(i)]).all()
