"""The product of camera pre-training: the image backbone's weights alone, named as downstream code names them.

``backbone.pth`` is a plain ``torch.save``-d ``state_dict`` (``dict[str, Tensor]``) whose keys are those of
the network downstream code instantiates for the backbone (:mod:`driveengine.models.backbones`):

* ResNets: torchvision's / mmdet's ``ResNet`` names (``conv1.weight``, ``bn1.running_mean``,
  ``layer1.0.conv1.weight``, ..., ``layer4.1.downsample.0.weight``), without ``fc.*``;
* VoVNet-99: the mmdet3d plugins' ``VoVNet(spec_name='V-99-eSE')`` names (``stem.stem_1/conv.weight``,
  ``stage2.OSA2_1.layers.0.OSA2_1_0/conv.weight``, ``stage2.OSA2_1.ese.fc.bias``, ...).

At the published width (64) it loads with strict matching into that network (or, with ``strict=False``,
into torchvision's ResNet with its ``fc``). ``backbone.json`` next to it (:class:`BackboneInfo`) records
the backbone, width, image normalisation, stages, provenance and the downstream config lines that load the
file (``img_backbone=dict(..., init_cfg=dict(type='Pretrained', checkpoint=...))`` and ``img_norm_cfg``).
With ``key_prefix='img_backbone.'`` the keys carry the detector's prefix, for an mmdet ``load_from``.

Also here: reading weights the user already has into a backbone (:func:`load_backbone_weights`), used
by :class:`~driveengine.models.camera.CameraOccupancyNet` to start from ImageNet (or DD3D) weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from driveengine.files import atomic_path, atomic_write_bytes
from driveengine.models.backbones import (
    PUBLISHED_WIDTH,
    BackboneError,
    BackboneSpec,
    ImageNormalisation,
    expected_shapes,
    identify_backbone,
    state_mismatches,
)

__all__ = [
    "BACKBONE_PREFIX",
    "BackboneError",
    "BackboneInfo",
    "DownstreamConfig",
    "ExportedBackbone",
    "backbone_state_dict",
    "export_backbone",
    "infer_resnet_config",
    "load_backbone_weights",
    "save_backbone",
]

#: Prefix of the backbone's parameters inside the camera model's ``state_dict``.
BACKBONE_PREFIX = "backbone."
#: Prefixes added by wrappers (DDP, ``torch.compile``), stripped before anything else.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Where a backbone sits inside checkpoints of whole models, most specific first: an mmdet3d detector
#: (``img_backbone.``; e.g. ``fcos3d_vovnet_imgbackbone-remapped.pth``), a detectron2 FPN model such as
#: DD3D's (``backbone.bottom_up.``), a DriveEngine camera model or an mmdet 2D detector (``backbone.``).
_MODEL_PREFIXES = ("img_backbone.", "backbone.bottom_up.", BACKBONE_PREFIX)
#: Buffers that may be absent from a weights file (frozen-BN conversions); BatchNorm fills them in.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_KEY_PREFIX_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*\.)*$")


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def backbone_state_dict(model_state: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's ``state_dict`` from a camera model or its ``state_dict``.

    Keys ``backbone.<name>`` become ``<name>``; wrapper prefixes (``module.``, ``_orig_mod.``) are
    removed first. Tensors are detached CPU copies.

    Raises:
        BackboneError: there is no ``backbone.*`` key (not a camera model).
    """
    state = model_state.state_dict() if isinstance(model_state, nn.Module) else model_state
    state = _strip_wrappers(state)
    out = {
        k[len(BACKBONE_PREFIX) :]: v.detach().cpu().clone()
        for k, v in state.items()
        if k.startswith(BACKBONE_PREFIX) and isinstance(v, torch.Tensor)
    }
    if not out:
        raise BackboneError("the model holds no camera backbone (no 'backbone.*' parameters)")
    return out


