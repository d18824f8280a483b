"""The camera backbones pre-training can train and export: one registry, one entry per backbone.

A :class:`BackboneSpec` says everything the rest of DriveEngine needs about a backbone: how to build it
at a given width (a module returning four feature maps at strides 4, 8, 16, 32 with ``out_channels``),
how images are normalised for it (the convention of the weights downstream code loads), whose parameter
names its ``state_dict`` follows, and the downstream (mmdet / mmdet3d) config lines that load the exported
file. Adding a backbone is one :func:`register` call; nothing else switches on names.

Registered: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (torchvision / mmdet ``ResNet``
names) and ``vovnet99`` (the mmdet3d plugins' ``VoVNet(spec_name='V-99-eSE')`` names).

``width`` is the number of output channels of a backbone's first convolution: 64 is the published
network (the only width downstream code builds and published weights fit); smaller widths give the same
architecture with every channel count scaled, for tests and CPU runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from driveengine.errors import DriveEngineError
from driveengine.models.resnet import DEPTHS, ResNet
from driveengine.models.vovnet import V99_ESE, VoVNet

#: Width of the published networks (channels of the first convolution).
PUBLISHED_WIDTH = 64


class BackboneError(DriveEngineError):
    """Backbone weights cannot be read, exported or loaded, or a backbone name is unknown (the message
    names the file or option and the fix)."""


@dataclass(frozen=True)
class ImageNormalisation:
    """How a backbone's weights expect images: channel order and per-channel statistics of 0..255 pixels.

    The network input is ``(pixel[channel_order] - mean) / std`` with ``mean`` and ``std`` given in
    ``channel_order`` and on the 0..255 scale (mmdet's ``img_norm_cfg``).
    """

    channel_order: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def rgb_indices(self) -> tuple[int, int, int]:
        """Indices into an RGB image giving ``channel_order`` (``(2, 1, 0)`` for BGR)."""
        return tuple("RGB".index(c) for c in self.channel_order)  # type: ignore[return-value]

    def mmdet_img_norm_cfg(self) -> str:
        """The ``img_norm_cfg = dict(...)`` line of an mmdet config (images loaded as BGR by mmcv)."""
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return f"img_norm_cfg = dict(mean=[{mean}], std=[{std}], to_rgb={self.channel_order == 'RGB'})"


#: torchvision's ImageNet statistics (RGB), the convention of torchvision ResNet weights.
TORCHVISION_RGB = ImageNormalisation("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
#: The same statistics in BGR order: the convention of the DD3D / detectron2 VoVNet-99 weights that the
#: mmdet3d configs load (``img_norm_cfg = dict(mean=[103.530, 116.280, 123.675], std=[57.375, 57.120,
#: 58.395], to_rgb=False)`` in DETR3D, PETR, StreamPETR, ...).
DETECTRON_BGR = ImageNormalisation("BGR", (103.53, 116.28, 123.675), (57.375, 57.12, 58.395))


@dataclass(frozen=True)
class BackboneSpec:
    """One registered camera backbone.

    Attributes:
        name: the ``--backbone`` value (``resnet101``, ``vovnet99``).
        title: human name (``ResNet-101``, ``VoVNet-99 (V-99-eSE)``).
        build: ``build(width, in_channels)`` -> module whose forward returns four maps (strides 4, 8,
            16, 32) and whose ``out_channels`` gives their channels.
        first_conv_key: ``state_dict`` key of the first convolution (its output channels = the width).
        stage_names: downstream names of the four returned maps (``layer1``.. / ``stage2``..).
        normalisation: the image convention of the weights (applied inside the camera model).
        naming: whose parameter names the ``state_dict`` follows (written to ``backbone.json``).
        downstream_framework: the code base whose config lines :attr:`downstream_args` are.
        downstream_type: the registry ``type`` downstream configs build (``ResNet``, ``VoVNet``).
        downstream_args: the other arguments of that ``img_backbone=dict(...)``, without ``init_cfg``.
        downstream_outputs: indices (into the four maps) of the stages ``downstream_args`` returns.
        ignored_keys: key prefixes of a weights file that are not backbone (an ImageNet classifier).
        facts: extra ``backbone.json`` entries (``{"depth": 101}``).
        published: the published parameter count, with its source, for reports.
    """

    name: str
    title: str
    build: Callable[[int, int], nn.Module]
    first_conv_key: str
    stage_names: tuple[str, str, str, str]
    normalisation: ImageNormalisation
    naming: str
    downstream_framework: str
    downstream_type: str
    downstream_args: str
    downstream_outputs: tuple[int, ...]
    ignored_keys: tuple[str, ...] = ()
    facts: Mapping[str, int | str | bool] = field(default_factory=dict)
    published: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def backbone_names() -> tuple[str, ...]:
    """The registered ``--backbone`` values, in registration order."""
    return tuple(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered as ``name``.

    Raises:
        BackboneError: unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}: use one of {', '.join(backbone_names())}") from None


def resolve_backbone_name(backbone: str | None, depth: int | None) -> str:
    """The camera backbone of a ``--backbone`` / legacy ``--depth`` pair.

    ``--depth N`` alone means ``resnetN`` (what it meant before ``--backbone`` existed); neither means
    ``resnet18``; both must agree.

    Raises:
        BackboneError: unknown name, or ``depth`` contradicting ``backbone``.
    """
    if backbone is None:
        return get_backbone(f"resnet{18 if depth is None else depth}").name
    spec = get_backbone(backbone)
    if depth is not None and spec.facts.get("depth") != depth:
        raise BackboneError(
            f"--depth {depth} contradicts --backbone {backbone}: give only --backbone (--depth N is the "
            "older spelling of --backbone resnetN for camera runs)"
        )
    return spec.name


def camera_backbone_option(modality: str, backbone: str | None, depth: int | None) -> str | None:
    """The ``backbone`` of a ``driveengine pretrain`` config: the resolved camera backbone for camera
    runs, ``None`` for LiDAR runs (whose ResNet encoder is chosen by ``--depth``).

    Raises:
        BackboneError: ``--backbone`` on a LiDAR run, or as :func:`resolve_backbone_name`.
    """
    if modality != "camera":
        if backbone is not None:
            raise BackboneError(
                f"--backbone {backbone} chooses the camera backbone; --modality {modality} runs use a ResNet "
                "encoder chosen with --depth"
            )
        return None
    return resolve_backbone_name(backbone, depth)


def expected_shapes(spec: BackboneSpec, width: int, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the ``state_dict`` of ``spec`` at ``width``, built on the meta device (no memory)."""
    return dict(_shapes(spec.name, width, in_channels))


@functools.lru_cache(maxsize=64)
def _shapes(name: str, width: int, in_channels: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        module = _REGISTRY[name].build(width, in_channels)
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())


def state_mismatches(
    expected: Mapping[str, tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    optional_suffixes: tuple[str, ...] = (),
) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` (key -> shape) is wanted.

    Args:
        optional_suffixes: expected keys that may be missing (torch's BatchNorm fills in a missing
            ``num_batches_tracked``; frozen-BN conversions lack it).

    Returns:
        One summary string per kind of problem (missing / unexpected keys, shape mismatches), empty if
        the state fits.
    """
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(optional_suffixes))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
    return problems


def identify_backbone(state: Mapping[str, torch.Tensor], lenient: bool = False) -> tuple[BackboneSpec, int]:
    """``(spec, width)`` of the registered backbone whose ``state_dict`` (RGB input) ``state`` is, exactly.

    Every registered spec is built at the width its first convolution implies (on the meta device) and
    compared key by key and shape by shape.

    Args:
        lenient: also accept the spec's ``ignored_keys`` (an ImageNet classifier) and missing
            ``num_batches_tracked`` buffers, as a weights file from elsewhere may have them.

    Raises:
        BackboneError: no registered backbone has exactly these keys and shapes.
    """
    for spec in _REGISTRY.values():
        first = state.get(spec.first_conv_key)
        if not isinstance(first, torch.Tensor) or first.dim() != 4:
            continue
        width = int(first.shape[0])
        candidate = {k: v for k, v in state.items() if not (lenient and k.startswith(spec.ignored_keys))}
        optional = ("num_batches_tracked",) if lenient else ()
        if not state_mismatches(expected_shapes(spec, width), candidate, optional):
            return spec, width
    raise BackboneError(
        f"the weights ({len(state)} tensors) are exactly none of the registered backbones "
        f"({', '.join(backbone_names())}) at any width"
    )


# -- the registry ---------------------------------------------------------------------------------------


def _resnet_builder(depth: int) -> Callable[[int, int], nn.Module]:
    def build(width: int, in_channels: int) -> nn.Module:
        return ResNet(depth, in_channels=in_channels, width=width, stem_stride=4)

    return build


def _vovnet99(width: int, in_channels: int) -> nn.Module:
    return VoVNet(V99_ESE, width=width, in_channels=in_channels)


#: Published parameter counts of the ResNets (torchvision's model table, classifier included).
_RESNET_PUBLISHED = {18: "11.7M", 34: "21.8M", 50: "25.6M", 101: "44.5M"}

for _depth in DEPTHS:
    register(
        BackboneSpec(
            name=f"resnet{_depth}",
            title=f"ResNet-{_depth}",
            build=_resnet_builder(_depth),
            first_conv_key="conv1.weight",
            stage_names=("layer1", "layer2", "layer3", "layer4"),
            normalisation=TORCHVISION_RGB,
            naming="torchvision / mmdet ResNet state_dict (no fc)",
            downstream_framework="mmdetection / mmdetection3d configs (mmdet ResNet, style='pytorch')",
            downstream_type="ResNet",
            downstream_args=(
                f"depth={_depth}, num_stages=4, out_indices=(1, 2, 3), frozen_stages=-1, "
                "norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch'"
            ),
            downstream_outputs=(1, 2, 3),
            ignored_keys=("fc.",),
            facts={"depth": _depth},
            published=f"{_RESNET_PUBLISHED[_depth]} with the 1000-class fc (torchvision)",
        )
    )

register(
    BackboneSpec(
        name="vovnet99",
        title="VoVNet-99 (V-99-eSE)",
        build=_vovnet99,
        first_conv_key="stem.stem_1/conv.weight",
        stage_names=VoVNet.stage_names,
        normalisation=DETECTRON_BGR,
        naming="mmdet3d-plugin VoVNet(spec_name='V-99-eSE') state_dict",
        downstream_framework=(
            "mmdetection3d configs with the projects/mmdet3d_plugin VoVNet (or VoVNetCP) of DETR3D, BEVFormer, "
            "PETR / StreamPETR and the OpenScene baselines"
        ),
        downstream_type="VoVNet",
        downstream_args=(
            "spec_name='V-99-eSE', norm_eval=True, frozen_stages=-1, input_ch=3, out_features=['stage4', 'stage5']"
        ),
        downstream_outputs=(2, 3),
        facts={"spec_name": V99_ESE.name},
        published=(
            "no backbone-only figure is published; the plugin's VoVNet(spec_name='V-99-eSE') module has "
            "69,523,520 parameters; vovnet-detectron2 lists Faster R-CNN V2-99-FPN at 96.9M (R-101-FPN 70.1M)"
        ),
    )
)
