"""The pre-training loop behind ``driveengine pretrain`` / ``make pretrain``.

One function, :func:`pretrain`, runs an occupancy/flow pre-training job described by a
:class:`~driveengine.train.config.PretrainConfig` on whatever is present: one CPU process, one GPU, or
many processes under ``torchrun`` (DDP; gloo on CPU, nccl on GPU; each rank streams its own share of
every global batch through :class:`~driveengine.data.FrameStream`).

Per optimiser step: ``grad_accum`` micro-batches (gradients synchronised on the last one only), AdamW,
gradient clipping, a linear-warmup cosine learning-rate schedule, bf16 autocast on CUDA, optionally a
``torch.compile``-d model. Every ``eval_every`` steps the model is evaluated with
:class:`~driveengine.evaluation.metrics.OccupancyMetrics` (confusion matrices summed over ranks); every
``ckpt_every`` steps a checkpoint (:class:`Checkpoint`: tensors and plain types only) holds the model,
optimiser, scheduler, step, epoch, loader state, class weights and RNG state, so ``resume`` continues the
same step count, sample order and loss curve (bitwise on CPU with ``deterministic``). Checkpoints are read
with ``torch.load(weights_only=True)`` (a checkpoint cannot run code) and checked against the run before
anything is loaded: a wrong one is one :class:`PretrainError` line. Metrics go to
``<run_dir>/<name>/metrics.csv`` (one row per logged train step and per evaluation; an undefined metric is
an empty cell), the config to ``config.json`` next to it.

The data is a collected split (``config.data`` / ``config.split``, required: ``make pretrain`` and ``python
-m driveengine.demo --data-only`` make the demo data); its manifest gives the voxel grid and the class
table, so the model's outputs, the loss, the class weights and the metrics follow the dataset (OpenScene's
16 classes + free, Occ3D-nuScenes' 17 + free, ...).

Several splits (``config.mix``, ``pretrain --data A --data B --weights 0.7,0.3``) are trained on as one
:class:`~driveengine.data.MixedStream`: mixed by weight, global batches from one split where their shapes
differ, resumable like a split. One model predicts one grid and one class table, so the splits' grids must
agree (a mix of grids is refused in one line); their class tables may differ: ``config.classes`` "auto"
(the default) then trains on the unified table (every split's ids mapped onto
:data:`~driveengine.data.UNIFIED_CLASSES`), "native" refuses. Evaluation runs on the mix of the splits'
eval splits, every frame once, in the same classes.

What depends on the model is one registered task (:mod:`driveengine.train.tasks`, ``config.modality``:
``lidar``: points -> BEV encoder-decoder; ``camera``: the dataset's images -> backbone + FPN + lift): stream
fields and options, the model, its inputs, the voxels that count (LiDAR-observed; for cameras also
camera-visible) and the product (for cameras the backbone alone, ``backbone.pth``) written with every
checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from driveengine.data import FrameStream, MixedStream, MixSource
from driveengine.files import atomic_path, atomic_write_bytes, remove_stale_temporaries
from driveengine.models.heads import ModelOutputs, predict
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import ClassTable
from driveengine.train.config import DataSource, PretrainConfig, PretrainError
from driveengine.train.loss import OccupancyLoss, class_weights_from_counts
from driveengine.train.tasks import Batch, PretrainingTask, batch_tensor, pretraining_task

__all__ = [
    "CSV_COLUMNS", "Checkpoint", "PretrainError", "PretrainSummary", "check_outputs", "estimate_class_weights",
    "evaluate", "pretrain", "pretraining_task", "read_checkpoint", "split_labels",
]  # fmt: skip

#: Columns of ``metrics.csv``; a row fills the ones of its phase ("train" or "eval").
CSV_COLUMNS: tuple[str, ...] = (
    "step", "epoch", "phase", "loss", "loss_sem", "loss_flow", "lr", "samples_per_s",
    "miou", "miou_present", "completion_iou", "foreground_iou", "near_miou", "far_miou",
    "epe", "epe_stationary", "epe_moving", "frames",
)  # fmt: skip

#: What to do without ``--data``, appended to that error.
DEMO_DATA_HINT = (
    "`make pretrain` prepares the demo data and trains on it; `python -m driveengine.demo --out demo_data "
    "--data-only` makes it (then --data demo_data/dataset --split mini)"
)


#: What a run streams: one split, or several mixed.
TrainingStream = FrameStream | MixedStream


# -- checkpoints ------------------------------------------------------------------------------------

#: Layout version of the checkpoints :func:`pretrain` writes (files without the key have layout 1).
CHECKPOINT_FORMAT = 1
#: What to do about a checkpoint that cannot be used, appended to every such error.
_CHECKPOINT_HINT = (
    "resume only from a ckpt_*.pt or last.pt that `driveengine pretrain` wrote, or start without --resume"
)
#: Tensors AdamW keeps per parameter (each of the parameter's shape), besides its scalar ``step``.
_ADAMW_STATE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


def read_checkpoint(path: Path) -> object:
    """The content of a checkpoint file, read with ``torch.load(weights_only=True)``: no code runs.

    torch's weights-only unpickler builds tensors and plain containers only; a pickle that asks for any
    other callable or class (a ``__reduce__`` calling ``os.system``, ``open``, ...) is refused before
    anything is called.

    Raises:
        PretrainError: one line naming the file: not a torch file, truncated, or refused as unsafe.
    """
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        opcode = re.search(r"Unsupported operand (\d+)", text)
        if wanted:
            reason = (
                f"refused checkpoint: loading it would call or build {wanted.group(1)[:120]}, which a checkpoint of "
                "tensors and plain data never does (nothing from the file was run)"
            )
        elif opcode:
            reason = (
                f"unreadable checkpoint: not a torch file of tensors and plain data (pickle opcode "
                f"{opcode.group(1)} is not allowed)"
            )
        else:
            detail = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), "")
            reason = f"unreadable checkpoint: refused by torch's weights-only loader ({detail or 'unsafe'})"
    except Exception as exc:  # torch raises many types for a bad file (RuntimeError, EOFError, ...)
        first = (str(exc).strip().splitlines() or ["empty or truncated file"])[0][:300]
        reason = f"unreadable checkpoint ({type(exc).__name__}: {first})"
    raise PretrainError(f"{path}: {reason}; {_CHECKPOINT_HINT}")


def _plain(value: object, where: str) -> object:
    """``value`` with tuples as lists, checked to hold only JSON types (for the checkpoint's ``config``)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise PretrainError(
        f"cannot write a checkpoint: {where} is a {type(value).__name__}; checkpoints hold only tensors, "
        "dicts, lists, str, int, float, bool and None (pass plain values in the config)"
    )