def infer_resnet_config(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """``(depth, width)`` of a torchvision-named ResNet ``state_dict``.

    Raises:
        BackboneError: the keys and shapes are exactly no registered ResNet.
    """
    spec, width = identify_backbone(state)
    depth = spec.facts.get("depth")
    if not isinstance(depth, int):
        raise BackboneError(f"the weights are a {spec.title}, not a ResNet")
    return depth, width


# -- backbone.json ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownstreamConfig:
    """The downstream config lines that load an exported backbone file.

    Attributes:
        framework: the code base the lines belong to.
        lines: Python lines for the config (the backbone dict with its ``init_cfg``, the neck channels as
            a comment, ``img_norm_cfg``; for an ``img_backbone.`` prefix also the ``load_from`` line).
    """

    framework: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class BackboneInfo:
    """What ``backbone.json`` says about ``backbone.pth`` (written by :func:`save_backbone`).

    Attributes:
        backbone: registry name (``resnet101``, ``vovnet99``); architecture: its title.
        format: whose names the keys follow (and their prefix, if any).
        width: channels of the first convolution; published_width: that of the published network.
        downstream_compatible: ``width == published_width`` (otherwise only DriveEngine builds it).
        key_prefix: prefix of every key (``""`` or e.g. ``"img_backbone."``).
        tensors: entries of the ``state_dict``; parameters: trainable parameters (no buffers).
        stages: downstream name -> ``{"channels", "stride"}`` of the four maps the backbone returns.
        input: the image normalisation the weights were trained with (channel order, mean and std of
            0..255 pixels in that order).
        downstream: the config lines that load the file (None at a non-published width).
        facts: backbone-specific entries (``depth``, ``spec_name``), written at the top level.
        source: provenance (``step``, ``run_dir``, ``source_checkpoint``), written at the top level.
    """

    backbone: str
    architecture: str
    format: str
    width: int
    published_width: int
    downstream_compatible: bool
    key_prefix: str
    tensors: int
    parameters: int
    stages: dict[str, dict[str, int]]
    input: ImageNormalisation
    downstream: DownstreamConfig | None
    facts: dict[str, int | str | bool]
    source: dict[str, int | str]

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object (``facts`` and ``source`` merged into the top level)."""
        out = asdict(self)
        facts, source = out.pop("facts"), out.pop("source")
        if self.downstream is None:
            out["note"] = (
                f"width {self.width} is not the published width {self.published_width}: no downstream network "
                f"has these shapes; the file loads only into DriveEngine's {self.architecture} at width {self.width}"
            )
        return {**out, **facts, **source}


def downstream_config(
    spec: BackboneSpec, width: int, path: Path, key_prefix: str = ""
) -> DownstreamConfig | None:
    """The config lines that load ``path`` (a ``spec`` backbone at ``width``) downstream, or None when
    ``width`` is not the published width (no downstream network has those shapes)."""
    if width != PUBLISHED_WIDTH:
        return None
    checkpoint = str(path.resolve())
    prefix = f", prefix={key_prefix!r}" if key_prefix else ""
    channels = expected_out_channels(spec, width)
    used = [channels[i] for i in spec.downstream_outputs]
    lines = [
        f"img_backbone=dict(type={spec.downstream_type!r}, {spec.downstream_args}, "
        f"init_cfg=dict(type='Pretrained', checkpoint={checkpoint!r}{prefix})),",
        f"# img_neck in_channels for these outputs: {used} (all four stages: {list(channels)})",
        spec.normalisation.mmdet_img_norm_cfg(),
    ]
    if key_prefix == "img_backbone.":
        lines.append(f"# or, without init_cfg in img_backbone: load_from = {checkpoint!r}")
    return DownstreamConfig(spec.downstream_framework, tuple(lines))


def expected_out_channels(spec: BackboneSpec, width: int) -> tuple[int, ...]:
    """Channels of the four maps ``spec`` returns at ``width`` (built on the meta device)."""
    with torch.device("meta"):
        return tuple(spec.build(width, 3).out_channels)


def backbone_info(
    spec: BackboneSpec, width: int, state: Mapping[str, torch.Tensor], path: Path, key_prefix: str,
    source: Mapping[str, int | str],
) -> BackboneInfo:  # fmt: skip
    """The :class:`BackboneInfo` of a ``spec`` backbone ``state`` at ``width`` written to ``path``."""
    with torch.device("meta"):
        module = spec.build(width, 3)
    parameters = sum(p.numel() for p in module.parameters())
    return BackboneInfo(
        backbone=spec.name,
        architecture=spec.title,
        format=spec.naming + (f", every key prefixed with {key_prefix!r}" if key_prefix else ""),
        width=width,
        published_width=PUBLISHED_WIDTH,
        downstream_compatible=width == PUBLISHED_WIDTH,
        key_prefix=key_prefix,
        tensors=len(state),
        parameters=int(parameters),
        stages={
            name: {"channels": int(c), "stride": int(s)}
            for name, c, s in zip(spec.stage_names, module.out_channels, module.strides, strict=True)
        },
        input=spec.normalisation,
        downstream=downstream_config(spec, width, path, key_prefix),
        facts=dict(spec.facts),
        source=dict(source),
    )


# -- writing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedBackbone:
    """A written backbone: the ``.pth`` file, its ``.json`` and what the JSON says."""

    path: Path
    meta_path: Path
    info: BackboneInfo


def save_backbone(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    info: Mapping[str, int | str] | None = None,
    key_prefix: str = "",
) -> ExportedBackbone:
    """Write the backbone of a camera model to ``path`` and ``<stem>.json`` beside it.

    The backbone is identified from its weights (:func:`~driveengine.models.backbones.identify_backbone`:
    exactly the keys and shapes of a registered backbone). Both files are written atomically (temporary
    name, then rename), so a reader never sees half a file.

    Args:
        model: the camera model (or its ``state_dict``).
        path: the ``.pth`` file.
        info: provenance for the JSON file (source checkpoint, step, ...).
        key_prefix: prepended to every key (``"img_backbone."`` for an mmdet ``load_from``).

    Raises:
        BackboneError: not a camera model, an unregistered backbone, or a malformed ``key_prefix``.
    """
    if not _KEY_PREFIX_RE.match(key_prefix):
        raise BackboneError(
            f"--key-prefix {key_prefix!r}: expected dotted identifiers ending with '.', e.g. 'img_backbone.'"
        )
    state = backbone_state_dict(model)
    spec, width = identify_backbone(state)
    path = Path(path)
    out_state = {f"{key_prefix}{k}": v for k, v in state.items()}
    with atomic_path(path, durable=False) as tmp:
        torch.save(out_state, tmp)
    meta = backbone_info(spec, width, state, path, key_prefix, dict(info or {}))
    meta_path = path.with_suffix(".json")
    text = json.dumps(meta.to_json_dict(), indent=1, allow_nan=False) + "\n"
    atomic_write_bytes(meta_path, text.encode(), durable=False)
    return ExportedBackbone(path, meta_path, meta)


def export_backbone(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, key_prefix: str = ""
) -> ExportedBackbone:
    """``driveengine export-backbone``: the backbone of a pre-training checkpoint as ``backbone.pth``.

    Args:
        checkpoint: a checkpoint of ``driveengine pretrain`` (a dict with ``model``) or a bare model
            ``state_dict``.
        out: the output file (default: ``backbone.pth`` next to the checkpoint).
        key_prefix: prepended to every key (see :func:`save_backbone`).

    Raises:
        BackboneError: the file is missing or unreadable, or holds no camera model (e.g. a LiDAR run).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise BackboneError(f"{checkpoint}: no such checkpoint file")
    try:  # weights_only: a checkpoint from elsewhere cannot run code while it is read
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise BackboneError(
            f"{checkpoint}: unreadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); expected a "
            "`driveengine pretrain` checkpoint (tensors, numbers, strings, lists and dicts only)"
        ) from None
    state = data.get("model", data) if isinstance(data, Mapping) else None
    if not isinstance(state, Mapping):
        raise BackboneError(f"{checkpoint}: not a checkpoint (expected a dict with a 'model' state_dict)")
    try:
        backbone_state_dict(state)
    except BackboneError:
        config = data.get("config") if isinstance(data, Mapping) else None
        modality = config.get("modality", "lidar") if isinstance(config, Mapping) else "?"
        raise BackboneError(
            f"{checkpoint}: the checkpoint holds no camera model (modality {modality!r}, no 'backbone.*' "
            "weights); export a checkpoint of `driveengine pretrain --modality camera`"
        ) from None
    target = Path(out) if out is not None else checkpoint.with_name("backbone.pth")
    info: dict[str, int | str] = {"source_checkpoint": str(checkpoint)}
    if isinstance(data, Mapping) and isinstance(data.get("step"), int):
        info["step"] = int(data["step"])
    try:
        return save_backbone(state, target, info, key_prefix)
    except BackboneError as exc:
        raise BackboneError(f"{checkpoint}: {exc}") from None


# -- reading weights the user has -----------------------------------------------------------------------


def _select_backbone_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone's entries of a weights file: wrapper prefixes removed, then, if the file holds a whole
    model, only the keys under the most specific backbone prefix present (prefix removed)."""
    state = _strip_wrappers(state)
    for prefix in _MODEL_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _what_it_is(data: Mapping[str, Any]) -> str:
    """A hint naming the registered backbone a mismatching weights file holds, when it holds one."""
    state = {k: v for k, v in _select_backbone_keys(data).items() if isinstance(v, torch.Tensor)}
    try:
        spec, width = identify_backbone(state, lenient=True)
    except BackboneError:
        return "use weights of the same backbone"
    return f"the file holds {spec.title} weights at width {width}: use --backbone {spec.name} --width {width}"


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> None:
    """Initialise a registered ``backbone`` (a ResNet or a VoVNet, RGB input) from a local weights file.

    Accepted: a bare ``state_dict`` (torchvision's ``resnet101-*.pth``; a VoVNet-99 in the mmdet3d
    plugins' names; an exported ``backbone.pth``) or a dict holding one under ``state_dict`` / ``model``;
    wrapper prefixes (``module.``) are removed; a whole model's checkpoint contributes the keys under
    ``img_backbone.`` (mmdet3d detectors, e.g. ``fcos3d_vovnet_imgbackbone-remapped.pth``),
    ``backbone.bottom_up.`` (detectron2 FPN models such as DD3D's) or ``backbone.`` (DriveEngine camera
    models, mmdet detectors), most specific first. The ImageNet classifier of a ResNet (``fc.*``) is
    ignored; ``num_batches_tracked`` may be missing. Every other key must be present with the same shape
    and finite values (strict matching), so a wrong architecture or width fails here rather than
    training from a half-loaded network. The file is read with ``torch.load(weights_only=True)``: a
    pickle that would run code or build arbitrary objects is refused before anything runs.

    Raises:
        BackboneError: missing, unreadable or unsafe file, not a state_dict, non-finite values, or keys /
            shapes that do not match (one line naming the file, the backbone and the mismatch).
    """
    spec, width = identify_backbone(backbone.state_dict())
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"{path}: no such backbone weights file (give a local .pth of {spec.title} weights)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, zip errors, truncated files, ...
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise BackboneError(
            f"{path}: unreadable or unsafe weights file, refused ({type(exc).__name__}: {first_line}); expected a "
            "state_dict saved with torch.save (tensors in dicts only)"
        ) from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise BackboneError(
            f"{path}: expected a state_dict (a dict of named tensors), got {type(data).__name__}"
        )
    state = _select_backbone_keys(data)
    state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_keys)}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise BackboneError(f"{path}: {len(not_tensors)} entries are not tensors (e.g. {not_tensors[:3]})")
    problems = state_mismatches(expected_shapes(spec, width), state, _OPTIONAL_SUFFIXES)
    if problems:
        raise BackboneError(
            f"{path}: does not match {spec.title} at width {width} ({spec.naming}): "
            + "; ".join(problems)
            + f" ({_what_it_is(data)}; published weights need --width {PUBLISHED_WIDTH})"
        )
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise BackboneError(f"{path}: non-finite values (NaN or inf) in {len(bad)} tensors (e.g. {bad[:3]})")
    backbone.load_state_dict(state, strict=False)  # strictness checked above (num_batches_tracked optional)
