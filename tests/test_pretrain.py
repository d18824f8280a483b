"""LiDAR-to-occupancy pre-training: model pieces, loss, learning on a tiny split, checkpoint/resume."""

from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from driveengine.schemas.classes import FREE
from stream_fixtures import SMALL_GRID, build_split

from driveengine.data import FrameStream
from driveengine.evaluation.metrics import OccupancyMetrics
from driveengine.models.lidar import LidarOccupancyNet, bev_features
from driveengine.models.resnet import ResNet
from driveengine.train.config import PretrainConfig
from driveengine.train.loop import pretrain
from driveengine.train.loss import IGNORE_INDEX, OccupancyLoss, class_weights_from_counts

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return build_split(
        tmp_path_factory.mktemp("out"), scenes_per_log=((4,), (4,)), points=True, structured=True
    )


def _config(split, tmp_path, **kw) -> PretrainConfig:
    base = dict(
        data=str(split.root), split=split.split, width=8, decoder_channels=16, stem_stride=1, output_stride=1,
        batch_size=2,
        lr=5e-3, warmup_steps=3, run_dir=str(tmp_path / "runs"), progress=False, eval_frames=0, cpu_threads=1,
    )  # fmt: skip
    base.update(kw)
    return PretrainConfig(**base)


@pytest.mark.parametrize("depth,params", [(18, 11_176_512), (50, 23_508_032)])
def test_resnet_matches_torchvision_layout(depth, params):
    net = ResNet(depth)
    assert sum(p.numel() for p in net.parameters()) == params  # torchvision's count without ``fc``
    names = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.weight"} <= names
    assert "layer2.0.downsample.0.weight" in names and "layer2.0.downsample.1.weight" in names
    feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == list(net.out_channels)


def test_bev_features_bin_points_on_the_grid():
    pts = torch.tensor(
        [[0.1, 0.1, 0.1, 100.0], [0.2, 0.3, -1.9, 50.0], [4.0, 0.0, 0.0, 1.0], [-4.0, -4.0, -2.0, 255.0]]
    )
    bev = bev_features([pts], SMALL_GRID)
    nx, ny, nz = SMALL_GRID.shape
    assert bev.shape == (1, nz + 2, nx, ny)
    # (0.1, 0.1, 0.1) -> voxel (8, 8, 4); (0.2, 0.3, -1.9) -> (8, 8, 0); x = 4.0 is outside (half-open).
    assert bev[0, 4, 8, 8] == 1 and bev[0, 0, 8, 8] == 1 and bev[0, :nz].sum() == 3
    assert torch.isclose(bev[0, nz, 8, 8], torch.tensor(75.0 / 255.0))
    assert torch.isclose(bev[0, nz + 1, 8, 8], torch.log1p(torch.tensor(2.0)))
    assert bev[0, 0, 0, 0] == 1  # the range minimum is inside


@pytest.mark.parametrize("output_stride", [1, 2])
def test_model_output_shapes(output_stride):
    model = LidarOccupancyNet(
        SMALL_GRID, depth=18, width=8, decoder_channels=16, stem_stride=2, output_stride=output_stride
    )
    out = model([torch.rand(30, 4) * 6 - 3, torch.rand(5, 4)])
    assert out["semantics"].shape == (2, FREE + 1, *SMALL_GRID.shape)
    assert out["flow"].shape == (2, *SMALL_GRID.shape, 2)
    sem, _ = LidarOccupancyNet.predict(out)
    assert sem.dtype == torch.uint8 and int(sem.max()) <= FREE
    if output_stride == 2:  # one prediction per 2 x 2 block of voxel columns
        assert torch.equal(sem[:, 0::2, 0::2], sem[:, 1::2, 1::2])


