"""Pre-training tasks and data-driven labels: the architecture page's "how to add a model" recipe, done.

* A toy :class:`~driveengine.train.tasks.PretrainingTask` (a small BEV convolution over the points
  voxelised on the grid, ending in the shared :class:`~driveengine.models.heads.OccupancyHeads`) is
  registered here, trains through :func:`~driveengine.train.loop.pretrain` on a tiny collected split,
  writes its product with the checkpoint, and is unregistered: after that ``--modality toy`` is refused.
* The voxel grid and the class table come from the split: on a split whose manifest records
  Occ3D-nuScenes' table (17 classes + free 17) the model predicts 18 ids, the loss weights 18, the
  metrics name Occ3D's classes; an eval split with other labels and a checkpoint of another table are
  refused in one line.
* Training never makes data: without ``--data`` it is one line naming how to make the demo data, and
  the demo's ``--data-only`` (what ``make pretrain`` runs first) makes only what is missing.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from driveengine.schemas.classes import OCC3D_NUSCENES_CLASSES, OPENSCENE_CLASSES, ClassTable
from driveengine.schemas.grid import VoxelGrid
from stream_fixtures import SMALL_GRID, build_split
from torch import nn

from driveengine.models.heads import ModelOutputs, OccupancyHeads
from driveengine.models.lidar import bev_features
from driveengine.train.config import PretrainConfig
from driveengine.train.loop import PretrainError, pretrain
from driveengine.train.tasks import (
    Batch,
    ModelInputs,
    PretrainingTask,
    StreamOptions,
    TaskError,
    batch_tensor,
    pretraining_task,
    register_task,
    task_names,
    unregister_task,
)

pytestmark = pytest.mark.usefixtures("one_compute_thread")


# -- the toy model and its task: everything "adding a model" takes ------------------------------------


class ToyOccupancyNet(nn.Module):
    """Points -> BEV occupancy image (:func:`bev_features`) -> two 3x3 convolutions -> the shared heads."""

    def __init__(self, grid: VoxelGrid, classes: ClassTable, channels: int) -> None:
        super().__init__()
        self.grid = grid
        nz = grid.shape[2]
        self.body = nn.Sequential(
            nn.Conv2d(nz + 2, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.heads = OccupancyHeads(channels, nz, classes)

    def forward(self, points: list[torch.Tensor]) -> ModelOutputs:
        return self.heads(F.relu(self.body(bev_features(points, self.grid))))


@dataclass(frozen=True)
class ToyTask:
    """The toy model's glue: its stream fields, the model from the split's grid and classes, its inputs, the
    voxels that count (LiDAR-observed) and a product (a JSON file next to the checkpoints)."""

    channels: int
    built: list[tuple[VoxelGrid, ClassTable]] = field(default_factory=list, compare=False)
    fields: tuple[str, ...] = ("points", "semantics", "flow", "mask_lidar")

    def stream_options(self) -> StreamOptions:
        return StreamOptions()

    def build_model(self, grid: VoxelGrid, classes: ClassTable) -> nn.Module:
        self.built.append((grid, classes))
        return ToyOccupancyNet(grid, classes, self.channels)

    def inputs(self, batch: Batch, device: torch.device | None = None) -> ModelInputs:
        points = batch["points"]
        per_sample = list(points.unbind(0)) if isinstance(points, torch.Tensor) else points
        return {"points": [p.to(device) if device else p for p in per_sample if isinstance(p, torch.Tensor)]}

    def mask(self, batch: Batch, outputs: ModelOutputs) -> torch.Tensor | None:
        return batch_tensor(batch, "mask_lidar")

    def save_product(self, model: nn.Module, run_dir: Path, step: int) -> Path | None:
        path = Path(run_dir) / "toy_product.json"
        params = sum(p.numel() for p in model.parameters())
        path.write_text(json.dumps({"step": step, "parameters": params}))
        return path


#: The tasks the toy factory made (the test reads what the loop gave them).
MADE: list[ToyTask] = []


def toy_factory(config: PretrainConfig) -> ToyTask:
    task = ToyTask(channels=config.width)
    MADE.append(task)
    return task


@pytest.fixture
def toy_registered():
    MADE.clear()
    register_task("toy", toy_factory)
    yield
    unregister_task("toy")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return build_split(
        tmp_path_factory.mktemp("out"), scenes_per_log=((4,), (4,)), points=True, structured=True
    )


def _occ3d_split(out: Path, split: str = "mini"):
    """A split like :func:`build_split`'s whose manifest and Zarr groups record Occ3D-nuScenes' table."""
    import stream_fixtures

    with pytest.MonkeyPatch.context() as mp:
        table = OCC3D_NUSCENES_CLASSES
        mp.setattr(
            stream_fixtures, "create_occ", functools.partial(stream_fixtures.create_occ, classes=table)
        )
        mp.setattr(
            stream_fixtures, "DatasetInfo", functools.partial(stream_fixtures.DatasetInfo, classes=table)
        )
        return build_split(out, split=split, scenes_per_log=((4,), (4,)), points=True, structured=True)


@pytest.fixture(scope="module")
def occ3d_split(tmp_path_factory):
    return _occ3d_split(tmp_path_factory.mktemp("occ3d"))


def _config(split, tmp_path, **kw) -> PretrainConfig:
    base = dict(
        data=str(split.root), split=split.split, width=8, decoder_channels=16, stem_stride=1, output_stride=1,
        batch_size=2, lr=1e-2, warmup_steps=2, run_dir=str(tmp_path / "runs"), progress=False, eval_frames=0,
        cpu_threads=1,
    )  # fmt: skip
    base.update(kw)
    return PretrainConfig(**base)


# -- the recipe ------------------------------------------------------------------------------------------


def test_a_registered_toy_task_trains_through_pretrain_and_is_gone_after_unregistering(
    split, tmp_path, toy_registered
):
    assert task_names()[:2] == ("lidar", "camera") and "toy" in task_names()
    task = pretraining_task(_config(split, tmp_path, modality="toy"))
    assert isinstance(task, PretrainingTask) and isinstance(task, ToyTask)

    result = pretrain(_config(split, tmp_path, modality="toy", max_steps=12, eval_every=12, ckpt_every=6))
    assert result.step == 12 and [s for s, _ in result.train_loss] == list(range(1, 13))
    losses = [loss for _, loss in result.train_loss]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    # the loop gave the task the split's grid and class table
    made = MADE[-1]
    assert made.built == [(SMALL_GRID, OPENSCENE_CLASSES)]
    assert result.grid == SMALL_GRID and result.classes == OPENSCENE_CLASSES
    # evaluated with the same machinery as the built-in tasks
    assert result.eval is not None and result.eval["frames"] == 8
    assert list(result.eval["iou_per_class"]) == list(OPENSCENE_CLASSES.names[:-1])
    # the product is written with every checkpoint, from the trained model
    run = tmp_path / "runs" / "pretrain"
    product = json.loads((run / "toy_product.json").read_text())
    assert product["step"] == 12 and product["parameters"] > 0
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["config"]["modality"] == "toy" and "heads.sem_head.weight" in state["model"]
    # resuming a toy run works like any other
    again = pretrain(_config(split, tmp_path, modality="toy", max_steps=14, eval_every=0, resume="auto"))
    assert [s for s, _ in again.train_loss] == [13, 14]

    unregister_task("toy")
    assert "toy" not in task_names()
    with pytest.raises(TaskError, match=r"unknown modality 'toy': use one of lidar, camera"):
        pretrain(_config(split, tmp_path, modality="toy", max_steps=1))


def test_task_registry_refuses_duplicates_and_non_tasks(split, tmp_path, toy_registered):
    with pytest.raises(TaskError, match="'toy' is already registered"):
        register_task("toy", toy_factory)
    register_task("not-a-task", lambda config: object())  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(TaskError, match="returned a object, which lacks the PretrainingTask methods"):
            pretraining_task(_config(split, tmp_path, modality="not-a-task"))
    finally:
        unregister_task("not-a-task")


# -- the grid and the class table come from the data ---------------------------------------------------------


def test_the_class_table_of_the_split_sizes_model_loss_and_metrics(occ3d_split, tmp_path, toy_registered):
    """Occ3D-nuScenes' table (17 classes + free 17) recorded in the split: 18 predicted ids, 18 class
    weights, metrics over its 17 classes by their names; the LiDAR model follows the same table."""
    table = OCC3D_NUSCENES_CLASSES
    result = pretrain(_config(occ3d_split, tmp_path, modality="toy", max_steps=2, eval_every=2, name="toy"))
    assert MADE[-1].built == [(SMALL_GRID, table)] and result.classes == table
    state = torch.load(tmp_path / "runs" / "toy" / "last.pt", weights_only=True)
    nz = SMALL_GRID.shape[2]
    assert state["model"]["heads.sem_head.weight"].shape[0] == 18 * nz
    assert len(state["class_weights"]) == 18
    assert list(result.eval["iou_per_class"]) == list(table.names[:17])
    assert list(result.eval["near_iou_ssc"]) == [table.names[i] for i in table.foreground]

    lidar = pretrain(
        _config(occ3d_split, tmp_path, modality="lidar", max_steps=1, eval_every=1, name="lidar")
    )
    state = torch.load(tmp_path / "runs" / "lidar" / "last.pt", weights_only=True)
    assert state["model"]["heads.sem_head.weight"].shape[0] == 18 * nz
    assert lidar.eval is not None and len(lidar.eval["iou_per_class"]) == 17


@dataclass(frozen=True)
class FixedTableTask(ToyTask):
    """A task that wrongly ignores the split's class table (always OpenScene's 17 ids)."""

    def build_model(self, grid: VoxelGrid, classes: ClassTable) -> nn.Module:
        return ToyOccupancyNet(grid, OPENSCENE_CLASSES, self.channels)


def test_a_model_that_ignores_the_class_table_is_one_clear_line(occ3d_split, tmp_path):
    register_task("fixed-table", lambda config: FixedTableTask(channels=config.width))
    try:
        with pytest.raises(PretrainError) as exc:
            pretrain(_config(occ3d_split, tmp_path, modality="fixed-table", max_steps=1))
    finally:
        unregister_task("fixed-table")
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(
        "the 'fixed-table' model's 'semantics' output is (2, 17, 16, 16, 8), expected (B, 18,"
    )
    assert "class table occ3d-nuscenes (free = 17)" in message


def test_an_eval_split_with_other_labels_is_refused(split, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(split.root / split.split, root / split.split)  # OpenScene's table
    _occ3d_split(root, split="val_occ3d")  # next to it: Occ3D-nuScenes' table
    with pytest.raises(PretrainError) as exc:
        pretrain(_config(split, tmp_path, data=str(root), eval_split="val_occ3d", max_steps=1))
    message = str(exc.value)
    assert "\n" not in message and message.startswith(str(root / "val_occ3d"))
    assert "class table occ3d-nuscenes vs openscene" in message and "same settings" in message


def test_a_checkpoint_of_another_class_table_is_refused(split, occ3d_split, tmp_path):
    pretrain(_config(split, tmp_path, max_steps=1, eval_every=0, name="openscene"))
    ckpt = tmp_path / "runs" / "openscene" / "last.pt"
    with pytest.raises(PretrainError) as exc:
        pretrain(_config(occ3d_split, tmp_path, max_steps=2, eval_every=0, resume=str(ckpt)))
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{ckpt}: ")
    assert "'class_weights' is a list of 17, expected a list of 18 numbers" in message
    assert "class table occ3d-nuscenes" in message


def test_labels_outside_the_class_table_are_reported(split, tmp_path):
    """Class-weight estimation meets an id beyond the table's free id: one line, not a silent cut."""
    import shutil

    from driveengine.store.manifest import load_manifest, save_manifest

    root = tmp_path / "small_table"
    shutil.copytree(split.root / split.split, root / split.split)
    manifest = load_manifest(root / split.split)
    tiny = ClassTable(
        "tiny", ("vehicle", "background", "free"), 2, (0,), 1, ("vehicle", "background", "free")
    )
    manifest.dataset = type(manifest.dataset)(
        name=manifest.dataset.name, cameras=manifest.dataset.cameras, classes=tiny, grid=manifest.dataset.grid
    )
    save_manifest(root / split.split, manifest)
    with pytest.raises(
        PretrainError, match=r"class ids up to 16, but the split's class table tiny ends at free = 2"
    ):
        pretrain(_config(split, tmp_path, data=str(root), max_steps=1, eval_every=0))


