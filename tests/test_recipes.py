"""The architecture page's "how to add ..." recipes, each done for real on a small example.

* a dataset: a toy source (two cameras, points as ``.npy`` files, every sweep a key frame) registered
  here collects with labels and streams, without touching anything outside this file;
* a label array, a loader field: see the tests below.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from driveengine.schemas.classes import OPENSCENE_CLASSES
from driveengine.schemas.grid import VoxelGrid
from driveengine.splits import SplitDef
from PIL import Image

from driveengine.collect.config import CollectConfig, RunOptions, SourceSelection
from driveengine.collect.frames import FrameOptions
from driveengine.collect.runner import collect
from driveengine.data import FrameStream
from driveengine.errors import SourceError
from driveengine.geometry import yaw_to_quaternion
from driveengine.labels.generator import LabelConfig
from driveengine.sources import register_source, unregister_source
from driveengine.sources.base import InputLog, logs_in_folder
from driveengine.sources.logdata import LogData
from driveengine.store.dataset import open_split

TOY_CAMERAS = ("FRONT", "BACK")
TOY_CATEGORIES = ("vehicle", "pedestrian")
TOY_GRID = VoxelGrid((-8.0, -8.0, -2.0), (8.0, 8.0, 2.0), 0.5)


class ToySource:
    """A made-up dataset: ``<root>/logs/<name>.json`` (poses, one box, two cameras) and
    ``<root>/blobs/<name>/{lidar/<i>.npy, <CAM>/<i>.jpg}``; points are (N, 4) float32 in the ego frame."""

    name = "toy"
    dataset = "toy"
    description = "toy logs for the add-a-dataset recipe"
    root_option = "--toy-root"
    cameras = TOY_CAMERAS
    class_table = OPENSCENE_CLASSES

    def find_logs(self, root: Path, split: SplitDef, input_dir: Path | None = None) -> list[InputLog]:
        return logs_in_folder(
            Path(input_dir or Path(root) / "logs"), ".json", split, "expected <root>/logs/*.json"
        )

    def default_blob_root(self, root: Path, split: SplitDef) -> Path:
        return Path(root) / "blobs"

    def blob_folders(self, blob_root: Path, log: InputLog) -> list[Path]:
        return [blob_root / log.name / part for part in ("lidar", *TOY_CAMERAS)]

    def read_log(self, log: InputLog) -> LogData:
        d = json.loads(Path(log.path).read_text())
        n, c = len(d["t"]), len(TOY_CAMERAS)
        pose = np.asarray(d["pose"], dtype=np.float64)  # (N, 4): x, y, z, yaw
        one = np.arange(n + 1, dtype=np.int64)
        zeros = np.zeros(n + 1, dtype=np.int64)
        return LogData(
            source=self.name, path=str(log.path), log_name=log.name, log_token="t0", vehicle_name="toy",
            location="nowhere", map_version="none", lidar_token="l0", ego_from_lidar=np.eye(4),
            sweep_token=np.array([f"{log.name}-{i}" for i in range(n)]),
            sweep_timestamp_us=np.asarray(d["t"], dtype=np.int64),
            sweep_lidar_path=np.array([f"{log.name}/lidar/{i}.npy" for i in range(n)]),
            sweep_scene=np.zeros(n, np.int32), ego_translation=pose[:, :3].copy(),
            ego_rotation=yaw_to_quaternion(pose[:, 3]), ego_velocity=np.zeros((n, 3)),
            ego_acceleration=np.zeros((n, 3)), ego_angular_rate=np.zeros((n, 3)),
            camera_token=np.array(["cf", "cb"]), camera_translation=np.zeros((c, 3)),
            camera_rotation=np.tile([0.5, -0.5, 0.5, -0.5], (c, 1)),
            camera_intrinsic=np.tile([[20.0, 0, 16], [0, 20.0, 8], [0, 0, 1]], (c, 1, 1)),
            camera_distortion=np.zeros((c, 5)), camera_size=np.tile([32, 16], (c, 1)).astype(np.int32),
            image_path=np.array([[f"{log.name}/{cam}/{i}.jpg" for cam in TOY_CAMERAS] for i in range(n)]),
            image_timestamp_us=np.repeat(np.asarray(d["t"], np.int64)[:, None], c, axis=1),
            box_offsets=one, box_token=np.array([f"b{i}" for i in range(n)]),
            box_track_token=np.array(["car"] * n), box_category=np.zeros(n, np.int8),
            box_center=np.asarray(d["box"], dtype=np.float64), box_size=np.tile([4.0, 2.0, 1.5], (n, 1)),
            box_yaw=np.zeros(n), box_velocity=np.tile([1.0, 0.0, 0.0], (n, 1)), box_confidence=np.ones(n),
            scene_token=np.array(["s0"]), scene_name=np.array(["scene"]), scene_roadblock_ids=[[]],
            traffic_light_offsets=zeros, traffic_light_lane_connector_id=np.zeros(0, np.int64),
            traffic_light_status=np.zeros(0, np.int8), tag_offsets=zeros, tag_type=np.zeros(0, str),
            tag_agent_track_token=np.zeros(0, str), camera_channels=TOY_CAMERAS, categories=TOY_CATEGORIES,
            category_class=np.array([OPENSCENE_CLASSES.id_of(c) for c in TOY_CATEGORIES], np.uint8),
        )  # fmt: skip

    def key_frame_candidates(self, log: LogData, sample_interval: int) -> np.ndarray:
        return np.arange(log.num_sweeps, dtype=np.int64)

    def lidar_defect(self, path: Path) -> str | None:
        size = path.stat().st_size
        return None if size > 128 else f"{size} bytes, too short for an .npy point cloud"

    def points_ego(self, data: bytes, path: str, ego_from_lidar: np.ndarray) -> np.ndarray:
        try:
            points = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise SourceError(path, f"not an .npy array ({exc})") from None
        return points.astype(np.float32)


def _write_toy_world(root: Path, logs: int = 2, sweeps: int = 6) -> dict[str, np.ndarray]:
    """Logs of a car 5 m ahead of a slowly moving ego, with a flat ground; returns each log's points."""
    rng = np.random.default_rng(0)
    points = {}
    (root / "logs").mkdir(parents=True)
    for k in range(logs):
        name = f"toy-{k}"
        t = 1_000_000 * (k + 1) + np.arange(sweeps) * 500_000
        pose = np.stack(
            [np.arange(sweeps) * 0.5, np.zeros(sweeps), np.zeros(sweeps), np.zeros(sweeps)], axis=1
        )
        box = np.stack([pose[:, 0] + 5.0, np.zeros(sweeps), np.full(sweeps, 0.75)], axis=1)
        (root / "logs" / f"{name}.json").write_text(json.dumps({"t": t.tolist(), "pose": pose.tolist(),
                                                                "box": box.tolist()}))  # fmt: skip
        for i in range(sweeps):
            ground = np.c_[rng.uniform(-7, 7, (300, 2)), np.full(300, -0.3)]
            car = np.c_[rng.uniform(4.0, 6.0, 80), rng.uniform(-0.9, 0.9, 80), rng.uniform(0.2, 1.4, 80)]
            pts = np.c_[np.r_[ground, car], rng.uniform(0, 1, 380)].astype(np.float32)
            path = root / "blobs" / name / "lidar" / f"{i}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, pts)
            points[f"{name}-{i}"] = pts
            for c, cam in enumerate(TOY_CAMERAS):
                img = root / "blobs" / name / cam / f"{i}.jpg"
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((16, 32, 3), 60 * c + i, np.uint8)).save(img, quality=95)
    return points