def test_loss_ignores_unobserved_voxels_and_flows_off_objects():
    torch.manual_seed(0)
    shape = (1, *SMALL_GRID.shape)
    logits = torch.randn(1, FREE + 1, *SMALL_GRID.shape)
    flow = torch.randn(*shape, 2)
    gt = torch.full(shape, FREE, dtype=torch.uint8)
    gt[0, :4] = 0
    gt_flow = torch.zeros(*shape, 2)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0, :8] = True
    loss = OccupancyLoss(flow_weight=1.0)
    a = loss(logits, flow, gt, gt_flow, mask)
    changed_logits, changed_flow = logits.clone(), flow.clone()
    changed_logits[:, :, 8:] += 5 * torch.randn_like(changed_logits[:, :, 8:])  # unobserved voxels
    changed_flow[0, 4:] += 3.0  # free voxels: no flow target
    b = loss(changed_logits, changed_flow, gt, gt_flow, mask)
    assert torch.equal(a["loss"], b["loss"])
    expected_flow = flow[0, :4].abs().mean()
    assert torch.isclose(a["loss_flow"], expected_flow)
    assert IGNORE_INDEX > FREE
    w = class_weights_from_counts(np.array([10] + [0] * 15 + [1000]))
    assert w[0] > w[FREE] and np.isclose(w[[0, FREE]].mean(), 1.0)


def _constant_predictor_metrics(split) -> dict:
    """Metrics of predicting the most frequent observed class everywhere, on the training frames."""
    stream = FrameStream(split.root, split.split, fields=("semantics", "mask_lidar"), shuffle=False)
    samples = list(stream)
    counts = sum(np.bincount(s["semantics"][s["mask_lidar"]], minlength=FREE + 1) for s in samples)
    best = int(np.argmax(counts))
    metrics = OccupancyMetrics(grid=SMALL_GRID)
    for s in samples:
        metrics.update(np.full_like(s["semantics"], best), s["semantics"], mask=s["mask_lidar"])
    return metrics.compute()


def test_pretraining_learns_the_training_frames(split, tmp_path):
    result = pretrain(_config(split, tmp_path, max_steps=40, eval_every=40, ckpt_every=0))
    losses = [loss for _, loss in result["train_loss"]]
    assert len(losses) == 40 and result["step"] == 40
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    constant = _constant_predictor_metrics(split)
    assert result["eval"]["frames"] == 8
    assert result["eval"]["miou_present"] > constant["miou_present"] + 25
    assert result["eval"]["iou_per_class"]["vehicle"] > 5.0  # the foreground class is picked up
    with open(tmp_path / "runs" / "pretrain" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["phase"] == "train"] == list(range(1, 41))
    assert next(r for r in rows if r["phase"] == "eval")["miou"] != ""
    # ckpt_every=0 means "only at the end": the run still leaves its final checkpoint
    assert result["checkpoint"] and Path(result["checkpoint"]).name == "ckpt_0000040.pt"
    assert (tmp_path / "runs" / "pretrain" / "last.pt").exists()


