"""Pre-training on several splits at once: ``driveengine pretrain --data A --data B --weights 0.7,0.3``.

* The CLI trains on the mix of a nuPlan-like split (OpenScene's table) and a nuScenes-like one (Occ3D's
  table) on one grid: the class tables differ, so ``--classes auto`` trains on the unified table (21 ids),
  the checkpoint holds the mix's loader state and resumes it; evaluation reads every frame of both splits.
* Resume on a mix continues the same steps and the same loss curve bitwise, across an epoch boundary.
* A mix of grids, native classes over different tables, a checkpoint of one split resumed on a mix and
  wrong ``--split`` / ``--weights`` counts are each one line (exit 2 on the CLI).
* ``--data OUT/SPLIT`` names a split folder directly; ``--split`` pairs with ``--data`` in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES
from driveengine.schemas.grid import VoxelGrid
from stream_fixtures import OPENSCENE_TO_OCC3D_IDS, build_split, build_split_as

from driveengine.data import UNIFIED_CLASSES
from driveengine.train.config import DataSource, PretrainConfig, PretrainError, data_options, data_sources
from driveengine.train.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three collect outputs: ``nuplan`` (8 frames, split mini), ``nuscenes`` (6 frames, split mini_train,
    Occ3D's class table, the same grid) and ``coarse`` (another grid)."""
    root = tmp_path_factory.mktemp("pretrain_mix")
    build_split(root / "nuplan", scenes_per_log=((4,), (4,)), points=True, structured=True)
    build_split_as(
        root / "nuscenes", split="mini_train", dataset="nuscenes", classes=OCC3D_NUSCENES_CLASSES,
        id_map=OPENSCENE_TO_OCC3D_IDS, seed=1, scenes_per_log=((3,), (3,)), points=True, structured=True,
    )  # fmt: skip
    coarse = VoxelGrid((-4.0, -4.0, -2.0), (4.0, 4.0, 2.0), 1.0)
    build_split(root / "coarse", scenes_per_log=((4,),), points=True, structured=True, grid=coarse)
    return root


def _mix_config(out: Path, tmp_path: Path, **kw) -> PretrainConfig:
    base = dict(
        mix=[DataSource(str(out / "nuplan"), "mini", 0.7), DataSource(str(out / "nuscenes"), "mini_train", 0.3)],
        width=8, decoder_channels=16, stem_stride=1, output_stride=1, batch_size=2, lr=5e-3, warmup_steps=2,
        run_dir=str(tmp_path / "runs"), progress=False, eval_frames=0, cpu_threads=1, class_weight_frames=4,
    )  # fmt: skip
    base.update(kw)
    return PretrainConfig(**base)