@pytest.fixture
def toy_source() -> Iterator[None]:
    register_source("toy", ToySource)
    yield
    unregister_source("toy")


def test_add_a_dataset(toy_source: None, tmp_path: Path) -> None:
    points = _write_toy_world(tmp_path / "toy")
    config = CollectConfig(
        source=SourceSelection("toy", tmp_path / "toy", SplitDef(name="all", folder="logs", dataset="toy")),
        run=RunOptions(out=tmp_path / "out", progress=False),
        frames=FrameOptions(),
        labels=LabelConfig(grid=TOY_GRID, window_s=1.0),
    )
    summary = collect(config, echo=lambda _: None)
    assert summary.ok and summary.frames == 12, summary.format()
    split = open_split(tmp_path / "out" / "all")
    assert split.dataset_name == "toy" and split.cameras == TOY_CAMERAS and split.grid == TOY_GRID
    log = split.log("toy-1")
    assert log.entry.source.name == "toy" and log.labels().classes == OPENSCENE_CLASSES
    stream = FrameStream(
        tmp_path / "out", "all", fields=("semantics", "points", "images", "token"), shuffle=False
    )
    samples = {s["token"]: s for s in stream}
    assert len(samples) == 12
    sample = samples["toy-1-3"]
    np.testing.assert_array_equal(sample["points"], points["toy-1-3"])  # read through the toy source
    assert sample["images"].shape[:2] == (2, 3)  # the dataset's two cameras
    car = sample["semantics"][
        TOY_GRID.shape[0] // 2 + 10, TOY_GRID.shape[1] // 2, 5
    ]  # x = 5.25 m, z = 0.75 m
    assert car == OPENSCENE_CLASSES.id_of("vehicle")  # labelled by the generator from the toy box