def test_resume_continues_the_same_steps_and_loss_curve(split, tmp_path):
    full = pretrain(_config(split, tmp_path, name="full", max_steps=6, ckpt_every=3, eval_every=0))
    ckpt = tmp_path / "runs" / "full" / "ckpt_0000003.pt"
    assert ckpt.exists() and (tmp_path / "runs" / "full" / "last.pt").exists()
    resumed = pretrain(
        _config(split, tmp_path, name="resumed", max_steps=6, ckpt_every=3, eval_every=0, resume=str(ckpt))
    )
    assert resumed["step"] == 6
    assert [s for s, _ in resumed["train_loss"]] == [4, 5, 6]
    assert resumed["train_loss"] == full["train_loss"][3:]  # bitwise equal floats
    a = torch.load(tmp_path / "runs" / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs" / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_in_the_same_run_truncates_the_csv(split, tmp_path):
    cfg = _config(split, tmp_path, name="auto", max_steps=4, ckpt_every=2, eval_every=0)
    pretrain(cfg)
    stale = tmp_path / "runs" / "auto" / ".last.pt.0123456789ab.tmp"  # what a run killed mid-save leaves
    stale.write_bytes(b"part of a checkpoint")
    again = pretrain(
        _config(split, tmp_path, name="auto", max_steps=4, ckpt_every=2, eval_every=0, resume="auto")
    )
    assert again["train_loss"] == []  # the run had finished: nothing left to do
    assert not stale.exists()  # the resumed run removed it
    with open(tmp_path / "runs" / "auto" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_bad_checkpoint_is_reported(split, tmp_path):
    from driveengine.train.loop import PretrainError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainError, match=r"bad\.pt: unreadable checkpoint"):
        pretrain(_config(split, tmp_path, max_steps=1, resume=str(bad)))
    with pytest.raises(PretrainError, match="no such checkpoint"):
        pretrain(_config(split, tmp_path, max_steps=1, resume=str(tmp_path / "missing.pt")))


# -- hostile and wrong checkpoints ------------------------------------------------------------------


class _WritesMarker:
    """Pickles as a call of ``open(marker, "w")``: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plain_types(value, where="checkpoint"):
    """Every (path, type name) in ``value`` that is not a tensor or a plain type."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _plain_types(v, f"{where}[{k!r}]")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _plain_types(v, f"{where}[{i}]")]
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return []
    return [(where, type(value).__name__)]


@pytest.fixture(scope="module")
def checkpoint(split, tmp_path_factory) -> Path:
    """The last.pt of a 2-step run (read-only: tests copy what they change)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    pretrain(_config(split, tmp, max_steps=2, ckpt_every=2, eval_every=0))
    return tmp / "runs" / "pretrain" / "last.pt"


def test_checkpoints_hold_only_tensors_and_plain_types(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    assert _plain_types(state) == []
    tuples = [k for k, v in state["optimizer"]["param_groups"][0].items() if isinstance(v, tuple)]
    assert tuples == ["betas"]  # torch's own layout; everything of ours is a list
    assert state["format"] == 1 and state["step"] == 2 and isinstance(state["rng"], torch.Tensor)
    assert isinstance(state["class_weights"], list) and len(state["class_weights"]) == FREE + 1
    assert state["config"]["width"] == 8 and state["data"]["num_samples"] == state["micro_in_epoch"] * 2


def _run_cli(args, cwd, timeout=300):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "driveengine.cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _cli_pretrain_args(split, tmp_path, resume):
    return [
        "pretrain", "--data", split.root, "--split", split.split, "--run-dir", tmp_path / "runs", "--max-steps", "1",
        "--width", "8", "--stem-stride", "1", "--cpu-threads", "1", "--no-progress", "--resume", resume,
    ]  # fmt: skip


def test_resume_refuses_a_checkpoint_that_would_run_code(split, checkpoint, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = _WritesMarker(marker)  # a real torch checkpoint whose model entry runs open()
    torch.save(state, evil)
    # the attack is real: the loading of the old code (weights_only=False) creates the marker
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    result = _run_cli(_cli_pretrain_args(split, tmp_path, evil), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert str(evil) in lines[0] and "refused checkpoint" in lines[0] and "open" in lines[0]
    assert "nothing from the file was run" in lines[0]
    assert not marker.exists()

    # a raw pickle (torch's legacy format) and `--resume auto` with a planted last.pt are refused too
    from driveengine.train.loop import PretrainError

    raw = tmp_path / "raw.pt"
    with raw.open("wb") as f:
        pickle.dump({"model": _WritesMarker(marker)}, f, protocol=2)
    with pytest.raises(PretrainError, match=r"raw\.pt: refused checkpoint"):
        pretrain(_config(split, tmp_path, max_steps=1, resume=str(raw)))
    planted = tmp_path / "runs" / "pretrain" / "last.pt"
    planted.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(evil, planted)
    with pytest.raises(PretrainError, match=r"last\.pt: refused checkpoint"):
        pretrain(_config(split, tmp_path, max_steps=1, resume="auto"))
    assert not marker.exists()


def _wrong_structures():
    """(name, change of the loaded checkpoint state or raw bytes, expected message fragment)."""

    def drop(key):
        return lambda s: {k: v for k, v in s.items() if k != key}

    def put(key, value):
        return lambda s: {**s, key: value}

    def wrong_moment(s):
        opt = {**s["optimizer"], "state": dict(s["optimizer"]["state"])}
        opt["state"][0] = {**opt["state"][0], "exp_avg": torch.zeros(3)}
        return {**s, "optimizer": opt}

    def other_width(s):
        return {**s, "model": {k: torch.zeros([2 * d for d in v.shape]) for k, v in s["model"].items()}}

    return [
        ("not_a_dict", lambda s: [1, 2, 3], "it holds a list of 3, not a dict"),
        ("bare_state_dict", lambda s: s["model"], "bare state_dict of tensors"),
        ("missing_rng", drop("rng"), "missing keys ['rng']"),
        ("missing_step", drop("step"), "missing keys ['step']"),
        ("step_is_text", put("step", "2"), "'step' is str '2', expected a non-negative int"),
        ("weights_short", put("class_weights", [1.0] * 3), "'class_weights' is a list of 3"),
        ("weights_nan", put("class_weights", [float("nan")] * 17), "'class_weights'"),
        ("rng_float", put("rng", torch.zeros(3)), "'rng' is a float32 tensor of shape (3,)"),
        ("format_2", put("format", 2), "format 2 is not 1"),
        ("format_tensor", put("format", torch.ones(3)), "format tensor([1., 1., 1.]) is not 1"),
        ("data_keys", put("data", {"epoch": 0}), "'data' has missing keys"),
        (
            "scheduler_extra",
            lambda s: {**s, "scheduler": {**s["scheduler"], "optimizer": 1}},
            "unexpected keys",
        ),
        (
            "optimizer_shape",
            wrong_moment,
            "'optimizer' state[0]['exp_avg'] is a float32 tensor of shape (3,)",
        ),
        ("other_model", other_width, "its model differs from this run's"),
        ("empty_file", b"", "unreadable checkpoint (EOFError"),
        ("text_file", b"not a checkpoint", "unreadable checkpoint: not a torch file"),
    ]


@pytest.mark.parametrize("name,change,fragment", _wrong_structures(), ids=[w[0] for w in _wrong_structures()])
def test_wrong_checkpoints_are_one_clear_line(split, checkpoint, tmp_path, name, change, fragment):
    from driveengine.train.loop import PretrainError

    path = tmp_path / f"{name}.pt"
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        torch.save(change(torch.load(checkpoint, weights_only=True)), path)
    with pytest.raises(PretrainError) as exc:
        pretrain(_config(split, tmp_path, max_steps=3, resume=str(path)))
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert fragment in message, message
    assert "resume only from" in message or "resume with the options" in message, message


def test_wrong_checkpoint_through_the_cli_is_one_line(split, checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    del state["optimizer"]
    path = tmp_path / "no_optimizer.pt"
    torch.save(state, path)
    result = _run_cli(_cli_pretrain_args(split, tmp_path, path), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: not a usable pretrain checkpoint: missing keys ['optimizer']; resume only from a "
        "ckpt_*.pt or last.pt that `driveengine pretrain` wrote, or start without --resume"
    ]


def test_cli_pretrain_runs_on_a_collected_split(split, tmp_path):
    from typer.testing import CliRunner

    from driveengine.cli import app
    from driveengine.store.manifest import ManifestError

    args = [
        "pretrain",
        "--data",
        str(split.root),
        "--split",
        split.split,
        "--run-dir",
        str(tmp_path / "runs"),
    ]
    args += ["--max-steps", "2", "--width", "8", "--stem-stride", "1", "--cpu-threads", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pretrain: 2 steps on cpu x1" in result.output and "eval: mIoU" in result.output
    assert (tmp_path / "runs" / "pretrain" / "last.pt").exists()
    bad = CliRunner().invoke(app, ["pretrain", "--data", str(tmp_path / "nothing"), "--no-progress"])
    assert isinstance(bad.exception, ManifestError) and "no manifest" in str(bad.exception)
