"""The pre-training loop behind ``driveengine pretrain`` / ``make pretrain``.

One function, :func:`pretrain`, runs an occupancy/flow pre-training job described by a
:class:`~driveengine.train.config.PretrainConfig` on whatever is present: one CPU process, one GPU, or
many processes under ``torchrun`` (DDP; gloo on CPU, nccl on GPU; each rank streams its own share of
every global batch through :class:`~driveengine.data.FrameStream`).

Per optimiser step: ``grad_accum`` micro-batches (gradients synchronised on the last one only), AdamW,
gradient clipping, a linear-warmup cosine learning-rate schedule, bf16 autocast on CUDA, optionally a
``torch.compile``-d model. Every ``eval_every`` steps the model is evaluated with
:class:`~driveengine.train.metrics.OccupancyMetrics` (confusion matrices summed over ranks); every
``ckpt_every`` steps a checkpoint holds the model, optimiser, scheduler, step, epoch, loader state
and class weights, so ``resume`` continues the same step count, sample order and loss curve (bitwise on
CPU with ``deterministic``). Metrics go to ``<run_dir>/<name>/metrics.csv`` (one row per logged train
step and per evaluation), the config to ``config.json`` next to it.

What depends on the modality (``lidar``: points -> BEV encoder-decoder; ``camera``: 8 images -> ResNet +
FPN + lift) is one task object (:func:`pretraining_task`): stream fields, model, forward inputs, the
voxels that count (LiDAR-observed; for cameras also camera-visible) and, for cameras, the product: the
backbone alone in torchvision's format (``backbone.pth``) written with every checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from driveengine.data import FrameStream
from driveengine.errors import DriveEngineError
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import FREE
from driveengine.train.config import PretrainConfig
from driveengine.train.loss import OccupancyLoss, class_weights_from_counts
from driveengine.train.model_lidar import LidarPretraining

#: Columns of ``metrics.csv``; a row fills the ones of its phase ("train" or "eval").
CSV_COLUMNS: tuple[str, ...] = (
    "step", "epoch", "phase", "loss", "loss_sem", "loss_flow", "lr", "samples_per_s",
    "miou", "miou_present", "completion_iou", "foreground_iou", "epe", "epe_stationary", "epe_moving", "frames",
)  # fmt: skip

#: ``--modality`` values.
MODALITIES: tuple[str, ...] = ("lidar", "camera")


class PretrainError(DriveEngineError):
    """A pre-training run cannot start or continue (bad data, checkpoint, device)."""


# -- set-up -----------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PretrainError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1: (rank, world size, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def ensure_demo_data(demo_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """The demo dataset ``(root, split)``: synthesised and collected under ``demo_dir`` when missing."""
    from driveengine.demo import DEMO_SPLIT, ensure_demo_dataset

    return str(ensure_demo_dataset(Path(demo_dir))), DEMO_SPLIT


def estimate_class_weights(stream: FrameStream, frames: int) -> np.ndarray:
    """Class weights (17,) from the observed voxels of the first ``frames`` frames of ``stream``."""
    counts = np.zeros(FREE + 1, dtype=np.int64)
    for i, sample in enumerate(stream):
        if i >= frames:
            break
        sem = sample["semantics"]
        keep = sample["mask_lidar"] if "mask_lidar" in sample else np.ones(sem.shape, bool)
        counts += np.bincount(sem[keep].ravel(), minlength=FREE + 1)[: FREE + 1]
    return class_weights_from_counts(counts)


def lr_lambda(config: PretrainConfig):
    """Learning-rate factor per step: linear warmup to 1, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(config.max_steps - config.warmup_steps, 1)
        progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def pretraining_task(config: PretrainConfig) -> Any:
    """What the run does specifically for its modality: a ``LidarPretraining`` or ``CameraPretraining``
    (stream fields, model, forward inputs, counted voxels, backbone product)."""
    if config.modality == "lidar":
        return LidarPretraining.from_config(config)
    if config.modality == "camera":
        from driveengine.train.model_camera import CameraPretraining

        return CameraPretraining.from_config(config)
    raise PretrainError(f"unknown modality {config.modality!r}: use one of {', '.join(MODALITIES)}")


