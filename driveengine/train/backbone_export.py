"""The product of camera pre-training: the image backbone's weights alone, in torchvision's format.

``backbone.pth`` is a plain ``torch.save``-d ``state_dict`` (``dict[str, Tensor]``) with torchvision's
ResNet names (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``, ...,
``layer4.1.downsample.0.weight``), without ``fc.*``, so a downstream detector loads it with::

    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(torch.load("backbone.pth"), strict=False)  # missing: fc.*

or strictly into :class:`driveengine.train.resnet.ResNet` of the same depth and width. A JSON file next
to it (``backbone.json``) records depth, width, the source checkpoint and step.

Also here: reading standard ResNet weights into a backbone (:func:`load_backbone_weights`), used by
:class:`~driveengine.train.model_camera.CameraOccupancyNet` to start from ImageNet weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from driveengine.errors import DriveEngineError
from driveengine.train.resnet import DEPTHS, ResNet

#: Prefix of the backbone's parameters inside the camera model's ``state_dict``.
BACKBONE_PREFIX = "backbone."
#: Prefixes added by wrappers (DDP, ``torch.compile``), stripped before anything else.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class BackboneError(DriveEngineError):
    """Backbone weights cannot be read, exported or loaded (the message names the file and the fix)."""


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
    """The backbone's ``state_dict`` with torchvision names, from a camera model or its ``state_dict``.

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
    """``(depth, width)`` of a torchvision-named ResNet ``state_dict`` (blocks per stage, bottleneck or not).

    Raises:
        BackboneError: the keys do not describe a ResNet of a supported depth.
    """
    try:
        width = int(state["conv1.weight"].shape[0])
    except KeyError:
        raise BackboneError("not a ResNet state_dict: no 'conv1.weight'") from None
    blocks = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        blocks.append(max(ids) + 1 if ids else 0)
    bottleneck = "layer1.0.conv3.weight" in state
    for depth, (layers, is_bottleneck) in DEPTHS.items():
        if tuple(blocks) == layers and bottleneck == is_bottleneck:
            return depth, width
    raise BackboneError(
        f"blocks per stage {tuple(blocks)} (bottleneck={bottleneck}) match no ResNet depth {sorted(DEPTHS)}"
    )


def save_backbone(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write the backbone of a camera model to ``path`` (torchvision names) and ``<stem>.json`` beside it.

    Written atomically (temporary name, then rename), so a reader never sees half a file.

    Args:
        model: the camera model (or its ``state_dict``).
        path: the ``.pth`` file.
        info: extra facts for the JSON file (source checkpoint, step, ...).

    Returns:
        ``path``.
    """
    state = backbone_state_dict(model)
    depth, width = infer_resnet_config(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    meta = {
        "format": "torchvision ResNet state_dict (no fc)",
        "depth": depth,
        "width": width,
        "torchvision_compatible": width == 64,
        "tensors": len(state),
        **dict(info or {}),
    }
    json_path = path.with_suffix(".json")
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, json_path)
    return path


def export_backbone(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """``driveengine export-backbone``: the backbone of a pre-training checkpoint as ``backbone.pth``.

    Args:
        checkpoint: a checkpoint of ``driveengine pretrain`` (a dict with ``model``) or a bare model
            ``state_dict``.
        out: the output file (default: ``backbone.pth`` next to the checkpoint).

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
        modality = (data.get("config") or {}).get("modality", "lidar") if isinstance(data, Mapping) else "?"
        raise BackboneError(
            f"{checkpoint}: the checkpoint holds no camera model (modality {modality!r}, no 'backbone.*' "
            "weights); export a checkpoint of `driveengine pretrain --modality camera`"
        ) from None
    target = Path(out) if out is not None else checkpoint.with_name("backbone.pth")
    info = {"source_checkpoint": str(checkpoint)}
    if isinstance(data, Mapping) and "step" in data:
        info["step"] = int(data["step"])
    return save_backbone(state, target, info)


def load_backbone_weights(backbone: ResNet, path: str | os.PathLike[str]) -> None:
    """Initialise ``backbone`` from a local ResNet weights file with torchvision names.

    Accepts a bare ``state_dict`` (torchvision's ``resnet18-*.pth``, an exported ``backbone.pth``) or a
    dict holding one under ``state_dict`` / ``model``; wrapper prefixes (``module.``) and a
    ``backbone.`` prefix are removed; ``fc.*`` (the ImageNet classifier) is ignored. Every backbone
    key must be present with the same shape (strict matching), so a wrong depth or width fails here
    rather than training from a half-loaded network.

    Raises:
        BackboneError: missing file, unreadable file, or keys / shapes that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: no such backbone weights file (give a local torchvision ResNet .pth)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{path}: unreadable weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping):
        raise BackboneError(f"{path}: expected a state_dict (a dict of tensors), got {type(data).__name__}")
    state = _strip_wrappers(data)
    if any(k.startswith(BACKBONE_PREFIX) for k in state):
        state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
        raise BackboneError(
            f"{path}: does not match ResNet-{backbone.depth} with width {backbone.conv1.out_channels}: "
            + "; ".join(parts)
            + " (use weights of the same depth; torchvision weights need width 64)"
        )
    backbone.load_state_dict(state, strict=True)
