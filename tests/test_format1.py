"""A split written by format version 1 (DriveEngine 0.1.0, before the dataset-agnostic format) still reads.

``tests/data/format1/mini`` was collected by DriveEngine 0.1.0 from a synthetic nuPlan log (6 key frames,
labels on OpenScene's grid) and is committed as it was written: manifest entries say ``source.kind``,
there is no ``dataset`` record, the Zarr groups have no ``class_table``/``arrays`` attributes and every
file says format version 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from driveengine.schemas import OPENSCENE_CLASSES
from driveengine.schemas.grid import GRID

from driveengine.data import FrameStream
from driveengine.evaluation.evaluate import evaluate
from driveengine.sources.nuplan.constants import CAMERA_CHANNELS
from driveengine.stats import compute_stats
from driveengine.store.dataset import open_split

FORMAT1 = Path(__file__).parent / "data" / "format1"


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    shutil.copytree(FORMAT1, tmp_path / "dataset")
    return tmp_path / "dataset" / "mini"


def test_the_fixture_is_format_1(split_dir: Path) -> None:
    data = json.loads((split_dir / "manifest.json").read_text())
    assert data["format_version"] == 1 and "dataset" not in data
    (entry,) = data["logs"].values()
    assert entry["source"]["kind"] == "nuplan" and "name" not in entry["source"]
    group = json.loads(next((split_dir / "occ").glob("*.zarr/zarr.json")).read_text())
    assert group["attributes"]["format_version"] == 1 and "class_table" not in group["attributes"]


def test_a_format_1_split_opens_with_its_frames_and_labels(split_dir: Path) -> None:
    split = open_split(split_dir)
    assert split.manifest.format_version == 1
    assert split.dataset_name == "nuplan" and split.classes == OPENSCENE_CLASSES and split.grid == GRID
    assert split.cameras == CAMERA_CHANNELS  # read from the frame shard's cams struct
    (log,) = split.logs
    assert log.entry.source.name == "nuplan" and log.entry.frames == 6
    rows = log.frames(["token", "timestamp"])
    labels = log.labels()
    assert rows.num_rows == labels.num_frames == 6
    assert labels.classes == OPENSCENE_CLASSES and labels.arrays == ("semantics", "flow", "mask_lidar")
    frame = labels.frame(3)
    assert frame.semantics.shape == GRID.shape and (frame.semantics != OPENSCENE_CLASSES.free).any()
    assert compute_stats(split_dir)["frames"] == 6


def test_a_format_1_split_streams_and_evaluates(split_dir: Path) -> None:
    stream = FrameStream(
        split_dir.parent, "mini", fields=("semantics", "flow", "mask_lidar", "token"), shuffle=False
    )
    samples = list(stream)
    assert len(samples) == 6 and samples[2]["semantics"].shape == GRID.shape
    direct = open_split(split_dir).logs[0].labels().frame(2)
    assert np.array_equal(samples[2]["semantics"], direct.semantics)
    assert np.array_equal(samples[2]["flow"], direct.flow)
    result = evaluate(split_dir, split_dir)  # a label set against itself: perfect
    assert result["completion_iou"] == 100.0  # no epsilon there (OpenScene's); class IoUs add 1e-5
    assert result["miou_present"] == pytest.approx(100.0, abs=1e-4)
