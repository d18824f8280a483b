"""Any grid, end to end: ``collect --grid`` presets and custom grids are recorded with the data (manifest,
Zarr attributes, recipe) and enter the config hash; the loader, ``evaluate`` (with its masks), export,
``show`` and pre-training read the grid from the data; a bad grid is one line. The camera pre-training
uses the labels' ``mask_camera`` as its loss and metric mask.

One tiny synthetic log (1.5 s: 3 key frames, 1024-ray sweeps, 64 x 36 images) is collected per grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from driveengine.schemas.classes import OPENSCENE_CLASSES
from driveengine.schemas.grid import GRID_PRESETS, VoxelGrid, parse_grid

from driveengine.collect.config import CollectError
from driveengine.collect.runner import CollectConfig, collect
from driveengine.data import FrameStream
from driveengine.errors import DriveEngineError
from driveengine.evaluation.evaluate import EvaluationError, evaluate
from driveengine.store.dataset import open_split
from driveengine.store.manifest import load_manifest
from driveengine.synth import synthesize

#: A custom grid small enough for the model tests (80 x 80 x 10 voxels).
SMALL = "-16,-16,-2,16,16,2:0.4"
FREE = OPENSCENE_CLASSES.free

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture(scope="module")
def nuplan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grids")
    synthesize(root, logs=1, seconds=1.5, seed=3, points=1024, image_size=(64, 36), key_frames_only=True)
    return root


def _collect(nuplan: Path, out: Path, **options) -> Path:
    summary = collect(
        CollectConfig.from_options(source="nuplan", root=nuplan, out=out, progress=False, **options),
        echo=lambda _: None,
    )
    assert summary.ok, summary.format()
    return out / "mini"


def _invoke(*args: str) -> tuple[int, str]:
    """``driveengine ARGS`` in this process: (exit code, output); a DriveEngineError gives 2 as in main()."""
    from typer.testing import CliRunner

    from driveengine.cli import app

    result = CliRunner().invoke(app, list(args))
    if isinstance(result.exception, DriveEngineError):
        return 2, str(result.exception)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def small(nuplan: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log collected on the custom grid SMALL (the openscene recipe otherwise: mask_camera on)."""
    return _collect(nuplan, tmp_path_factory.mktemp("small") / "out", grid=SMALL)


def _recorded_grid(split_dir: Path):
    """(manifest dataset grid, manifest recipe grid, Zarr attribute grid, semantics array shape)."""
    manifest = load_manifest(split_dir)
    (entry,) = manifest.logs.values()
    group = zarr.open_group(str(split_dir / entry.occ), mode="r")
    return (
        manifest.dataset.grid,
        VoxelGrid.from_dict(entry.labels["recipe"]["grid"]),
        VoxelGrid.from_dict(dict(group.attrs)["grid"]),
        group["semantics"].shape,
    )


@pytest.mark.parametrize("preset", ["occ3d", "fine"])
def test_a_preset_is_recorded_and_read_back_by_the_loader(nuplan: Path, tmp_path: Path, preset: str) -> None:
    grid = GRID_PRESETS[preset]
    split_dir = _collect(nuplan, tmp_path / "out", grid=preset)
    dataset_grid, recipe_grid, attr_grid, shape = _recorded_grid(split_dir)
    assert dataset_grid == recipe_grid == attr_grid == grid
    assert shape == (3, *grid.shape)
    split = open_split(split_dir)
    assert split.grid == grid and split.logs[0].labels().grid == grid
    stream = FrameStream(
        tmp_path / "out", "mini", fields=("semantics", "mask_camera", "token"), shuffle=False
    )
    assert stream.grid == grid
    samples = list(stream)
    assert len(samples) == 3 and all(s["semantics"].shape == grid.shape for s in samples)
    assert all(s["mask_camera"].shape == grid.shape and s["mask_camera"].any() for s in samples)
    assert all((s["semantics"] != FREE).sum() > 100 for s in samples)  # labels, not an empty grid