def _mismatch(saved: object, fresh: object, where: str) -> str | None:
    """The first way ``saved`` differs in structure or type from ``fresh`` (a state made here), or None.

    Dicts must have the same keys, lists and tuples the same length, tensors the same shape and dtype,
    numbers be finite numbers, bools bools, strings strings; a ``None`` in ``fresh`` admits None or a bool.
    """
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"{where} is a {type(saved).__name__}, expected a dict"
        missing = [k for k in fresh if k not in saved]
        extra = [k for k in saved if k not in fresh]
        if missing or extra:
            parts = [
                f"missing keys {_short(missing[:5])}" if missing else "",
                f"unexpected keys {_short(extra[:5])}" if extra else "",
            ]
            return f"{where} has " + " and ".join(p for p in parts if p)
        for k in fresh:
            problem = _mismatch(saved[k], fresh[k], f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    if isinstance(fresh, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(fresh):
            return f"{where} is {_describe(saved)}, expected a list of {len(fresh)}"
        for i, (a, b) in enumerate(zip(saved, fresh, strict=True)):
            problem = _mismatch(a, b, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(fresh, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"{where} is {_describe(saved)}, expected a tensor"
        if saved.shape != fresh.shape or saved.dtype != fresh.dtype:
            return f"{where} is {_describe(saved)}, expected {_describe(fresh)}"
        return None
    if fresh is None:
        ok = saved is None or isinstance(saved, bool)
    elif isinstance(fresh, bool):
        ok = isinstance(saved, bool)
    elif isinstance(fresh, int | float):
        ok = isinstance(saved, int | float) and not isinstance(saved, bool) and math.isfinite(saved)
    elif isinstance(fresh, str):
        ok = isinstance(saved, str)
    else:
        ok = type(saved) is type(fresh)
    return None if ok else f"{where} is {_describe(saved)}, expected {_describe(fresh)}"


def _short(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters (keys and values of a hostile file can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(value: object) -> str:
    """A short description of a checkpoint value for messages."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, bool | int | float | str):
        text = repr(value)
        return f"{type(value).__name__} {text[:40]}"
    return f"a {type(value).__name__}"


@dataclass
class Checkpoint:
    """A pre-training checkpoint: only tensors and plain types, so it loads with ``weights_only=True``.

    On disk it is a dict with these keys plus ``format`` (:data:`CHECKPOINT_FORMAT`); ``export-backbone``
    reads ``model``, ``step`` and ``config`` from it.

    Attributes:
        model: the model's ``state_dict`` (parameter name -> tensor).
        optimizer: AdamW's ``state_dict`` (torch's layout: ``state`` {param index: {"step", "exp_avg",
            "exp_avg_sq"} tensors} and ``param_groups`` [dict of numbers, bools, None, ``betas``, ``params``]).
        scheduler: LambdaLR's ``state_dict`` (numbers, bools, lists; ``lr_lambdas`` [None]).
        step: optimiser steps done; epoch: data epoch; micro_in_epoch: micro-batches of it consumed.
        data: :meth:`FrameStream.state_dict` or :meth:`MixedStream.state_dict` (plain types).
        class_weights: the loss weight of each id of the split's class table (17 for OpenScene's table;
            float64 values as Python floats: restored exactly).
        rng: :func:`torch.get_rng_state` (a uint8 tensor).
        config: :meth:`PretrainConfig.to_dict` with JSON types (tuples as lists), for information.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, object]
    step: int
    epoch: int
    micro_in_epoch: int
    data: dict[str, object]
    class_weights: list[float]
    rng: torch.Tensor
    config: dict[str, object]

    def to_state(self) -> dict[str, object]:
        """The dict that ``torch.save`` writes (the config made plain; see :func:`_plain`)."""
        state: dict[str, object] = {"format": CHECKPOINT_FORMAT}
        for f in fields(self):
            state[f.name] = getattr(self, f.name)
        state["config"] = _plain(self.config, "config")
        state["data"] = _plain(self.data, "data")
        return state

    @classmethod
    def from_state(cls, state: object, path: Path, classes: ClassTable) -> Checkpoint:
        """Check the structure of what :func:`read_checkpoint` returned and wrap it.

        Only what does not depend on the run's objects is checked here (keys, types, counts, one class
        weight per id of the split's class table ``classes``, the RNG state); :meth:`restore` checks the
        rest against the run's model, optimiser, scheduler and loader.

        Raises:
            PretrainError: one line naming the file, the first thing that is wrong and what to do.
        """

        def fail(what: str) -> PretrainError:
            return PretrainError(f"{path}: not a usable pretrain checkpoint: {what}; {_CHECKPOINT_HINT}")

        if not isinstance(state, dict):
            raise fail(f"it holds {_describe(state)}, not a dict")
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise fail(
                "it is a bare state_dict of tensors (e.g. a backbone.pth), without optimiser and loader state"
            )
        version = state.get("format", CHECKPOINT_FORMAT)
        if not isinstance(version, int) or isinstance(version, bool) or version != CHECKPOINT_FORMAT:
            raise fail(
                f"format {_short(version)} is not {CHECKPOINT_FORMAT} (written by another DriveEngine version)"
            )
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in state]
        unknown = [k for k in state if k not in names and k != "format"]
        if missing or unknown:
            raise fail(
                f"missing keys {missing}" + (f", unexpected keys {_short(unknown[:5])}" if unknown else "")
            )
        for key in ("step", "epoch", "micro_in_epoch"):
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(f"{key!r} is {_describe(value)}, expected a non-negative int")
        model = state["model"]
        if not (isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())):
            raise fail(f"'model' is {_describe(model)}, expected a state_dict (names -> tensors)")
        if not all(isinstance(k, str) for k in model):
            raise fail("'model' has keys that are not strings")
        optimizer = state["optimizer"]
        if not (
            isinstance(optimizer, dict)
            and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
        ):
            raise fail("'optimizer' is not an optimiser state_dict (a dict with 'state' and 'param_groups')")
        for key in ("scheduler", "data", "config"):
            if not isinstance(state[key], dict):
                raise fail(f"{key!r} is {_describe(state[key])}, expected a dict")
        weights = state["class_weights"]
        num_ids = classes.free + 1
        if not (isinstance(weights, list) and len(weights) == num_ids):
            raise fail(
                f"'class_weights' is {_describe(weights)}, expected a list of {num_ids} numbers (one per id of "
                f"the split's class table {classes.name})"
            )
        bad = [
            w for w in weights
            if not (isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0)
        ]  # fmt: skip
        if bad:
            raise fail(f"'class_weights' holds {bad[0]!r}, expected finite non-negative numbers")
        fresh_rng = torch.get_rng_state()
        problem = _mismatch(state["rng"], fresh_rng, "'rng'")
        if problem:
            raise fail(problem)
        return cls(**{k: state[k] for k in names})

    def restore(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        stream: TrainingStream,
    ) -> None:
        """Load the checkpoint into the run's model, optimiser, scheduler, loader and RNG.

        Everything is checked against the run's own objects before anything is loaded.

        Raises:
            PretrainError: the checkpoint belongs to another model or run layout (one line).
            StreamError: the loader state belongs to another seed, batch size or dataset.
        """

        def fail(what: str, hint: str = _CHECKPOINT_HINT) -> PretrainError:
            return PretrainError(f"{path}: cannot resume from this checkpoint: {what}; {hint}")

        config = self.config
        layout = ", ".join(
            f"{k}={config[k]!r}"
            for k in ("modality", "depth", "width", "stem_stride", "output_stride")
            if k in config
        )
        same_options = f"resume with the options of the run that wrote it ({layout or 'see its config.json'})"
        expected = model.state_dict()
        missing = [k for k in expected if k not in self.model]
        unexpected = [k for k in self.model if k not in expected]
        shapes = [
            f"{k} {tuple(self.model[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in self.model and self.model[k].shape != v.shape
        ]
        if missing or unexpected or shapes:
            parts = [
                f"{len(missing)} missing weights (e.g. {missing[:2]})" if missing else "",
                f"{len(unexpected)} unexpected weights (e.g. {_short(unexpected[:2])})" if unexpected else "",
                f"{len(shapes)} shapes differ (e.g. {shapes[:2]})" if shapes else "",
            ]
            raise fail("its model differs from this run's: " + ", ".join(p for p in parts if p), same_options)
        problem = self._optimizer_mismatch(optimizer)
        if problem:
            raise fail(problem, same_options)
        problem = _mismatch(self.scheduler, scheduler.state_dict(), "'scheduler'")
        if problem:
            raise fail(problem)
        fresh_data = stream.state_dict()
        if ("mix" in self.data) != ("mix" in fresh_data):
            saved = f"a mix of {self.data.get('sources', '?')}" if "mix" in self.data else "one split"
            raise fail(
                f"its loader state is of {saved}, this run trains on {stream.split_url}",
                "resume with the --data, --split and --weights of the run that wrote it",
            )
        problem = _mismatch(self.data, fresh_data, "'data'")
        if problem:
            raise fail(problem)
        stream.load_state_dict(self.data)  # StreamError when seed, batch size or dataset differ
        try:  # checked above; what is left is torch's own verdict (e.g. an invalid generator state)
            torch.set_rng_state(self.rng)
            model.load_state_dict(self.model)
            optimizer.load_state_dict(self.optimizer)
            scheduler.load_state_dict(self.scheduler)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise fail(f"torch refused it ({type(exc).__name__}: {first})") from None

    def _optimizer_mismatch(self, optimizer: torch.optim.Optimizer) -> str | None:
        """How the saved AdamW state does not fit ``optimizer`` (same groups, parameters, shapes), or None."""
        fresh = optimizer.state_dict()
        saved_groups = self.optimizer["param_groups"]
        problem = _mismatch(saved_groups, fresh["param_groups"], "'optimizer' param_groups")
        if problem:
            return problem
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = [i for group in saved_groups for i in group["params"]]
        if ids != list(range(len(params))):
            return "'optimizer' param_groups do not list this model's parameters in order"
        for key, entry in self.optimizer["state"].items():
            if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < len(params):
                return f"'optimizer' state has an entry {key!r} for no parameter"
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), torch.Tensor):
                return f"'optimizer' state[{key}] is not AdamW's (a dict with a 'step' tensor)"
            if entry["step"].numel() != 1:
                return f"'optimizer' state[{key}]['step'] is {_describe(entry['step'])}, expected one number"
            for name, value in entry.items():
                if name == "step":
                    continue
                if name not in _ADAMW_STATE:
                    return f"'optimizer' state[{key}] has an unexpected entry {name!r}"
                want = params[key]
                if (
                    not isinstance(value, torch.Tensor)
                    or value.shape != want.shape
                    or not value.is_floating_point()
                ):
                    return f"'optimizer' state[{key}][{name!r}] is {_describe(value)}, expected {_describe(want.detach())}"
        return None


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