def _targets_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its label tensors on ``device`` (model inputs are moved by the task)."""
    non_blocking = device.type == "cuda"
    out = dict(batch)
    for key in ("semantics", "flow", "mask_lidar"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=non_blocking)
    return out


class CsvLog:
    """``metrics.csv`` of a run: fixed columns, appended row by row, truncated to a step on resume."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(row)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: FrameStream,
    device: torch.device,
    grid: VoxelGrid,
    max_frames: int = 0,
    amp: bool = False,
    task: Any = None,
) -> dict[str, Any]:
    """OpenScene metrics of ``model`` on ``stream`` (this rank's share; summed over ranks under DDP).

    Args:
        max_frames: stop after about this many frames over all ranks (0 = the whole stream).
        task: the run's :func:`pretraining_task` (default: LiDAR); it decides the model inputs and the
            voxels that count (LiDAR-observed; for cameras also camera-visible).
    """
    task = task or LidarPretraining()
    from driveengine.train.metrics import OccupancyMetrics

    metrics = OccupancyMetrics(grid=grid)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in stream.loader(num_workers=0):
            batch = _targets_to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(**task.inputs(batch, device))
            pred_sem, pred_flow = type(model).predict(out)
            metrics.update(
                pred_sem, batch["semantics"], pred_flow, batch["flow"].float(), mask=task.mask(batch, out)
            )
            seen += batch["semantics"].shape[0] * stream.world_size
            if max_frames and seen >= max_frames:
                break
    finally:
        model.train(was_training)
    if torch.distributed.is_initialized():
        for name in ("confusion", "epe_sum", "epe_count"):
            t = torch.from_numpy(np.ascontiguousarray(getattr(metrics, name))).to(torch.float64)
            torch.distributed.all_reduce(t)
            setattr(metrics, name, t.numpy().astype(getattr(metrics, name).dtype))
        frames = torch.tensor([metrics.frames], dtype=torch.float64)
        torch.distributed.all_reduce(frames)
        metrics.frames = int(frames.item())
    return metrics.compute()


# -- the run ----------------------------------------------------------------------------------------