def test_the_grid_enters_the_config_hash_and_a_split_never_mixes_grids(nuplan: Path, tmp_path: Path) -> None:
    split_dir = _collect(nuplan, tmp_path / "out", grid="occ3d")
    before = load_manifest(split_dir).logs
    (occ3d_entry,) = before.values()
    # the same grid again: up to date, nothing redone
    summary = collect(CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path / "out", grid="occ3d",
                                                 progress=False), echo=lambda _: None)  # fmt: skip
    assert summary.ok and not summary.done and len(summary.skipped) == 1, summary.format()
    # another grid into the same split: refused in one line, the split untouched
    with pytest.raises(DriveEngineError) as info:
        collect(CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path / "out", grid="fine",
                                           progress=False), echo=lambda _: None)  # fmt: skip
    message = str(info.value)
    assert "\n" not in message and "grid" in message and "--overwrite" in message, message
    assert load_manifest(split_dir).logs == before
    # --overwrite redoes it on the new grid, with another config hash
    summary = collect(CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path / "out", grid="fine",
                                                 overwrite=True, progress=False), echo=lambda _: None)  # fmt: skip
    assert summary.ok and len(summary.done) == 1, summary.format()
    (fine_entry,) = load_manifest(split_dir).logs.values()
    assert fine_entry.config_hash != occ3d_entry.config_hash
    assert _recorded_grid(split_dir)[0] == GRID_PRESETS["fine"]
    # a preset and the same grid written as a range are one grid (one recipe, one hash)
    same = _collect(nuplan, tmp_path / "same", grid="-50,-50,-5,50,50,3:0.25")
    (same_entry,) = load_manifest(same).logs.values()
    assert same_entry.labels["recipe"] == fine_entry.labels["recipe"]
    assert same_entry.config_hash == fine_entry.config_hash


def test_a_custom_grid_is_read_by_evaluate_export_and_show(small: Path, tmp_path: Path) -> None:
    from driveengine.export.openscene import export_split
    from driveengine.viz.bev import show_frame

    grid = parse_grid(SMALL)
    assert _recorded_grid(small)[0] == grid and _recorded_grid(small)[3] == (3, 80, 80, 10)
    log = open_split(small).logs[0]
    labels = log.labels().read(0, 3)
    # evaluate: the collected split against itself is perfect on its own grid
    result = evaluate(small, small, mask="lidar", workers=1)
    assert result["completion_iou"] == 100.0 and result["frames"] == 3
    assert result["voxels"] == int(labels["mask_lidar"].sum())
    # export: OpenScene v1.0 files whose flat indices are on the split's grid; evaluate reads them back with it
    out = tmp_path / "export"
    list(export_split(small, out))
    exported = out / "occupancy"
    result = evaluate(exported, small, mask="none", grid=grid, workers=1)
    assert (
        result["completion_iou"] == 100.0
        and result["miou_present"] == pytest.approx(100.0, abs=1e-3)
        and result["frames"] == 3
    )
    with pytest.raises(EvaluationError, match="grid") as info:  # the default grid is not the data's
        evaluate(exported, small, mask="none", workers=1)
    assert "\n" not in str(info.value)
    # show: a picture of the custom grid
    png = show_frame(small, log.name, 1, tmp_path / "frame.png", camera="none", size_px=300)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_evaluate_masks_count_the_voxels_of_the_chosen_masks(
    small: Path, nuplan: Path, tmp_path: Path
) -> None:
    """``evaluate --mask lidar|camera|both|none`` restricts the metrics to those ground-truth voxels: the
    counted voxels and the completion IoU equal a direct numpy computation on the arrays."""
    pred = _collect(nuplan, tmp_path / "pred", grid=SMALL, label_window_s=0.0)
    gt = open_split(small).logs[0].labels().read(0, 3)
    p = open_split(pred).logs[0].labels().read(0, 3)["semantics"]
    masks = {
        "lidar": gt["mask_lidar"],
        "camera": gt["mask_camera"],
        "both": gt["mask_lidar"] & gt["mask_camera"],
        "none": np.ones_like(gt["mask_lidar"]),
    }
    results = {}
    for name, mask in masks.items():
        result = evaluate(pred, small, mask=name, workers=1)
        po, go = (p != FREE)[mask], (gt["semantics"] != FREE)[mask]
        tp, fp, fn = np.sum(po & go), np.sum(po & ~go), np.sum(~po & go)
        assert result["mask"] == name and result["voxels"] == int(mask.sum())
        assert result["completion_iou"] == pytest.approx(100.0 * tp / (tp + fp + fn))
        results[name] = result["voxels"]
    assert results["both"] < min(results["lidar"], results["camera"]) < results["none"]
    # a ground truth without mask_camera: --mask camera is one line
    no_cam = _collect(nuplan, tmp_path / "nocam", grid=SMALL, label_camera_mask=False)
    with pytest.raises(EvaluationError, match="mask_camera") as info:
        evaluate(pred, no_cam, mask="camera", workers=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "grid, why",
    [
        ("-16,-16,-2,16,16,2:0.3", "whole number of voxels"),
        ("-16,-16,-2,16,16:0.4", "six corner coordinates"),
        ("-16,-16,-2,16,16,2", "x0,y0,z0,x1,y1,z1:voxel in metres"),
        ("16,-16,-2,-16,16,2:0.4", "range_max_m must exceed range_min_m"),
        ("-16,-16,-2,16,16,2:0", "voxel_size_m > 0"),
        ("-16,-16,-2,16,16,nan:0.4", "finite"),
        ("-500,-500,-50,500,500,50:0.05", "more than the 64000000 allowed"),
        ("openscen", "not a preset or a range"),
    ],
)
def test_a_bad_grid_is_one_line(nuplan: Path, tmp_path: Path, grid: str, why: str) -> None:
    with pytest.raises(CollectError, match=why) as info:
        CollectConfig.from_options(source="nuplan", root=nuplan, out=tmp_path / "out", grid=grid)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--grid") and repr(grid) in message
    code, output = _invoke(
        "collect", "--nuplan-root", str(nuplan), "--out", str(tmp_path / "out"), "--grid", grid
    )
    assert code == 2 and why in output and "\n" not in output.strip(), output
    assert not (tmp_path / "out").exists()