def split_labels(stream: TrainingStream, modality: str = "") -> tuple[VoxelGrid, ClassTable]:
    """The voxel grid and the class table of the labels of ``stream``'s split (recorded in its manifest), or
    of a mix's splits (the unified table with unified classes).

    Raises:
        PretrainError: a mix whose splits' grids differ, or whose class tables differ with native classes.
    """
    if isinstance(stream, MixedStream):
        model = f"the {modality!r} model" if modality else "a model"
        first = stream.streams[0]
        if any(s.grid != first.grid for s in stream.streams):
            grids = "; ".join(f"{s.split_url}: {s.grid.describe()}" for s in stream.streams)
            raise PretrainError(
                f"{stream.split_url}: the splits' voxel grids differ ({grids}); {model} predicts one grid: "
                "train on splits whose labels were made on the same grid (collect them with the same --grid, e.g. "
                "--grid openscene)"
            )
        if stream.class_mode == "native" and any(s.classes != first.classes for s in stream.streams):
            tables = "; ".join(f"{s.split_url}: class table {s.classes.name}" for s in stream.streams)
            raise PretrainError(
                f"{stream.split_url}: the splits' class tables differ ({tables}); {model} predicts one table: "
                "pass --classes unified (or auto) to map them onto the unified table"
            )
    return stream.grid, stream.classes


