"""VoVNet-99 with identity mapping and effective squeeze-excitation (V-99-eSE), in plain torch.

The camera backbone of DETR3D, BEVFormer, PETR/StreamPETR and the OpenScene occupancy baselines (their
``projects/mmdet3d_plugin/models/backbones/vovnet.py``, ported from ``vovnet-detectron2``; papers:
VoVNet, Lee et al. 2019, and VoVNetV2 in CenterMask, Lee & Park 2020). Written here from the published
structure; parameter and buffer names are those of the plugin's ``VoVNet(spec_name='V-99-eSE')`` so that
a ``state_dict`` of :class:`VoVNet` at ``width=64`` loads into it with strict matching (and into its
``VoVNetCP`` twin, which only adds gradient checkpointing).

Structure (channel counts at ``width=64``; every count scales by ``width / 64``):

* **stem**: three 3x3 conv + BN + ReLU, 3 -> 64 -> 64 -> 128 channels, strides 2, 1, 2 (total stride 4).
  Names ``stem.stem_{1,2,3}/{conv,norm,relu}``.
* **stage2 .. stage5**: 1, 3, 9, 3 one-shot-aggregation (OSA) blocks; stages 3-5 start with a 3x3
  max pool, stride 2, ``ceil_mode=True`` (``stageN.Pooling``; strides 4, 8, 16, 32 overall). Block
  ``OSA{N}_{j}`` runs five 3x3 conv + BN + ReLU of 128 / 160 / 192 / 224 channels in sequence
  (``layers.{i}.OSA{N}_{j}_{i}/{conv,norm,relu}``), concatenates its input with the five outputs, and
  reduces them with a 1x1 conv + BN + ReLU to 256 / 512 / 768 / 1024 channels
  (``concat.OSA{N}_{j}_concat/{conv,norm,relu}``).
* **eSE** (effective squeeze-excitation, in every block): global average pool, one 1x1 conv *with bias*
  and no channel reduction (``ese.fc``), hard sigmoid ``relu6(x + 3) / 6``, times the block output.
* **identity mapping**: every block after the first of its stage adds its input to its output (no
  ReLU after the addition).

Convolutions have no bias (BN follows); BN is torch's default (eps 1e-5, momentum 0.1). The forward
returns the outputs of ``stage2`` .. ``stage5`` (the plugin's ``out_features``; downstream configs pick
e.g. ``['stage4', 'stage5']``). Not reproduced: the plugin's ``frozen_stages`` / ``norm_eval`` (fine-tuning
options of the downstream config, not part of the weights) and the depthwise / slim variants.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from driveengine.errors import DriveEngineError
from driveengine.models.resnet import init_convs_and_norms

#: The channel counts below are those of ``width=64`` (the published network).
PUBLISHED_WIDTH = 64


class InputTooSmallError(DriveEngineError):
    """The images are too small for the backbone's stride-32 stage (the message gives the minimum)."""


@dataclass(frozen=True)
class VoVNetSpec:
    """One VoVNet variant at the published width.

    Attributes:
        name: the plugin's ``spec_name`` (e.g. ``"V-99-eSE"``).
        stem_channels: outputs of the three stem convolutions.
        stage_channels: channels of the 3x3 convolutions inside the OSA blocks of each stage.
        concat_channels: output channels of each stage (after the 1x1 aggregation).
        layers_per_block: 3x3 convolutions per OSA block.
        blocks_per_stage: OSA blocks of each stage.
    """

    name: str
    stem_channels: tuple[int, int, int]
    stage_channels: tuple[int, int, int, int]
    concat_channels: tuple[int, int, int, int]
    layers_per_block: int
    blocks_per_stage: tuple[int, int, int, int]


#: VoVNet-99 with eSE and identity mapping, as ``_STAGE_SPECS['V-99-eSE']`` of the mmdet3d plugins.
V99_ESE = VoVNetSpec(
    name="V-99-eSE",
    stem_channels=(64, 64, 128),
    stage_channels=(128, 160, 192, 224),
    concat_channels=(256, 512, 768, 1024),
    layers_per_block=5,
    blocks_per_stage=(1, 3, 9, 3),
)


def scale_channels(channels: int, width: int) -> int:
    """``channels`` of the published network scaled to ``width`` (rounded half up, at least 1)."""
    return max(1, (channels * width + PUBLISHED_WIDTH // 2) // PUBLISHED_WIDTH)


def _conv_norm_relu(
    name: str, cin: int, cout: int, kernel: int, stride: int = 1
) -> list[tuple[str, nn.Module]]:
    """``<name>/conv`` (no bias, "same" padding), ``<name>/norm`` (BN), ``<name>/relu``."""
    return [
        (f"{name}/conv", nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)),
        (f"{name}/norm", nn.BatchNorm2d(cout)),
        (f"{name}/relu", nn.ReLU(inplace=True)),
    ]


class EffectiveSE(nn.Module):
    """eSE: ``x * hsigmoid(fc(mean_hw(x)))`` with one full-rank 1x1 convolution ``fc`` (with bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-gated ``x`` (B, C, H, W)."""
        gate = F.hardsigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))  # relu6(z + 3) / 6
        return x * gate


