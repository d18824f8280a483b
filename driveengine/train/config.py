"""Configuration of a pre-training run (``driveengine pretrain``): one dataclass, JSON round-trip."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class PretrainConfig:
    """Everything that defines a LiDAR-to-occupancy pre-training run.

    Data:
        data: collect output folder ``OUT`` (local or fsspec URL); ``None`` = the demo data (synthesised
            and collected under ``demo_dir`` if missing).
        split: split folder under ``data`` to train on; ``eval_split``: to evaluate on (default: ``split``).
        storage_options: fsspec options for a URL ``data``.
        blob_root: folder the frame rows' sensor paths start from (default: as each log was collected).
        num_workers: DataLoader workers per rank.
        eval_frames: frames of the eval split to evaluate on (0 = all).
        demo_dir: where the demo data lives / is made.

    Model:
        modality: "lidar" (points -> BEV encoder-decoder) or "camera" (8 images -> backbone + FPN + lift;
            the product is the image backbone, saved as ``backbone.pth``).
        backbone: camera runs: a registered backbone (:mod:`driveengine.models.backbones`: ``resnet18``,
            ``resnet34``, ``resnet50``, ``resnet101``, ``vovnet99``); None = ``resnet<depth>`` (configs
            written before the option existed).
        image_size: camera runs: (width, height) the images are resized to (None = the camera default);
            lift_voxel_size_m: camera runs: voxel size of the lift grid (None = the label grid's);
            camera_history: camera runs: previous key frames fused; backbone_weights: camera runs: a
            local weights file of the backbone to start from (torchvision ResNet, VoVNet-99 in the mmdet3d
            plugins' names).
        depth: ResNet depth (18, 34, 50, 101) of the LiDAR encoder; width: channels of the first
            convolution of the ResNet / camera backbone (64 = the published networks; every channel
            count scales with it); decoder_channels; stem_stride (LiDAR); output_stride: x-y cells of the
            decoder/heads in voxels (2 on CPU, 1 for real runs).

    Optimisation:
        batch_size: samples per rank per micro-step; grad_accum: micro-steps per optimiser step
            (global batch = batch_size * grad_accum * world size).
        max_steps: optimiser steps of the run; lr, weight_decay (AdamW), warmup_steps (linear), then
            cosine decay to ``lr * min_lr_ratio``; grad_clip (0 = off).
        flow_weight: factor of the flow loss; class_weight_frames: frames used to estimate the class
            weights (0 = uniform weights).
        amp: bf16 autocast on CUDA ("auto" = on when CUDA is used); compile: ``torch.compile`` the model.
        seed: data order and initialisation; deterministic: deterministic cuDNN kernels on CUDA (CPU
            kernels are deterministic: runs and resumes reproduce bitwise); cpu_threads: torch intra-op
            threads (0 = torch's default; 1 helps on small or shared machines and under torchrun).

    Bookkeeping:
        run_dir: parent of run folders; name: run folder name (``<run_dir>/<name>``: ``metrics.csv``,
            ``config.json``, checkpoints); ckpt_every, eval_every, log_every: in optimiser steps (0 = off);
            keep_checkpoints: newest step checkpoints kept (``last.pt`` always); resume: a checkpoint
            path, or "auto" for ``<run>/last.pt`` when it exists; progress: show a progress bar;
            device: "auto", "cpu", "cuda".
    """

    data: str | None = None
    split: str = "mini"
    eval_split: str | None = None
    storage_options: dict[str, Any] | None = None
    blob_root: str | None = None
    num_workers: int = 0
    eval_frames: int = 8
    demo_dir: str = "demo_data"

    modality: str = "lidar"
    backbone: str | None = None
    image_size: tuple[int, int] | None = None
    lift_voxel_size_m: float | None = None
    camera_history: int = 0
    backbone_weights: str | None = None
    depth: int = 18
    width: int = 16
    decoder_channels: int = 32
    stem_stride: int = 4
    output_stride: int = 2

    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int = 10
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0
    flow_weight: float = 0.5
    class_weight_frames: int = 8
    amp: str = "auto"
    compile: bool = False
    seed: int = 0
    deterministic: bool = True
    cpu_threads: int = 0

    run_dir: str = "runs"
    name: str = "pretrain"
    ckpt_every: int = 5
    eval_every: int = 5
    log_every: int = 1
    keep_checkpoints: int = 3
    resume: str | None = None
    progress: bool = True
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """A config from :meth:`to_dict` output; unknown keys are rejected."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown pretrain config keys: {unknown}")
        if data.get("image_size") is not None:
            data = {**data, "image_size": tuple(data["image_size"])}
        return cls(**data)

    @classmethod
    def for_gpu(cls, **overrides: Any) -> PretrainConfig:
        """Defaults of a real run on a GPU (full-width backbone, ResNet-18 unless chosen, larger batches);
        override any field."""
        base = dict(
            width=64, decoder_channels=128, stem_stride=4, output_stride=1, batch_size=8, max_steps=10_000, lr=1e-3,
            warmup_steps=500, num_workers=6, ckpt_every=1000, eval_every=1000, log_every=20, eval_frames=512,
        )  # fmt: skip
        base.update(overrides)
        return cls(**base)
