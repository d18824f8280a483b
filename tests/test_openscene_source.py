"""The OpenScene v1.1 reader: restricted unpickling, and metadata back into global-frame LogData."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_collect_frames import make_log

from driveengine.collect.frames import FrameOptions, build_frame_table, select_frames
from driveengine.errors import SourceError, UnsafePickleError
from driveengine.geometry import quaternion_to_matrix
from driveengine.sources.openscene import read_openscene_log
from driveengine.store.legacy import rows_to_openscene


class _RunsAShellCommand:
    """A pickle payload that would run ``touch <marker>`` if unpickled with plain pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _metadata_file(tmp_path: Path, **make_kw) -> tuple[Path, object, np.ndarray]:
    log = make_log(**make_kw)
    opts = FrameOptions(split="mini", check_blobs=False)
    sel = select_frames(log, opts, None)
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