def estimate_class_weights(stream: TrainingStream, frames: int, classes: ClassTable) -> np.ndarray:
    """Class weights (K,) (one per id of ``classes``, free last) from the observed voxels of the first
    ``frames`` frames of ``stream``.

    Raises:
        PretrainError: a frame holds an id outside the class table (the labels and the manifest disagree).
    """
    num_ids = classes.free + 1
    counts = np.zeros(num_ids, dtype=np.int64)
    for i, sample in enumerate(stream):
        if i >= frames:
            break
        sem = sample["semantics"]
        keep = sample["mask_lidar"] if "mask_lidar" in sample else np.ones(sem.shape, bool)
        found = np.bincount(sem[keep].ravel(), minlength=num_ids)
        if len(found) > num_ids:
            raise PretrainError(
                f"{stream.split_url}: frame {sample.get('token', i)} of log {sample.get('log_name', '?')} has "
                f"class ids up to {len(found) - 1}, but the split's class table {classes.name} ends at free = "
                f"{classes.free}; re-collect the split (its labels and manifest disagree)"
            )
        counts += found
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


def check_outputs(outputs: ModelOutputs, grid: VoxelGrid, classes: ClassTable, modality: str) -> None:
    """Check that a model's outputs have the shapes the split's labels need (a shape test, no device sync).

    Raises:
        PretrainError: ``semantics`` is not (B, classes.free + 1, nx, ny, nz) or ``flow`` not
            (B, nx, ny, nz, 2), in one line naming the task.
    """
    sem, flow = outputs.get("semantics"), outputs.get("flow")
    want = f"(B, {classes.free + 1}, {', '.join(map(str, grid.shape))})"
    if (
        not isinstance(sem, torch.Tensor)
        or sem.dim() != 5
        or tuple(sem.shape[1:]) != (classes.free + 1, *grid.shape)
    ):
        got = tuple(sem.shape) if isinstance(sem, torch.Tensor) else type(sem).__name__
        raise PretrainError(
            f"the {modality!r} model's 'semantics' output is {got}, expected {want}: one logit per id of the "
            f"split's class table {classes.name} (free = {classes.free}) per voxel of its grid; build the model "
            "from the grid and classes the task's build_model receives"
        )
    if not isinstance(flow, torch.Tensor) or tuple(flow.shape) != (sem.shape[0], *grid.shape, 2):
        got = tuple(flow.shape) if isinstance(flow, torch.Tensor) else type(flow).__name__
        raise PretrainError(
            f"the {modality!r} model's 'flow' output is {got}, expected (B, {', '.join(map(str, grid.shape))}, 2)"
        )