# -- training makes no data ----------------------------------------------------------------------------------


def test_pretrain_without_data_is_one_line_naming_the_demo(tmp_path):
    with pytest.raises(PretrainError) as exc:
        pretrain(PretrainConfig(run_dir=str(tmp_path / "runs"), progress=False))
    message = str(exc.value)
    assert "\n" not in message and message.startswith("no training data: pass --data")
    assert "`make pretrain`" in message and "python -m driveengine.demo" in message

    result = subprocess.run(
        [sys.executable, "-m", "driveengine.cli", "pretrain", "--max-steps", "1", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no training data") and "make pretrain" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing synthesised, collected or trained


def test_old_configs_with_demo_dir_still_load():
    old = {**PretrainConfig(data="out").to_dict(), "demo_dir": "demo_data"}
    assert "demo_dir" not in PretrainConfig().to_dict()
    assert PretrainConfig.from_dict(old) == PretrainConfig(data="out")
    with pytest.raises(ValueError, match=r"unknown pretrain config keys: \['demo_dri'\]"):
        PretrainConfig.from_dict({**old, "demo_dri": "x"})


def test_demo_data_only_makes_just_what_is_missing(tmp_path, monkeypatch, capsys):
    """``python -m driveengine.demo --data-only`` (``make pretrain``'s first step): synthesise when the world
    is missing, collect when the split is, nothing when both exist; then the pretrain arguments."""
    from driveengine import demo

    steps: list[list[str]] = []

    def fake_step(title: str, args: list[str]) -> None:  # the real steps are the CLI commands
        steps.append(args)
        if args[0] == "synth":
            (tmp_path / "nuplan" / "splits" / demo.DEMO_SPLIT).mkdir(parents=True, exist_ok=True)
        if args[0] == "collect":
            (tmp_path / "dataset" / demo.DEMO_SPLIT).mkdir(parents=True, exist_ok=True)
            (tmp_path / "dataset" / demo.DEMO_SPLIT / "manifest.json").write_text("{}")

    monkeypatch.setattr(demo, "run_step", fake_step)
    demo.main(["--out", str(tmp_path), "--data-only", "--seed", "3"])
    assert [a[0] for a in steps] == ["synth", "collect"] and steps[0][steps[0].index("--seed") + 1] == "3"
    assert f"driveengine pretrain --data {tmp_path / 'dataset'} --split mini" in capsys.readouterr().out
    demo.main(["--out", str(tmp_path), "--data-only"])
    assert len(steps) == 2 and "already collected" in capsys.readouterr().out
    (tmp_path / "dataset" / demo.DEMO_SPLIT / "manifest.json").unlink()  # the world is there: collect only
    demo.main(["--out", str(tmp_path), "--data-only"])
    assert [a[0] for a in steps] == ["synth", "collect", "collect"]


# -- the loss follows the class table ------------------------------------------------------------------------


def test_the_loss_counts_the_tables_ids_and_its_foreground():
    from driveengine.train.loss import OccupancyLoss

    scattered = ClassTable(
        "scattered", ("road", "car", "wall", "person", "bike", "free"), 5, (1, 3, 4), 0,
        ("driveable_surface", "vehicle", "manmade", "pedestrian", "bicycle", "free"),
    )  # fmt: skip
    torch.manual_seed(0)
    shape = (2, 6, 5, 3)
    gt = torch.randint(0, 6, shape, dtype=torch.uint8)
    logits = torch.randn(2, 6, *shape[1:])
    flow, gt_flow = torch.randn(*shape, 2), torch.randn(*shape, 2)
    mask = torch.rand(shape) < 0.7
    loss = OccupancyLoss(flow_weight=1.0, classes=scattered)
    terms = loss(logits, flow, gt, gt_flow, mask)
    fg = torch.isin(gt, torch.tensor([1, 3, 4], dtype=torch.uint8)) & mask
    want_flow = (flow - gt_flow).abs()[fg].mean()
    assert torch.isclose(terms["loss_flow"], want_flow)
    target = torch.where(mask, gt.long(), torch.full_like(gt.long(), 255))
    assert torch.isclose(terms["loss_sem"], F.cross_entropy(logits, target, ignore_index=255))
    # OpenScene's table: foreground ids 0..9 found by one comparison, the same as a lookup
    openscene = OccupancyLoss()
    ids = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(openscene.is_foreground(ids), torch.isin(ids, torch.arange(10, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"class_weights has shape \(17,\); the class table occ3d-nuscenes"):
        OccupancyLoss(np.ones(17), classes=OCC3D_NUSCENES_CLASSES)
    assert OccupancyLoss(classes=OCC3D_NUSCENES_CLASSES).class_weights.shape == (18,)