def _micro_batches(
    stream: FrameStream, num_workers: int, start_epoch: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(epoch, batch) forever: epoch after epoch from ``start_epoch`` (the stream's resume point first)."""
    epoch = start_epoch
    empty_epochs = 0
    while True:
        stream.set_epoch(epoch)
        produced = False
        for batch in stream.loader(num_workers=num_workers, persistent_workers=False):
            produced = True
            yield epoch, batch
        empty_epochs = 0 if produced else empty_epochs + 1
        if empty_epochs > 1:
            raise PretrainError(
                f"{stream.split_url}: the loader yields no batch; the split has too few frames"
            )
        epoch += 1


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pre-training job; returns a summary.

    Returns:
        ``{"run_dir", "step", "epoch", "train_loss" (list of (step, loss)), "eval" (last metrics or
        None), "checkpoint" (last path or None), "device", "world_size", "rank"}``.

    Raises:
        PretrainError, StreamError, ManifestError: bad data, device or checkpoint.
    """
    device = resolve_device(config.device)
    rank, world, device = setup_distributed(device)
    is_main = rank == 0
    amp = device.type == "cuda" if config.amp == "auto" else config.amp in ("on", "bf16", "true", "1")
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    if config.deterministic and device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    task = pretraining_task(config)
    root, split = (config.data, config.split) if config.data else ensure_demo_data(config.demo_dir)
    stream = FrameStream(
        root, split, fields=task.fields, shuffle=True, seed=config.seed,
        global_batch_size=config.batch_size * world, rank=rank, world_size=world,
        storage_options=config.storage_options, sensor_root=config.sensor_root, **task.stream_kwargs(),
    )  # fmt: skip
    eval_stream = FrameStream(
        root, config.eval_split or split, fields=task.fields, shuffle=False, seed=config.seed,
        global_batch_size=config.batch_size * world, rank=rank, world_size=world,
        storage_options=config.storage_options, sensor_root=config.sensor_root, **task.stream_kwargs(),
    )  # fmt: skip
    grid = VoxelGrid.from_dict(stream.manifest.grid)

    run = Path(config.run_dir) / config.name
    resume_path: Path | None = None
    if config.resume == "auto":
        resume_path = run / "last.pt" if (run / "last.pt").exists() else None
    elif config.resume:
        resume_path = Path(config.resume)
        if not resume_path.exists():
            raise PretrainError(f"{resume_path}: no such checkpoint")
    ckpt: dict[str, Any] | None = None
    if resume_path is not None:
        try:
            ckpt = torch.load(resume_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many types for a bad file
            raise PretrainError(f"{resume_path}: unreadable checkpoint ({exc})") from None

    torch.manual_seed(config.seed)
    model = task.build_model(grid).to(device)
    if ckpt is not None:
        class_weights = np.asarray(ckpt["class_weights"])
    elif config.class_weight_frames:
        weight_stream = FrameStream(
            root, split, fields=("semantics", "mask_lidar"), shuffle=True, seed=config.seed, rank=0,
            world_size=1, storage_options=config.storage_options,
        )  # fmt: skip
        class_weights = estimate_class_weights(weight_stream, config.class_weight_frames)
    else:
        class_weights = np.ones(FREE + 1)
    criterion = OccupancyLoss(class_weights, flow_weight=config.flow_weight).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))

    step, epoch, micro_in_epoch = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, micro_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["micro_in_epoch"])
        stream.load_state_dict(ckpt["data"])
        torch.set_rng_state(ckpt["rng"])

    train_model: nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward_model: Any = torch.compile(train_model) if config.compile else train_model

    csv_log = None
    if is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        csv_log = CsvLog(run / "metrics.csv", step if ckpt is not None else None)

    def save_checkpoint() -> Path | None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
            "micro_in_epoch": micro_in_epoch,
            "data": stream.state_dict(num_samples=micro_in_epoch * config.batch_size * world),
            "class_weights": class_weights.tolist(),
            "rng": torch.get_rng_state(),
            "config": config.to_dict(),
        }
        path = None
        if is_main:
            path = run / f"ckpt_{step:07d}.pt"
            _atomic_save(state, path)
            _atomic_save(state, run / "last.pt")
            kept = sorted(run.glob("ckpt_*.pt"))
            for old in kept[: max(len(kept) - config.keep_checkpoints, 0)]:
                old.unlink()
        if is_main and task.save_backbone is not None:
            task.save_backbone(model, run, step)  # the product of a camera run, next to the checkpoints
        if world > 1:
            torch.distributed.barrier()
        return path

    from tqdm import tqdm

    bar = tqdm(
        total=config.max_steps, initial=step, disable=not (is_main and config.progress), desc="pretrain"
    )
    losses: list[tuple[int, float]] = []
    last_eval: dict[str, Any] | None = None
    last_ckpt: Path | None = None
    batches = _micro_batches(stream, config.num_workers, epoch)
    acc = {"loss": 0.0, "loss_sem": 0.0, "loss_flow": 0.0}
    micro = 0
    tick, samples = time.perf_counter(), 0
    train_model.train()
    optimizer.zero_grad(set_to_none=True)
    while step < config.max_steps:
        batch_epoch, batch = next(batches)
        if batch_epoch != epoch:  # a new epoch: drop a partial accumulation of the old one
            epoch, micro_in_epoch, micro = batch_epoch, 0, 0
            acc = dict.fromkeys(acc, 0.0)
            optimizer.zero_grad(set_to_none=True)
        micro_in_epoch += 1
        micro += 1
        batch = _targets_to_device(batch, device)
        sync = micro == config.grad_accum
        ctx = train_model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
        with ctx:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = forward_model(**task.inputs(batch, device))
            terms = criterion(
                out["semantics"], out["flow"], batch["semantics"], batch["flow"], task.mask(batch, out)
            )
            (terms["loss"] / config.grad_accum).backward()
        for k in acc:
            acc[k] += float(terms[k].detach()) / config.grad_accum
        samples += batch["semantics"].shape[0] * world
        if not sync:
            continue
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        micro = 0
        if world > 1:
            t = torch.tensor([acc["loss"], acc["loss_sem"], acc["loss_flow"]], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            acc = dict(zip(acc, (t / world).tolist(), strict=True))
        losses.append((step, acc["loss"]))
        bar.update(1)
        bar.set_postfix(loss=f"{acc['loss']:.4f}")
        if csv_log and config.log_every and step % config.log_every == 0:
            now = time.perf_counter()
            csv_log.write(
                {"step": step, "epoch": epoch, "phase": "train", **{k: f"{v:.9g}" for k, v in acc.items()},
                 "lr": f"{scheduler.get_last_lr()[0]:.6g}", "samples_per_s": f"{samples / max(now - tick, 1e-9):.3f}"}
            )  # fmt: skip
            tick, samples = now, 0
        acc = dict.fromkeys(acc, 0.0)
        if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
            last_eval = evaluate(model, eval_stream, device, grid, config.eval_frames, amp, task)
            if csv_log:
                csv_log.write(
                    {"step": step, "epoch": epoch, "phase": "eval",
                     **{k: f"{last_eval[k]:.6g}" for k in CSV_COLUMNS if k in last_eval}}
                )  # fmt: skip
        if step == config.max_steps or (config.ckpt_every and step % config.ckpt_every == 0):
            last_ckpt = save_checkpoint() or last_ckpt
    bar.close()
    return {
        "run_dir": str(run),
        "step": step,
        "epoch": epoch,
        "train_loss": losses,
        "eval": last_eval,
        "checkpoint": None if last_ckpt is None else str(last_ckpt),
        "device": str(device),
        "world_size": world,
        "rank": rank,
    }