def _targets_to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with its label tensors on ``device`` (model inputs are moved by the task).

    Raises:
        TaskError: ``semantics`` or ``flow`` is missing, or a label field is not one tensor.
    """
    non_blocking = device.type == "cuda"
    out = dict(batch)
    for key in ("semantics", "flow", "mask_lidar"):
        if key == "mask_lidar" and key not in batch:
            continue  # optional: a task without it counts every voxel (or its own mask)
        out[key] = batch_tensor(batch, key).to(device, non_blocking=non_blocking)
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

    def write(self, row: dict[str, str | int]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(row)


def _csv_number(value: float | int | None) -> str:
    """A metric as a ``metrics.csv`` cell: 6 significant digits, empty when undefined (None)."""
    return "" if value is None else f"{value:.6g}"


def _atomic_save(obj: dict[str, object], path: Path) -> None:
    """A checkpoint saved whole or not at all, fsynced (a resume after a crash reads it)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# -- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: TrainingStream,
    device: torch.device,
    task: PretrainingTask,
    grid: VoxelGrid,
    classes: ClassTable,
    max_frames: int = 0,
    amp: bool = False,
    modality: str = "",
) -> dict[str, Any]:
    """OpenScene metrics of ``model`` on ``stream`` (this rank's share; summed over ranks under DDP).

    Args:
        task: the run's task (:func:`~driveengine.train.tasks.pretraining_task`); it decides the model
            inputs and the voxels that count (LiDAR-observed; for cameras also camera-visible).
        grid, classes: the voxel grid and class table of the split's labels.
        max_frames: stop after about this many frames over all ranks (0 = the whole stream).
        modality: the task's name, for messages.

    Returns:
        :meth:`~driveengine.evaluation.metrics.OccupancyMetrics.compute`'s dict.
    """
    from driveengine.evaluation.metrics import OccupancyMetrics

    metrics = OccupancyMetrics(grid=grid, classes=classes)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in stream.loader(num_workers=0):
            batch = _targets_to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(**task.inputs(batch, device))
            check_outputs(out, grid, classes, modality)
            pred_sem, pred_flow = predict(out)
            gt_sem = batch_tensor(batch, "semantics")
            metrics.update(
                pred_sem, gt_sem, pred_flow, batch_tensor(batch, "flow").float(), mask=task.mask(batch, out)
            )
            seen += gt_sem.shape[0] * stream.world_size
            if max_frames and seen >= max_frames:
                break
    finally:
        model.train(was_training)
    if torch.distributed.is_initialized():
        for name in OccupancyMetrics.SUMMED:
            t = torch.from_numpy(np.ascontiguousarray(getattr(metrics, name))).to(torch.float64)
            torch.distributed.all_reduce(t)
            setattr(metrics, name, t.numpy().astype(getattr(metrics, name).dtype))
        frames = torch.tensor([metrics.frames], dtype=torch.float64)
        torch.distributed.all_reduce(frames)
        metrics.frames = int(frames.item())
    return metrics.compute()