# -- pre-training on the data's grid, the camera task on the labels' mask_camera ---------------------------


def _pretrain_config(split_dir: Path, tmp_path: Path, modality: str):
    from driveengine.train.config import PretrainConfig

    return PretrainConfig(
        data=str(split_dir.parent), split=split_dir.name, modality=modality, width=8, decoder_channels=8,
        batch_size=2, max_steps=1, eval_every=1, eval_frames=2, ckpt_every=0, run_dir=str(tmp_path / "runs"),
        name=modality, progress=False, device="cpu", cpu_threads=1,
        **({"image_size": (64, 36), "lift_voxel_size_m": 0.8} if modality == "camera" else {}),
    )  # fmt: skip


def test_lidar_pretraining_takes_the_grid_from_the_data(small: Path, tmp_path: Path) -> None:
    from driveengine.train.loop import pretrain

    summary = pretrain(_pretrain_config(small, tmp_path, "lidar"))
    assert summary.step == 1 and summary.grid == parse_grid(SMALL)
    assert np.isfinite(summary.train_loss[0][1]) and summary.eval["frames"] == 2


def test_camera_pretraining_uses_the_labels_mask_camera(
    small: Path, nuplan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from driveengine.train import tasks
    from driveengine.train.loop import pretrain

    config = _pretrain_config(small, tmp_path, "camera")
    task = tasks.pretraining_task(config)
    assert task.mask_camera and "mask_camera" in task.fields
    # the loss and the metrics see the stored mask, not the model's own visibility
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = tasks.CameraTask.mask

    def spy(self, batch, outputs):
        mask = original(self, batch, outputs)
        seen.append((mask, tasks.batch_tensor(batch, "mask_camera"), outputs["visible"]))
        return mask

    monkeypatch.setattr(tasks.CameraTask, "mask", spy)
    summary = pretrain(config)
    assert summary.step == 1 and summary.grid == parse_grid(SMALL) and summary.eval["frames"] == 2
    assert len(seen) >= 2  # the training step and the evaluation
    for mask, stored, visible in seen:
        assert mask.dtype == torch.bool and torch.equal(mask.cpu(), stored.bool().cpu())
        assert not torch.equal(mask.cpu(), visible.cpu().expand_as(mask))  # occlusion-aware: not the model's
    assert seen[0][1].shape == (2, *parse_grid(SMALL).shape) and seen[0][1].any()  # a batch of two frames
    # a split without mask_camera: the model's visibility (and mask_lidar), as before
    no_cam = _collect(nuplan, tmp_path / "nocam", grid=SMALL, label_camera_mask=False)
    task = tasks.pretraining_task(_pretrain_config(no_cam, tmp_path, "camera"))
    assert not task.mask_camera and "mask_camera" not in task.fields


def test_recipe_from_a_split_rebuilds_its_labels_exactly(small: Path, nuplan: Path, tmp_path: Path) -> None:
    from driveengine.labels.recipe import load_recipe, recipe_from_split, recipe_yaml

    recipe = recipe_from_split(small)
    assert recipe.grid == parse_grid(SMALL) and recipe.camera_mask and recipe.whole_track
    rebuilt = _collect(nuplan, tmp_path / "again", recipe_from=small)
    (a,), (b,) = load_manifest(small).logs.values(), load_manifest(rebuilt).logs.values()
    assert a.labels["recipe"] == b.labels["recipe"] and a.config_hash == b.config_hash
    assert a.checksums[a.occ] == b.checksums[b.occ]  # the same label bytes
    # the recipe as a file loads back to the same settings
    path = tmp_path / "mine.yaml"
    path.write_text(recipe_yaml(recipe))
    assert load_recipe(path).to_dict() == recipe.to_dict()
    assert VoxelGrid.from_dict(json.loads(json.dumps(recipe.to_dict()))["grid"]) == parse_grid(SMALL)