def _cli(args: list[object], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "driveengine.cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


SMALL_MODEL = ["--width", "8", "--stem-stride", "1", "--cpu-threads", "1", "--no-progress"]


def test_cli_pretrain_trains_on_a_mix_of_two_datasets_and_resumes(data, tmp_path):
    args = [
        "pretrain", "--data", data / "nuplan", "--data", data / "nuscenes", "--split", "mini", "--split",
        "mini_train", "--weights", "0.7,0.3", "--run-dir", tmp_path / "runs", "--max-steps", "3",
        "--ckpt-every", "2", "--eval-every", "3", "--eval-frames", "0", *SMALL_MODEL,
    ]  # fmt: skip
    result = _cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pretrain: 3 steps on cpu x1" in result.stdout and "eval: mIoU" in result.stdout
    run = tmp_path / "runs" / "pretrain"
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["data"]["sources"] == (
        "nuplan/mini (8 frames, weight 0.7) + nuscenes/mini_train (6 frames, weight 0.3)"
    )
    assert state["data"]["num_samples"] == 3 * 2 and state["data"]["samples_per_epoch"] == 14
    # the class tables differ: trained on the unified table (21 ids)
    assert len(state["class_weights"]) == UNIFIED_CLASSES.free + 1
    nz = 8
    assert state["model"]["heads.sem_head.weight"].shape[0] == (UNIFIED_CLASSES.free + 1) * nz
    config = json.loads((run / "config.json").read_text())
    assert config["data"] is None and config["classes"] == "auto"
    assert [(s["split"], s["weight"]) for s in config["mix"]] == [("mini", 0.7), ("mini_train", 0.3)]
    assert PretrainConfig.from_dict(config).sources()[1] == DataSource(
        str(data / "nuscenes"), "mini_train", 0.3
    )

    # resumed from its last checkpoint (step 3) on the same mix: steps 4 and 5
    args[args.index("--max-steps") + 1] = "5"
    more = _cli([*args, "--resume", "auto"], cwd=tmp_path)
    assert more.returncode == 0, more.stdout + more.stderr
    assert "pretrain: 5 steps" in more.stdout
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 5 and state["data"]["num_samples"] == 5 * 2
    with open(run / "metrics.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:] if ",train," in line] == list(
            "12345"
        )
    # a different mix cannot resume this run: one line
    args[args.index("--weights") + 1] = "0.5,0.5"
    args[args.index("--max-steps") + 1] = "7"
    other = _cli([*args, "--resume", "auto"], cwd=tmp_path)
    assert other.returncode == 2, other.stdout + other.stderr
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "saved loader state is of another mix" in lines[0], other.stderr


def test_resume_on_a_mix_continues_the_same_losses_across_epochs(data, tmp_path):
    # 8 samples per epoch, batch 2: 4 steps an epoch; resuming after step 3 crosses into epoch 1
    full = pretrain(
        _mix_config(data, tmp_path, name="full", max_steps=6, ckpt_every=3, eval_every=0, samples_per_epoch=8)
    )
    assert full.epoch == 1 and full.classes == UNIFIED_CLASSES
    ckpt = tmp_path / "runs" / "full" / "ckpt_0000003.pt"
    resumed = pretrain(
        _mix_config(
            data, tmp_path, name="resumed", max_steps=6, ckpt_every=3, eval_every=0, samples_per_epoch=8,
            resume=str(ckpt),
        )
    )  # fmt: skip
    assert [s for s, _ in resumed.train_loss] == [4, 5, 6]
    assert resumed.train_loss == full.train_loss[3:]  # bitwise equal floats
    a = torch.load(tmp_path / "runs" / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs" / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [loss for _, loss in full.train_loss]
    assert all(np.isfinite(losses))


def test_a_mix_of_grids_is_refused_in_one_line(data, tmp_path):
    args = [
        "pretrain", "--data", data / "nuplan" / "mini", "--data", data / "coarse" / "mini", "--run-dir",
        tmp_path / "runs", "--max-steps", "1", *SMALL_MODEL,
    ]  # fmt: skip
    result = _cli(args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "voxel grids differ" in lines[0] and "16 x 16 x 8" in lines[0] and "8 x 8 x 4" in lines[0]
    assert "the 'lidar' model predicts one grid" in lines[0]
    assert not (tmp_path / "runs" / "pretrain" / "last.pt").exists()


def test_native_classes_over_different_tables_are_refused(data, tmp_path):
    with pytest.raises(PretrainError) as exc:
        pretrain(_mix_config(data, tmp_path, classes="native", max_steps=1))
    message = str(exc.value)
    assert "\n" not in message and "class tables differ" in message
    assert "class table openscene" in message and "class table occ3d-nuscenes" in message
    assert "--classes unified" in message
    with pytest.raises(PretrainError, match="--samples-per-epoch 8: only a weighted mix"):
        pretrain(_mix_config(data, tmp_path, mix=[], data=str(data / "nuplan"), samples_per_epoch=8))


def test_a_checkpoint_of_one_split_does_not_resume_a_mix(data, tmp_path):
    single = _mix_config(
        data, tmp_path, mix=[], data=str(data / "nuplan"), split="mini", max_steps=1, name="one"
    )
    pretrain(single)
    ckpt = tmp_path / "runs" / "one" / "last.pt"
    with pytest.raises(PretrainError) as exc:
        # the same split, weighted (a mix of one): the same model and table, a mix's loader state
        mix = [DataSource(str(data / "nuplan"), "mini", 1.0)]
        pretrain(_mix_config(data, tmp_path, mix=mix, max_steps=2, resume=str(ckpt)))
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{ckpt}: cannot resume")
    assert "its loader state is of one split" in message


def test_data_options_pair_splits_and_read_split_folders(data):
    nuplan, nuscenes = str(data / "nuplan"), str(data / "nuscenes")
    # one --data: the single-split config of before
    assert data_options(data_sources([nuplan], ["mini"])) == {"data": nuplan, "split": "mini", "mix": []}
    assert data_options(data_sources([nuplan])) == {"data": nuplan, "split": "mini", "mix": []}
    # OUT/SPLIT names a split folder
    assert data_sources([f"{nuscenes}/mini_train", f"{nuplan}/mini/"], weights="2,1") == (
        DataSource(nuscenes, "mini_train", 2.0),
        DataSource(nuplan, "mini", 1.0),
    )
    # --split once for all, or once per --data in order
    assert [s.split for s in data_sources([nuplan, nuplan], ["val"])] == ["val", "val"]
    assert [s.split for s in data_sources([nuplan, nuscenes], ["mini", "mini_train"])] == [
        "mini",
        "mini_train",
    ]
    assert data_options(data_sources([nuplan, nuscenes], ["mini", "mini_train"]))["data"] is None
    for splits, weights, fragment in [
        (["a", "b", "c"], None, "3 --split for 2 --data"),
        (["mini"], "0.7", "1 weights for 2 --data"),
        (["mini"], "0.7,x", "expected numbers separated by commas"),
        (["mini"], "1,0", "every weight must be a finite number > 0"),
        (["mini"], "1,nan", "every weight must be a finite number > 0"),
    ]:
        with pytest.raises(PretrainError, match=fragment):
            data_sources([nuplan, nuscenes], splits, weights)
    with pytest.raises(PretrainError, match="either as data="):
        PretrainConfig(data=nuplan, mix=[DataSource(nuplan, "mini")]).sources()