# -- the run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainSummary:
    """What :func:`pretrain` returns.

    Attributes:
        run_dir: the run folder (``<run_dir>/<name>``).
        step: optimiser steps done; epoch: the data epoch reached.
        train_loss: (step, loss) of every step this call ran (the mean over ranks).
        eval: the last evaluation's metrics (:meth:`OccupancyMetrics.compute`), or None.
        checkpoint: the last checkpoint written (main process), or None.
        device: the torch device, e.g. ``cpu``, ``cuda:0``; world_size, rank: of the process group.
        grid, classes: the voxel grid and class table of the split's labels (what the model predicts).
    """

    run_dir: str
    step: int
    epoch: int
    train_loss: list[tuple[int, float]]
    eval: dict[str, Any] | None
    checkpoint: str | None
    device: str
    world_size: int
    rank: int
    grid: VoxelGrid
    classes: ClassTable

    def __getitem__(self, key: str) -> object:
        """``summary["step"]``: the dict-style access of callers written before this record (a field's value).

        Raises:
            KeyError: no field ``key``.
        """
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def _micro_batches(stream: TrainingStream, num_workers: int, start_epoch: int) -> Iterator[tuple[int, Batch]]:
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


def _open_stream(
    config: PretrainConfig,
    task: PretrainingTask,
    sources: tuple[DataSource, ...],
    shuffle: bool,
    rank: int,
    world: int,
    *,
    classes: str,
    evaluation: bool = False,
) -> TrainingStream:
    """The stream of ``sources`` with the task's fields and options, this rank's share of each global batch:
    a :class:`FrameStream` for one split in its own classes, else a :class:`MixedStream` (``evaluation``:
    every frame of every split once, unweighted)."""
    options = task.stream_options()
    if len(sources) == 1 and sources[0].weight is None and classes in ("auto", "native"):
        return FrameStream(
            sources[0].root, sources[0].split, fields=task.fields, history=options.history, shuffle=shuffle,
            seed=config.seed, global_batch_size=config.batch_size * world, rank=rank, world_size=world,
            storage_options=config.storage_options, blob_root=config.blob_root, image_size=options.image_size,
            point_sweeps=options.point_sweeps, image_dtype=options.image_dtype,
        )  # fmt: skip
    weighted = not evaluation and all(s.weight is not None for s in sources)
    mix = [
        MixSource(s.root, s.split, float(s.weight or 1.0) if weighted else None, blob_root=config.blob_root)
        for s in sources
    ]
    return MixedStream(
        mix, fields=task.fields, history=options.history, shuffle=shuffle, seed=config.seed,
        global_batch_size=config.batch_size * world, rank=rank, world_size=world,
        samples_per_epoch=(config.samples_per_epoch or None) if weighted else None, classes=classes,
        storage_options=config.storage_options, image_size=options.image_size, point_sweeps=options.point_sweeps,
        image_dtype=options.image_dtype,
    )  # fmt: skip


