"""Issue 13's "Done when" chain, end to end through the command line (``python -m driveengine``), as a user
runs it from a fresh clone, on tiny synthetic data:

    synth --format nuscenes -> collect --source nuscenes --grid openscene -> show -> synth + collect (nuPlan)
    -> pretrain --data <nuPlan split> --data <nuScenes split>

* ``synth --format nuscenes`` writes a v1.0 release (tables, ``.pcd.bin`` sweeps, images) that ``collect
  --source nuscenes`` turns into a split whose manifest says nuScenes, its six cameras, Occ3D's class table
  and the grid asked for; ``show`` draws one of its frames into a PNG with the six cameras.
* The nuScenes split collected on OpenScene's grid (``--grid openscene``, nuPlan's default) mixes with a
  nuPlan split: ``pretrain --data A --data B --weights 0.5,0.5`` trains on both datasets (the first global
  batches come from each), on the unified class table (the two tables differ, ``--classes auto``), with
  finite losses, and records both splits in its checkpoint.
* nuScenes collected on its own default grid (Occ3D's) does not mix with nuPlan's: the refusal is one line
  naming both grids and ``collect --grid``, exit 2, and nothing is trained.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES
from driveengine.schemas.grid import GRID_PRESETS
from PIL import Image

from driveengine.data import UNIFIED_CLASSES, MixedStream, MixSource
from driveengine.sources.nuscenes.constants import CAMERA_CHANNELS
from driveengine.store.dataset import open_split

TINY = ["--logs", "2", "--seconds", "2", "--points", "1024", "--image-size", "48x27"]
TINY_MODEL = [
    "--width",
    "8",
    "--stem-stride",
    "1",
    "--batch-size",
    "2",
    "--cpu-threads",
    "1",
    "--no-progress",
]


def _run(args: list[object], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m driveengine ARGS`` in ``cwd`` with its own index cache; bounded by ``timeout`` seconds."""
    env = {**os.environ, "DRIVEENGINE_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "driveengine", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both synthetic releases and their collected splits: ``ds_nuscenes/nuscenes_mini_train`` on OpenScene's
    grid, ``ds_nuscenes_occ3d/nuscenes_mini_train`` on the nuScenes default (Occ3D's), ``ds_nuplan/mini``."""
    cwd = tmp_path_factory.mktemp("e2e")
    out = _ok(_run(["synth", "--format", "nuscenes", "--out", "nuscenes", "--seed", "1", *TINY], cwd))
    assert "wrote 2 scenes" in out
    _ok(_run(["synth", "--out", "nuplan", "--seed", "0", *TINY], cwd))
    for target, extra in (("ds_nuscenes", ["--grid", "openscene"]), ("ds_nuscenes_occ3d", [])):
        out = _ok(_run(["collect", "--source", "nuscenes", "--nuscenes-root", "nuscenes", "--split",
                        "nuscenes_mini_train", "--out", target, "--no-progress", *extra], cwd))  # fmt: skip
        assert "1 logs done, 0 skipped (up to date), 0 failed" in out, out
    out = _ok(
        _run(["collect", "--root", "nuplan", "--split", "mini", "--out", "ds_nuplan", "--no-progress"], cwd)
    )
    assert "2 logs done" in out and "0 failed" in out, out
    return cwd


def test_collected_nuscenes_split_is_nuscenes_on_the_grid_asked_for(work: Path) -> None:
    split = open_split(work / "ds_nuscenes" / "nuscenes_mini_train")
    assert split.dataset_name == "nuscenes" and split.cameras == CAMERA_CHANNELS
    assert split.classes == OCC3D_NUSCENES_CLASSES and split.grid == GRID_PRESETS["openscene"]
    assert list(split.manifest.logs) == ["scene-0061"]  # the one mini_train scene of the two synthesised
    rows = split.log("scene-0061").frames().to_pylist()
    assert len(rows) == 4 and {r["source"] for r in rows} == {"nuscenes"}
    assert all(sorted(r["cams"]) == sorted(CAMERA_CHANNELS) for r in rows)
    labels = split.log("scene-0061").labels()
    semantics = np.asarray(labels.semantics[0])
    # the labels hold classes other than free (objects, others), within the table
    assert semantics.shape == GRID_PRESETS["openscene"].shape
    assert int(semantics.max()) == OCC3D_NUSCENES_CLASSES.free and len(np.unique(semantics)) > 2
    default = open_split(work / "ds_nuscenes_occ3d" / "nuscenes_mini_train")
    assert default.grid == GRID_PRESETS["occ3d"] and default.classes == OCC3D_NUSCENES_CLASSES


def test_show_draws_a_nuscenes_frame(work: Path) -> None:
    out = _ok(_run(["show", "ds_nuscenes/nuscenes_mini_train", "--log", "scene-0061", "--frame", "1", "--out",
                    "frame.png"], work))  # fmt: skip
    assert "frame.png" in out
    image = np.asarray(Image.open(work / "frame.png").convert("RGB"))
    assert image.shape[0] >= 400 and image.shape[1] > image.shape[0]  # BEV next to the six cameras
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # a picture, not a blank canvas


def test_pretrain_on_nuplan_and_nuscenes(work: Path) -> None:
    data = ["--data", "ds_nuplan/mini", "--data", "ds_nuscenes/nuscenes_mini_train"]
    out = _ok(_run(["pretrain", *data, "--weights", "0.5,0.5", "--run-dir", "runs", "--max-steps", "2",
                    "--eval-every", "0", "--seed", "0", *TINY_MODEL], work))  # fmt: skip
    assert "pretrain: 2 steps on cpu x1" in out, out
    run = work / "runs" / "pretrain"
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["data"]["num_samples"] == 4
    assert state["data"]["sources"] == (
        "nuplan/mini (8 frames, weight 0.5) + nuscenes/nuscenes_mini_train (4 frames, weight 0.5)"
    )
    # OpenScene's and Occ3D's tables differ: trained on the unified table
    assert len(state["class_weights"]) == UNIFIED_CLASSES.free + 1
    assert json.loads((run / "config.json").read_text())["classes"] == "auto"
    with open(run / "metrics.csv") as f:
        train = [r for r in csv.DictReader(f) if r["phase"] == "train"]
    assert [int(r["step"]) for r in train] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) for r in train)
    # the two steps' samples are the mix's first four, and they come from both datasets
    mix = MixedStream(
        [MixSource(str(work / "ds_nuplan"), "mini", 0.5), MixSource(str(work / "ds_nuscenes"), "nuscenes_mini_train", 0.5)],
        fields=("semantics",), seed=0, global_batch_size=2, classes="auto", rank=0, world_size=1,
    )  # fmt: skip
    first = [s["dataset"] for _, s in zip(range(4), iter(mix), strict=False)]
    assert sorted(set(first)) == ["nuplan", "nuscenes"], first


def test_a_mix_of_grids_is_refused_in_one_line_naming_collect_grid(work: Path) -> None:
    result = _run(["pretrain", "--data", "ds_nuplan/mini", "--data", "ds_nuscenes_occ3d/nuscenes_mini_train",
                   "--run-dir", "runs_refused", "--max-steps", "1", *TINY_MODEL], work)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "voxel grids differ" in line and "--grid" in line, line
    assert GRID_PRESETS["openscene"].describe() in line and GRID_PRESETS["occ3d"].describe() in line
    assert not (work / "runs_refused" / "pretrain" / "last.pt").exists()
