"""Pre-training tasks: the glue between the stream and a model, one registered object per ``--modality``.

The loop (:func:`driveengine.train.loop.pretrain`) owns the machinery every run shares: streams, AdamW,
the schedule, bf16, DDP, checkpoints, ``metrics.csv``, the loss (:class:`~driveengine.train.loss.
OccupancyLoss`) and the metrics (:class:`~driveengine.evaluation.metrics.OccupancyMetrics`). What depends
on the model is a :class:`PretrainingTask`:

* :attr:`~PretrainingTask.fields`: the :class:`~driveengine.data.FrameStream` fields it needs (with
  ``semantics`` and ``flow``, the targets);
* :meth:`~PretrainingTask.stream_options`: other stream options (:class:`StreamOptions`: image size,
  history frames, point sweeps);
* :meth:`~PretrainingTask.build_model`: the model for the split's voxel grid and class table (both read
  from the split's manifest by the loop); it returns :data:`~driveengine.models.heads.ModelOutputs`
  (``semantics`` logits over the table's ids, ``flow``);
* :meth:`~PretrainingTask.inputs`: the model's keyword arguments from a collated batch;
* :meth:`~PretrainingTask.mask`: the voxels that count in the loss and the metrics;
* :meth:`~PretrainingTask.save_product`: what the run is for besides the checkpoint, written with every
  checkpoint (the camera task: the image backbone alone, ``backbone.pth``), or nothing.

Tasks are registered by name (:func:`register_task`; ``lidar`` and ``camera`` here), each with a factory
that makes the task from a :class:`~driveengine.train.config.PretrainConfig`; ``pretrain --modality
<name>`` / ``PretrainConfig(modality=<name>)`` runs it. Adding a model is one module in
``driveengine/models/``, one task class and one :func:`register_task` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from driveengine.errors import DriveEngineError
from driveengine.models.heads import ModelOutputs
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import ClassTable
from driveengine.train.config import PretrainConfig

#: One value of a collated batch (:func:`~driveengine.data.collate.collate_frames`): a tensor stacked over
#: the batch, one tensor per sample (``points``), or one Python value per sample (tokens, dicts).
BatchValue = torch.Tensor | list[torch.Tensor] | list[object]
#: A collated batch: field name -> value.
Batch = dict[str, BatchValue]
#: Keyword arguments of a model's ``forward``.
ModelInputs = dict[str, torch.Tensor | list[torch.Tensor]]

#: Image size (width, height) pixels the stream resizes camera images to unless a task asks otherwise.
DEFAULT_IMAGE_SIZE: tuple[int, int] = (384, 216)


class TaskError(DriveEngineError):
    """A pre-training task is unknown, registered twice, or cannot use a batch."""


@dataclass(frozen=True)
class StreamOptions:
    """The :class:`~driveengine.data.FrameStream` options a task sets besides its fields.

    Attributes:
        image_size: (width, height) pixels images are resized to (intrinsics scaled accordingly).
        history: previous key frames delivered with each sample (``history_*`` keys).
        point_sweeps: previous key frames' points added to ``points`` (with a time-lag column).
        image_dtype: ``"uint8"`` (RGB 0..255: a quarter of the bytes through the loader; the model scales
            them on the device) or ``"float32"`` (RGB in [0, 1]).
    """

    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    history: int = 0
    point_sweeps: int = 0
    image_dtype: str = "uint8"


@runtime_checkable
class PretrainingTask(Protocol):
    """What a pre-training run does specifically for its model (see the module docstring)."""

    @property
    def fields(self) -> tuple[str, ...]:
        """Stream fields the task reads (the targets ``semantics``, ``flow`` and usually ``mask_lidar`` too)."""
        ...

    def stream_options(self) -> StreamOptions:
        """Stream options besides the fields."""
        ...

    def build_model(self, grid: VoxelGrid, classes: ClassTable) -> nn.Module:
        """The model for the split's label ``grid`` and class table; its ``forward(**inputs(batch))``
        returns ``semantics`` (B, classes.free + 1, nx, ny, nz) logits and ``flow`` (B, nx, ny, nz, 2) m/s."""
        ...

    def inputs(self, batch: Batch, device: torch.device | None = None) -> ModelInputs:
        """Keyword arguments of the model's ``forward`` for a collated batch, moved to ``device``."""
        ...

    def mask(self, batch: Batch, outputs: ModelOutputs) -> torch.Tensor | None:
        """(B, nx, ny, nz) bool: the voxels that count in the loss and the metrics (None = all)."""
        ...

    def save_product(self, model: nn.Module, run_dir: Path, step: int) -> Path | None:
        """Write the run's product besides the checkpoint into ``run_dir`` (after the checkpoint of
        ``step``, on the main process, from the unwrapped model); returns its path, or None when the
        task has none."""
        ...