def _class_weight_stream(
    config: PretrainConfig, sources: tuple[DataSource, ...], stream: TrainingStream
) -> TrainingStream:
    """The stream the class weights are estimated on: the training data's labels, shuffled, in one process."""
    if isinstance(stream, FrameStream):
        return FrameStream(
            sources[0].root, sources[0].split, fields=("semantics", "mask_lidar"), shuffle=True, seed=config.seed,
            rank=0, world_size=1, storage_options=config.storage_options,
        )  # fmt: skip
    return MixedStream(
        stream.sources, fields=("semantics", "mask_lidar"), shuffle=True, seed=config.seed, rank=0, world_size=1,
        samples_per_epoch=stream.samples_per_epoch, classes=stream.class_mode,
        storage_options=config.storage_options,
    )  # fmt: skip


def _same_labels(train: TrainingStream, other: TrainingStream, modality: str = "") -> None:
    """Refuse an eval split whose grid or class table differs from the training split's (one line)."""
    (grid, classes), (other_grid, other_classes) = (
        split_labels(train, modality),
        split_labels(other, modality),
    )
    problems = []
    if other_grid != grid:
        problems.append(f"grid {other_grid.describe()} vs {grid.describe()}")
    if other_classes != classes:
        problems.append(f"class table {other_classes.name} vs {classes.name}")
    if problems:
        raise PretrainError(
            f"{other.split_url}: the eval split's labels differ from the training split's "
            f"({train.split_url}): {'; '.join(problems)}; evaluate on a split collected with the same settings"
        )