class OSABlock(nn.Module):
    """One-shot aggregation block ``OSA{stage}_{index}`` (see the module docstring).

    Args:
        name: ``OSA{stage}_{index}``, the prefix of the inner module names.
        cin: input channels; stage_channels: of each 3x3 convolution; concat_channels: output channels.
        layers: 3x3 convolutions.
        residual: add the input to the output (identity mapping; needs ``cin == concat_channels``).
    """

    def __init__(
        self, name: str, cin: int, stage_channels: int, concat_channels: int, layers: int, residual: bool
    ) -> None:
        super().__init__()
        if residual and cin != concat_channels:
            raise ValueError(f"{name}: identity mapping needs {cin} == {concat_channels} channels")
        self.residual = residual
        layer_inputs = [cin] + [stage_channels] * (layers - 1)
        self.layers = nn.ModuleList(
            nn.Sequential(OrderedDict(_conv_norm_relu(f"{name}_{i}", c, stage_channels, 3)))
            for i, c in enumerate(layer_inputs)
        )
        self.concat = nn.Sequential(
            OrderedDict(_conv_norm_relu(f"{name}_concat", cin + layers * stage_channels, concat_channels, 1))
        )
        self.ese = EffectiveSE(concat_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, concat_channels, H, W) for x (B, cin, H, W)."""
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        out = self.ese(self.concat(torch.cat(outputs, dim=1)))
        return out + x if self.residual else out


class OSAStage(nn.Sequential):
    """``stage{N}``: an optional ``Pooling`` (3x3 max pool, stride 2, ceil mode), then OSA blocks
    ``OSA{N}_1`` .. ``OSA{N}_{blocks}``, identity mapping from the second block on."""

    def __init__(
        self,
        number: int,
        cin: int,
        stage_channels: int,
        concat_channels: int,
        blocks: int,
        layers: int,
        pool: bool,
    ) -> None:
        super().__init__()
        if pool:
            self.add_module("Pooling", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        for j in range(1, blocks + 1):
            name = f"OSA{number}_{j}"
            block_in = cin if j == 1 else concat_channels
            self.add_module(
                name, OSABlock(name, block_in, stage_channels, concat_channels, layers, residual=j > 1)
            )


def _pooled(n: int) -> int:
    """Output length of a 3-wide, stride-2, ceil-mode max pool over ``n`` >= 2 samples (0 if too short)."""
    return -(-(n - 3) // 2) + 1 if n >= 2 else 0


def min_input_px() -> int:
    """Smallest image side (pixels) that survives the stem (stride 4) and the three stride-2 pools."""
    n = 1
    while True:
        s = -(-n // 4)  # two stride-2, padding-1 3x3 convolutions: ceil(ceil(n / 2) / 2)
        if _pooled(s) >= 2 and _pooled(_pooled(s)) >= 2:
            return n
        n += 1


class VoVNet(nn.Module):
    """VoVNet feature extractor (default: V-99-eSE) returning the ``stage2`` .. ``stage5`` maps.

    Args:
        spec: the variant (:data:`V99_ESE`).
        width: channels of the first stem convolution; every channel count of ``spec`` scales by
            ``width / 64`` (64 = the published network, the only width downstream code builds).
        in_channels: input channels (3 for images; the plugin's ``input_ch``).

    Attributes:
        out_channels: channels of the ``stage2`` .. ``stage5`` outputs (256, 512, 768, 1024 at width 64).
        strides: their strides relative to the input (4, 8, 16, 32).
        stage_names: ``("stage2", "stage3", "stage4", "stage5")``.
        min_input_px: smallest image side the network accepts.
    """

    stage_names: tuple[str, ...] = ("stage2", "stage3", "stage4", "stage5")

    def __init__(
        self, spec: VoVNetSpec = V99_ESE, width: int = PUBLISHED_WIDTH, in_channels: int = 3
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"VoVNet width must be positive, got {width}")
        self.spec = spec
        self.width = int(width)
        stem = [scale_channels(c, width) for c in spec.stem_channels]
        stage = [scale_channels(c, width) for c in spec.stage_channels]
        concat = [scale_channels(c, width) for c in spec.concat_channels]
        self.stem = nn.Sequential(
            OrderedDict(
                _conv_norm_relu("stem_1", in_channels, stem[0], 3, stride=2)
                + _conv_norm_relu("stem_2", stem[0], stem[1], 3, stride=1)
                + _conv_norm_relu("stem_3", stem[1], stem[2], 3, stride=2)
            )
        )
        cin = stem[2]
        for i, name in enumerate(self.stage_names):
            number = i + 2
            self.add_module(
                name,
                OSAStage(
                    number,
                    cin,
                    stage[i],
                    concat[i],
                    spec.blocks_per_stage[i],
                    spec.layers_per_block,
                    pool=i > 0,
                ),
            )
            cin = concat[i]
        self.out_channels = tuple(concat)
        self.strides = (4, 8, 16, 32)
        self.min_input_px = min_input_px()
        init_convs_and_norms(self)
        for m in self.modules():
            if isinstance(m, EffectiveSE):  # every gate starts at hsigmoid(0) = 0.5
                nn.init.zeros_(m.fc.weight)
                nn.init.zeros_(m.fc.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of ``stage2`` .. ``stage5`` for an input (B, in_channels, H, W).

        Raises:
            InputTooSmallError: ``H`` or ``W`` is below :attr:`min_input_px`.
        """
        if min(x.shape[-2:]) < self.min_input_px:
            raise InputTooSmallError(
                f"VoVNet needs images of at least {self.min_input_px} x {self.min_input_px} pixels, got "
                f"{x.shape[-1]} x {x.shape[-2]} (W x H); use a larger --image-size"
            )
        x = self.stem(x)
        feats = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            feats.append(x)
        return feats