# -- a label array: registered once in schemas/occ.py, written by a producer, served by the loader -------


class HeightProducer:
    """The generator's labels plus a made-up label array: ``toy_height``, per voxel the number of
    occupied voxels at or below it in its column (uint8)."""

    kind = "toy-height"
    grid = TOY_GRID

    def to_dict(self) -> dict:
        return {"kind": self.kind, "recipe": LabelConfig(grid=TOY_GRID, window_s=1.0).to_dict()}

    def check(self, source) -> None:
        pass

    def write(self, job) -> dict:
        from driveengine.schemas.occ import REQUIRED_ARRAYS

        from driveengine.labels.generator import LabelGenerator, source_point_loader
        from driveengine.store.occ import create_occ

        gen = LabelGenerator(
            job.log, job.key_sweeps, lambda k: None, LabelConfig(grid=TOY_GRID, window_s=1.0)
        )
        gen.load_points = source_point_loader(job.source, job.log, job.blob_root, gen.stats)
        arrays = (*REQUIRED_ARRAYS, "toy_height")
        with create_occ(job.out, len(job.key_sweeps), generator=self.to_dict(), grid=TOY_GRID,
                        classes=job.classes, arrays=arrays, storage=job.storage) as writer:  # fmt: skip
            for frame in gen.frames():
                height = np.cumsum(frame.semantics != job.classes.free, axis=2).astype(np.uint8)
                writer.append(semantics=frame.semantics, flow=frame.flow, mask_lidar=frame.mask_lidar,
                              toy_height=height)  # fmt: skip
        return {"frames": len(job.key_sweeps)}


@pytest.fixture
def toy_height_array() -> Iterator[None]:
    from driveengine.schemas.occ import LABEL_ARRAYS, LabelArray, register_label_array

    register_label_array(
        LabelArray("toy_height", np.dtype(np.uint8), (), 0, False, "occupied voxels at or below")
    )
    yield
    LABEL_ARRAYS.pop("toy_height")


def test_add_a_label_array(toy_source: None, toy_height_array: None, tmp_path: Path) -> None:
    _write_toy_world(tmp_path / "toy")
    config = CollectConfig(
        source=SourceSelection("toy", tmp_path / "toy", SplitDef(name="all", folder="logs", dataset="toy")),
        run=RunOptions(out=tmp_path / "out", progress=False),
        labels=HeightProducer(),
    )
    assert collect(config, echo=lambda _: None).ok
    labels = open_split(tmp_path / "out" / "all").log("toy-0").labels()
    assert labels.arrays == ("semantics", "flow", "mask_lidar", "toy_height")
    stream = FrameStream(
        tmp_path / "out", "all", fields=("semantics", "toy_height", "token"), history=1, shuffle=False
    )
    sample = next(iter(stream))
    expected = np.cumsum(sample["semantics"] != OPENSCENE_CLASSES.free, axis=2)
    np.testing.assert_array_equal(sample["toy_height"], expected)  # served by the loader, no loader change
    assert sample["history_toy_height"].shape == (1, *TOY_GRID.shape)


# -- a loader field: one register_field call ------------------------------------------------------------


def test_add_a_loader_field(toy_source: None, tmp_path: Path) -> None:
    from driveengine.data.fields import SampleField, register_field, unregister_field

    class EgoX(SampleField):
        """The ego's global x position, m (from the ``ego2global`` column)."""

        name = "ego_x"

        def columns(self, options):
            return ("ego2global",)

        def read_frame(self, log, row):
            return {"ego_x": float(log.column("ego2global")[row][0][3])}

    _write_toy_world(tmp_path / "toy", logs=1)
    config = CollectConfig(
        source=SourceSelection("toy", tmp_path / "toy", SplitDef(name="all", folder="logs", dataset="toy")),
        run=RunOptions(out=tmp_path / "out", progress=False),
    )
    assert collect(config, echo=lambda _: None).ok
    register_field(EgoX())
    try:
        stream = FrameStream(tmp_path / "out", "all", fields=("ego_x", "token"), shuffle=False)
        assert [s["ego_x"] for s in stream] == [0.5 * i for i in range(6)]  # the toy ego moves 0.5 m a frame
    finally:
        unregister_field("ego_x")
    with pytest.raises(Exception, match="ego_x"):
        FrameStream(tmp_path / "out", "all", fields=("ego_x",))
