"""Configuration of a pre-training run (``driveengine pretrain``): one dataclass, JSON round-trip."""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

from driveengine.errors import DriveEngineError

#: Keys of configs written by older versions that no longer mean anything (``demo_dir``: training made
#: the demo data itself when ``data`` was missing; now ``make pretrain`` and the demo do).
RETIRED_KEYS: frozenset[str] = frozenset({"demo_dir"})

#: Largest ``--config`` file read (a run's config.json is about 2 KB).
MAX_CONFIG_BYTES = 1 << 20

#: Values of ``PretrainConfig.classes`` (see there).
CLASS_MODES: tuple[str, ...] = ("auto", "native", "unified")


class PretrainError(DriveEngineError):
    """A pre-training run cannot start or continue (bad options, data, device or checkpoint)."""


@dataclass(frozen=True)
class DataSource:
    """One collected split a run trains on.

    Attributes:
        root: the collect output folder ``OUT`` (local or fsspec URL).
        split: the split folder under ``root``.
        weight: its weight in a mix (expected share of the samples = weight / sum of the weights;
            :class:`~driveengine.data.MixedStream`); None for every source = every frame once per epoch.
    """

    root: str
    split: str
    weight: float | None = None


@dataclass
class PretrainConfig:
    """Everything that defines an occupancy/flow pre-training run.

    The voxel grid and the class table are not options: they are the training split's (its manifest).

    Data:
        data: collect output folder ``OUT`` (local or fsspec URL); required by
            :func:`~driveengine.train.loop.pretrain` (``make pretrain`` or ``python -m driveengine.demo
            --data-only`` make the demo data).
        split: split folder under ``data`` to train on; ``eval_split``: to evaluate on (default: ``split``;
            it must have the same grid and class table).
        storage_options: fsspec options for a URL ``data``.
        blob_root: folder the frame rows' sensor paths start from (default: as each log was collected).
        num_workers: DataLoader workers per rank.
        eval_frames: frames of the eval split to evaluate on (0 = all).
        mix: several splits to train on together (:class:`DataSource` with weights; ``data`` is then None):
            one :class:`~driveengine.data.MixedStream`, mixed by weight (none: every frame of every split
            once per epoch), batches from one split where shapes differ; evaluated on each source's
            ``eval_split`` (default: its split), every frame once. Their grids must agree (one model
            predicts one grid); ``blob_root`` and ``storage_options`` apply to every source.
        classes: the label classes trained on: "native" (the split's own table; a mix's splits must share
            it), "unified" (every split's ids mapped onto the unified table,
            :data:`~driveengine.data.UNIFIED_CLASSES`), "auto" (native when the splits share a table, else
            unified).
        samples_per_epoch: weighted mixes: samples per data epoch (0 = the sum of the splits' frames).

    Model:
        modality: a registered pre-training task (:mod:`driveengine.train.tasks`): "lidar" (points -> BEV
            encoder-decoder) or "camera" (the dataset's images -> backbone + FPN + lift; the product is the
            image backbone, saved as ``backbone.pth``).
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
    storage_options: dict[str, object] | None = None
    blob_root: str | None = None
    num_workers: int = 0
    eval_frames: int = 8
    mix: list[DataSource] = field(default_factory=list)
    classes: str = "auto"
    samples_per_epoch: int = 0

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

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PretrainConfig:
        """A config from :meth:`to_dict` output; unknown keys are rejected, except those of older versions
        (:data:`RETIRED_KEYS`), which are ignored.

        Raises:
            ValueError: an unknown key.
        """
        data = {k: v for k, v in data.items() if k not in RETIRED_KEYS}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown pretrain config keys: {unknown}")
        if data.get("image_size") is not None:
            data = {**data, "image_size": tuple(data["image_size"])}
        if data.get("mix"):
            mix = data["mix"]
            try:
                sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in mix]
            except TypeError as exc:
                raise ValueError(
                    f"pretrain config 'mix' is not a list of (root, split, weight) records: {exc}"
                ) from None
            data = {**data, "mix": sources}
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], base: PretrainConfig | None = None) -> PretrainConfig:
        """The config in the JSON file ``path`` (a run's ``config.json``, or any subset of its keys), over
        ``base`` (default: the defaults) for the keys it does not hold.

        Raises:
            PretrainError: the file cannot be read, is not a JSON object, or holds an unknown key or a value
                of the wrong kind (one line naming the file and the key).
        """
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                raise PretrainError(
                    f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a pretrain config; give a run's config.json"
                )
            values = json.loads(raw.decode("utf-8"))
        except OSError as exc:
            raise PretrainError(f"{path}: cannot read the pretrain config ({exc.strerror or exc})") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise PretrainError(
                f"{path}: not a JSON pretrain config ({exc}); give a run's config.json"
            ) from None
        if not isinstance(values, dict):
            raise PretrainError(f"{path}: not a JSON object of pretrain options; give a run's config.json")
        names = {f.name for f in fields(cls)} | RETIRED_KEYS
        unknown = sorted(set(values) - names)
        if unknown:
            raise PretrainError(
                f"{path}: unknown pretrain config key {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + "; remove it (the keys are the fields of config.json that pretrain writes)"
            )
        defaults = cls()
        for key, value in values.items():
            expected = getattr(defaults, key, None)
            if isinstance(expected, bool | int | float | str) and not _same_kind(value, expected):
                raise PretrainError(
                    f"{path}: pretrain config key {key!r} is {value!r}; expected a {type(expected).__name__} "
                    f"like {expected!r}"
                )
        merged = {**(base or defaults).to_dict(), **values}
        try:
            return cls.from_dict(merged)
        except (TypeError, ValueError) as exc:
            raise PretrainError(f"{path}: not a pretrain config ({exc})") from None

    def sources(self) -> tuple[DataSource, ...]:
        """The splits the run trains on: ``mix``, else ``data`` / ``split`` (empty: no data given).

        Raises:
            PretrainError: both ``data`` and ``mix`` are given.
        """
        if self.mix:
            if self.data:
                raise PretrainError(
                    f"give the training data either as data={self.data!r} or as mix (several splits), not both"
                )
            return tuple(self.mix)
        return (DataSource(self.data, self.split),) if self.data else ()

    @classmethod
    def for_gpu(cls, **overrides: object) -> PretrainConfig:
        """Defaults of a real run on a GPU (full-width backbone, ResNet-18 unless chosen, larger batches);
        override any field."""
        base = dict(
            width=64, decoder_channels=128, stem_stride=4, output_stride=1, batch_size=8, max_steps=10_000, lr=1e-3,
            warmup_steps=500, num_workers=6, ckpt_every=1000, eval_every=1000, log_every=20, eval_frames=512,
        )  # fmt: skip
        base.update(overrides)
        return cls(**base)


def _is_split_folder(path: str, storage_options: Mapping[str, object] | None) -> bool:
    """Whether ``path`` (local or fsspec URL) is a collected split folder (it holds ``manifest.json``)."""
    from driveengine.store.manifest import MANIFEST_NAME

    if "://" not in path:
        return os.path.isfile(os.path.join(path, MANIFEST_NAME))
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        return bool(fs.isfile(posixpath.join(inner.rstrip("/"), MANIFEST_NAME)))
    except (OSError, ValueError, ImportError):
        return False


def data_sources(
    data: Sequence[str],
    splits: Sequence[str] = (),
    weights: str | Sequence[float] | None = None,
    storage_options: Mapping[str, object] | None = None,
) -> tuple[DataSource, ...]:
    """The splits of ``pretrain``'s repeatable ``--data`` / ``--split`` and its ``--weights``.

    * ``--split`` given once applies to every ``--data``; given as often as ``--data``, the ``i``-th goes
      with the ``i``-th;
    * without ``--split``, a ``--data`` that is a split folder itself (``OUT/SPLIT``, it holds
      ``manifest.json``) is that split of ``OUT``; any other ``--data`` is ``OUT`` with split ``mini``;
    * ``--weights 0.7,0.3``: one positive weight per ``--data`` (normalised to sum 1); without it, every
      frame of every split once per epoch.

    Raises:
        PretrainError: counts that do not match, or a weight that is not a finite positive number.
    """
    roots = [str(d) for d in data]
    if not roots:
        return ()
    chosen = [str(s) for s in splits]
    if chosen and len(chosen) not in (1, len(roots)):
        raise PretrainError(
            f"{len(chosen)} --split for {len(roots)} --data: give one --split for all, one per --data (in "
            "the same order), or none and --data OUT/SPLIT"
        )
    pairs = []
    for i, root in enumerate(roots):
        if chosen:
            pairs.append((root, chosen[0] if len(chosen) == 1 else chosen[i]))
        elif _is_split_folder(root, storage_options):
            trimmed = root.rstrip("/") if "://" in root else os.path.normpath(root)
            parent, name = (posixpath if "://" in root else os.path).split(trimmed)
            pairs.append((parent or ".", name))
        else:
            pairs.append((root, "mini"))
    values: list[float | None] = [None] * len(pairs)
    if weights is not None:
        if isinstance(weights, str):
            try:
                parsed = [float(w) for w in weights.split(",") if w.strip()]
            except ValueError:
                raise PretrainError(
                    f"--weights {weights!r}: expected numbers separated by commas, e.g. 0.7,0.3"
                ) from None
        else:
            parsed = [float(w) for w in weights]
        if len(parsed) != len(pairs):
            raise PretrainError(
                f"--weights {weights!r}: {len(parsed)} weights for {len(pairs)} --data (one each)"
            )
        if not all(math.isfinite(w) and w > 0 for w in parsed):
            raise PretrainError(f"--weights {weights!r}: every weight must be a finite number > 0")
        values = list(parsed)
    return tuple(DataSource(root, split, w) for (root, split), w in zip(pairs, values, strict=True))


def _same_kind(value: object, expected: object) -> bool:
    """Whether a JSON ``value`` can stand for a field whose default is ``expected`` (an int for a float, and
    a finite number; never a bool for a number)."""
    if isinstance(expected, bool):
        return isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, type(expected))


def load_config(path: str | os.PathLike[str], base: PretrainConfig | None = None) -> PretrainConfig:
    """:meth:`PretrainConfig.from_file` (``pretrain --config FILE``)."""
    return PretrainConfig.from_file(path, base)


def data_options(sources: Sequence[DataSource]) -> dict[str, object]:
    """The :class:`PretrainConfig` fields for ``sources``: ``data`` / ``split`` for one unweighted split (the
    config of a single-split run, as before mixes existed), else ``mix``."""
    if len(sources) == 1 and sources[0].weight is None:
        return {"data": sources[0].root, "split": sources[0].split, "mix": []}
    return {"data": None, "mix": list(sources)}