def pretrain(config: PretrainConfig) -> PretrainSummary:
    """Run (or resume) a pre-training job on the collected split ``config.data`` / ``config.split``.

    The split's manifest gives the voxel grid and the class table: the model predicts the table's ids,
    the loss and the class weights cover them, the metrics use the table.

    Returns:
        A :class:`PretrainSummary`.

    Raises:
        PretrainError, StreamError, ManifestError, TaskError: no ``data``, bad data, device, task or
            checkpoint.
    """
    sources = config.sources()
    if not sources:
        raise PretrainError(
            f"no training data: pass --data OUT (the output folder of `driveengine collect`) and --split "
            "(several --data train on a mix); "
            f"{DEMO_DATA_HINT}"
        )
    device = resolve_device(config.device)
    rank, world, device = setup_distributed(device)
    is_main = rank == 0
    amp = device.type == "cuda" if config.amp == "auto" else config.amp in ("on", "bf16", "true", "1")
    if config.classes not in ("auto", "native", "unified"):
        raise PretrainError(f"--classes {config.classes!r}: use auto, native or unified")
    if config.samples_per_epoch and not all(s.weight is not None for s in sources):
        raise PretrainError(
            f"--samples-per-epoch {config.samples_per_epoch}: only a weighted mix has an epoch length of its own; "
            "give --weights (one per --data), or leave it out"
        )
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    if config.deterministic and device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    task = pretraining_task(config)
    stream = _open_stream(config, task, sources, shuffle=True, rank=rank, world=world, classes=config.classes)
    eval_sources = tuple(DataSource(s.root, config.eval_split or s.split, s.weight) for s in sources)
    eval_classes = stream.class_mode if isinstance(stream, MixedStream) else "native"
    eval_stream = _open_stream(
        config,
        task,
        eval_sources,
        shuffle=False,
        rank=rank,
        world=world,
        classes=eval_classes,
        evaluation=True,
    )
    grid, classes = split_labels(stream, config.modality)
    _same_labels(stream, eval_stream, config.modality)

    run = Path(config.run_dir) / config.name
    resume_path: Path | None = None
    if config.resume == "auto":
        resume_path = run / "last.pt" if (run / "last.pt").exists() else None
    elif config.resume:
        resume_path = Path(config.resume)
        if not resume_path.exists():
            raise PretrainError(f"{resume_path}: no such checkpoint")
    ckpt: Checkpoint | None = None
    if resume_path is not None:
        ckpt = Checkpoint.from_state(read_checkpoint(resume_path), resume_path, classes)

    torch.manual_seed(config.seed)
    model = task.build_model(grid, classes).to(device)
    if ckpt is not None:
        class_weights = np.asarray(ckpt.class_weights, dtype=np.float64)
    elif config.class_weight_frames:
        weight_stream = _class_weight_stream(config, sources, stream)
        class_weights = estimate_class_weights(weight_stream, config.class_weight_frames, classes)
    else:
        class_weights = np.ones(classes.free + 1)
    criterion = OccupancyLoss(class_weights, flow_weight=config.flow_weight, classes=classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))

    step, epoch, micro_in_epoch = 0, 0, 0
    if ckpt is not None and resume_path is not None:
        ckpt.restore(resume_path, model, optimizer, scheduler, stream)
        step, epoch, micro_in_epoch = ckpt.step, ckpt.epoch, ckpt.micro_in_epoch

    train_model: nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward_model: Callable[..., ModelOutputs] = torch.compile(train_model) if config.compile else train_model

    csv_log = None
    if is_main:
        run.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run)  # a checkpoint's temporary left by a killed run
        atomic_write_bytes(run / "config.json", (json.dumps(config.to_dict(), indent=1) + "\n").encode())
        csv_log = CsvLog(run / "metrics.csv", step if ckpt is not None else None)

    def save_checkpoint() -> Path | None:
        state = Checkpoint(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            step=step,
            epoch=epoch,
            micro_in_epoch=micro_in_epoch,
            data=stream.state_dict(num_samples=micro_in_epoch * config.batch_size * world),
            class_weights=[float(w) for w in class_weights],
            rng=torch.get_rng_state(),
            config=config.to_dict(),
        ).to_state()
        path = None
        if is_main:
            path = run / f"ckpt_{step:07d}.pt"
            _atomic_save(state, path)
            _atomic_save(state, run / "last.pt")
            kept = sorted(run.glob("ckpt_*.pt"))
            for old in kept[: max(len(kept) - config.keep_checkpoints, 0)]:
                old.unlink()
            task.save_product(model, run, step)  # e.g. the camera backbone, next to the checkpoints
        if world > 1:
            torch.distributed.barrier()
        return path

    from driveengine.progress import progress

    display = progress(
        config.max_steps - step,
        desc="pretrain",
        unit="step",
        rate_unit="sample",
        show=is_main and config.progress,
    )
    with display as bar:
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
            gt_sem = batch_tensor(batch, "semantics")
            sync = micro == config.grad_accum
            ctx = train_model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = forward_model(**task.inputs(batch, device))
                check_outputs(out, grid, classes, config.modality)
                terms = criterion(
                    out["semantics"], out["flow"], gt_sem, batch_tensor(batch, "flow"), task.mask(batch, out)
                )
                (terms["loss"] / config.grad_accum).backward()
            for k in acc:
                acc[k] += float(terms[k].detach()) / config.grad_accum
            samples += gt_sem.shape[0] * world
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
            bar.set_postfix(f"loss {acc['loss']:.4f}")
            bar.update(1, amount=config.batch_size * config.grad_accum * world)
            if csv_log and config.log_every and step % config.log_every == 0:
                now = time.perf_counter()
                csv_log.write(
                    {"step": step, "epoch": epoch, "phase": "train", **{k: f"{v:.9g}" for k, v in acc.items()},
                     "lr": f"{scheduler.get_last_lr()[0]:.6g}", "samples_per_s": f"{samples / max(now - tick, 1e-9):.3f}"}
                )  # fmt: skip
                tick, samples = now, 0
            acc = dict.fromkeys(acc, 0.0)
            if config.eval_every and (step % config.eval_every == 0 or step == config.max_steps):
                last_eval = evaluate(
                    model, eval_stream, device, task, grid, classes, config.eval_frames, amp, config.modality
                )
                if csv_log:
                    csv_log.write(
                        {"step": step, "epoch": epoch, "phase": "eval",
                         **{k: _csv_number(last_eval[k]) for k in CSV_COLUMNS if k in last_eval}}
                    )  # fmt: skip
            if step == config.max_steps or (config.ckpt_every and step % config.ckpt_every == 0):
                last_ckpt = save_checkpoint() or last_ckpt
    return PretrainSummary(
        run_dir=str(run), step=step, epoch=epoch, train_loss=losses, eval=last_eval,
        checkpoint=None if last_ckpt is None else str(last_ckpt), device=str(device), world_size=world, rank=rank,
        grid=grid, classes=classes,
    )  # fmt: skip