#: Makes a task from a run's config (may raise a DriveEngineError for options the task cannot use).
TaskFactory = Callable[[PretrainConfig], PretrainingTask]

_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory) -> None:
    """Register ``factory`` as ``--modality name``.

    Raises:
        TaskError: ``name`` is already registered (unregister it first).
    """
    if name in _REGISTRY:
        raise TaskError(f"pre-training task {name!r} is already registered")
    _REGISTRY[name] = factory


def unregister_task(name: str) -> None:
    """Remove the task ``name`` (e.g. a test's); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def task_names() -> tuple[str, ...]:
    """The registered task names, in registration order."""
    return tuple(_REGISTRY)


def pretraining_task(config: PretrainConfig) -> PretrainingTask:
    """The task of ``config.modality``, made by its registered factory.

    Raises:
        TaskError: no task of that name, or the factory made something that is not a PretrainingTask.
    """
    factory = _REGISTRY.get(config.modality)
    if factory is None:
        raise TaskError(
            f"unknown modality {config.modality!r}: use one of {', '.join(task_names())} (a new model "
            "registers its task with driveengine.train.tasks.register_task)"
        )
    task = factory(config)
    if not isinstance(task, PretrainingTask):
        raise TaskError(
            f"the task factory of {config.modality!r} returned a {type(task).__name__}, which lacks the "
            "PretrainingTask methods (fields, stream_options, build_model, inputs, mask, save_product)"
        )
    return task


def batch_tensor(batch: Batch, key: str) -> torch.Tensor:
    """``batch[key]`` as one tensor.

    Raises:
        TaskError: the batch has no ``key`` or it is not one stacked tensor.
    """
    value = batch.get(key)
    if not isinstance(value, torch.Tensor):
        what = "no such field" if value is None else f"a {type(value).__name__}, not one tensor"
        raise TaskError(f"batch field {key!r}: {what} (stream it: FrameStream fields)")
    return value


def _to(value: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return value if device is None else value.to(device, non_blocking=device.type == "cuda")


# -- LiDAR: points -> BEV encoder-decoder ----------------------------------------------------------------


@dataclass(frozen=True)
class LidarTask:
    """``--modality lidar``: key-frame points -> :class:`~driveengine.models.lidar.LidarOccupancyNet`.

    The voxels that count are the LiDAR-observed ones (``mask_lidar``); the product is the whole model
    (the checkpoint), nothing besides.

    Attributes:
        depth, width, decoder_channels, stem_stride, output_stride: the model's (see
            :class:`~driveengine.models.lidar.LidarOccupancyNet`).
    """

    depth: int = 18
    width: int = 16
    decoder_channels: int = 32
    stem_stride: int = 4
    output_stride: int = 2
    fields: tuple[str, ...] = ("points", "semantics", "flow", "mask_lidar")

    @classmethod
    def from_config(cls, config: PretrainConfig) -> LidarTask:
        """The task of a :class:`~driveengine.train.config.PretrainConfig`."""
        return cls(
            depth=config.depth, width=config.width, decoder_channels=config.decoder_channels,
            stem_stride=config.stem_stride, output_stride=config.output_stride,
        )  # fmt: skip

    def stream_options(self) -> StreamOptions:
        """Nothing besides the fields."""
        return StreamOptions()

    def build_model(self, grid: VoxelGrid, classes: ClassTable) -> nn.Module:
        """The LiDAR model for the label ``grid`` and ``classes``."""
        from driveengine.models.lidar import LidarOccupancyNet

        return LidarOccupancyNet(
            grid, depth=self.depth, width=self.width, decoder_channels=self.decoder_channels,
            stem_stride=self.stem_stride, output_stride=self.output_stride, classes=classes,
        )  # fmt: skip

    def inputs(self, batch: Batch, device: torch.device | None = None) -> ModelInputs:
        """``{"points": [(N_i, 4) per sample]}`` on ``device`` (the batch holds one tensor per sample, or
        one (B, N, 4) tensor when every sample has the same number of points).

        Raises:
            TaskError: the batch has no ``points``.
        """
        points = batch.get("points")
        if isinstance(points, torch.Tensor):
            per_sample = list(points.unbind(0))
        elif isinstance(points, list) and all(isinstance(p, torch.Tensor) for p in points):
            per_sample = [p for p in points if isinstance(p, torch.Tensor)]
        else:
            raise TaskError("batch field 'points': expected point tensors (stream the 'points' field)")
        return {"points": [_to(p, device) for p in per_sample]}

    def mask(self, batch: Batch, outputs: ModelOutputs) -> torch.Tensor | None:
        """The LiDAR-observed voxels (``mask_lidar``), or None (all) without it."""
        return batch_tensor(batch, "mask_lidar") if "mask_lidar" in batch else None

    def save_product(self, model: nn.Module, run_dir: Path, step: int) -> Path | None:
        """None: the checkpoint is the product."""
        return None


# -- cameras: images -> backbone + FPN + lift -------------------------------------------------------------


@dataclass(frozen=True)
class CameraTask:
    """``--modality camera``: the dataset's camera images -> :class:`~driveengine.models.camera.
    CameraOccupancyNet`; the product is the image backbone in the naming downstream code loads.

    The voxels that count are the camera-observed ones: the labels' ``mask_camera`` (occlusion-aware, see
    :mod:`driveengine.labels.camera_visibility`) when every training split has it; otherwise the model's
    own visibility (voxel centres inside some image, occlusion ignored) and, when the batch has
    ``mask_lidar``, LiDAR-observed.

    Attributes:
        backbone: registered backbone name (``resnet18`` .. ``resnet101``, ``vovnet99``).
        width: channels of its first convolution (64 = the published network, needed to load published
            weights and to use the export downstream).
        neck_channels: FPN output channels (= channels of every lifted voxel).
        decoder_channels: BEV decoder width.
        image_size: (W, H) pixels the stream resizes the images to (intrinsics scaled accordingly).
        lift_voxel_size_m: lift grid voxel size (None = the label grid's).
        feature_level: FPN level sampled by the lift (1 = stride 8).
        history: previous key frames fused (the stream then also delivers their images).
        backbone_weights: local weights file of the backbone to start from (None = random init).
        mask_camera: the stored ``mask_camera`` is the loss and metric mask (:meth:`from_config` sets it
            when every split of the run holds the array).
    """

    backbone: str = "resnet18"
    width: int = 64
    neck_channels: int = 64
    decoder_channels: int = 64
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    lift_voxel_size_m: float | None = None
    feature_level: int = 1
    history: int = 0
    backbone_weights: str | None = None
    mask_camera: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        """The stream fields: images and targets, with ``mask_camera`` when the run uses it."""
        base = ("images", "semantics", "flow", "mask_lidar")
        return (*base, "mask_camera") if self.mask_camera else base

    @classmethod
    def from_config(cls, config: PretrainConfig) -> CameraTask:
        """The task of a :class:`~driveengine.train.config.PretrainConfig`: ``backbone`` (None, as in configs
        written before it existed: ``resnet<depth>``), ``width``, ``decoder_channels``, ``image_size`` (None =
        the default), ``lift_voxel_size_m``, ``camera_history``, ``backbone_weights``.

        Raises:
            BackboneError: an unknown backbone name.
        """
        from driveengine.models.backbones import get_backbone, resolve_backbone_name

        backbone = config.backbone or resolve_backbone_name(None, config.depth)
        image_size = DEFAULT_IMAGE_SIZE if config.image_size is None else config.image_size
        return cls(
            backbone=get_backbone(backbone).name, width=config.width, decoder_channels=config.decoder_channels,
            image_size=(int(image_size[0]), int(image_size[1])), lift_voxel_size_m=config.lift_voxel_size_m,
            history=config.camera_history, backbone_weights=config.backbone_weights,
            mask_camera=_splits_hold(config, "mask_camera"),
        )  # fmt: skip

    def stream_options(self) -> StreamOptions:
        """The image size and the history frames."""
        return StreamOptions(image_size=self.image_size, history=self.history)

    def build_model(self, grid: VoxelGrid, classes: ClassTable) -> nn.Module:
        """The camera model for the label ``grid`` and ``classes`` (backbone from ``backbone_weights``)."""
        from driveengine.models.camera import CameraOccupancyNet

        return CameraOccupancyNet(
            grid, backbone=self.backbone, width=self.width, neck_channels=self.neck_channels,
            decoder_channels=self.decoder_channels, feature_level=self.feature_level,
            lift_voxel_size_m=self.lift_voxel_size_m, history=self.history, pretrained=self.backbone_weights,
            classes=classes,
        )  # fmt: skip

    def inputs(self, batch: Batch, device: torch.device | None = None) -> ModelInputs:
        """The model's keyword arguments (:meth:`~driveengine.models.camera.CameraOccupancyNet.inputs_from_batch`)."""
        from driveengine.models.camera import CameraOccupancyNet

        return dict(CameraOccupancyNet.inputs_from_batch(batch, device))

    def mask(self, batch: Batch, outputs: ModelOutputs) -> torch.Tensor | None:
        """The labels' ``mask_camera`` when the batch has it; else camera-visible voxels (the model's
        ``visible``), and LiDAR-observed ones when the batch has ``mask_lidar``."""
        visible = outputs["visible"]
        if "mask_camera" in batch:
            return batch_tensor(batch, "mask_camera").to(visible.device)
        if "mask_lidar" in batch:
            return visible & batch_tensor(batch, "mask_lidar").to(visible.device)
        return visible

    def save_product(self, model: nn.Module, run_dir: Path, step: int) -> Path | None:
        """``<run_dir>/backbone.pth`` (+ ``backbone.json``) from the camera model."""
        from driveengine.models.export import save_backbone

        return save_backbone(
            model, Path(run_dir) / "backbone.pth", {"step": int(step), "run_dir": str(run_dir)}
        ).path


def _splits_hold(config: PretrainConfig, array: str) -> bool:
    """Whether every training split of ``config`` holds label array ``array`` (its first labelled log's
    group is opened; a split that cannot be opened counts as not holding it: the run reports it later)."""
    from driveengine.store.dataset import open_split

    sources = config.sources()
    if not sources:
        return False
    for source in sources:
        root = str(source.root)
        path = f"{root.rstrip('/')}/{source.split}" if "://" in root else Path(root) / source.split
        try:
            split = open_split(path, storage_options=config.storage_options)
            labelled = [log for log in split.logs if log.has_labels]
            if not labelled or array not in labelled[0].labels().arrays:
                return False
        except (DriveEngineError, OSError):
            return False
    return True


register_task("lidar", LidarTask.from_config)
register_task("camera", CameraTask.from_config)
