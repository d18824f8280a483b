"""LiDAR-to-occupancy model: key-frame points -> BEV pillars -> ResNet encoder-decoder -> voxel classes and flow.

Input encoding (:func:`bev_features`): the points of the key frame (ego frame, metres) are binned on
the x-y cells of the occupancy grid (same extent and cell size, so the output is aligned with the
labels without resampling). Per cell there are ``nz + 2`` channels: for each of the grid's ``nz``
height bins, 1 if a point falls in that voxel; the mean intensity of the cell's points (divided by
``intensity_scale``); and ``log1p`` of the number of points in the cell. Points outside the grid's
half-open range are dropped.

Network (:class:`LidarOccupancyNet`): a :class:`~driveengine.models.resnet.ResNet` encoder over the
BEV image (H = nx along x, W = ny along y), a feature-pyramid decoder (lateral 1x1 convolutions,
top-down upsampling and addition) to the resolution of ``layer1``, upsampled to the full grid and
concatenated with the BEV input, and the :class:`~driveengine.models.heads.OccupancyHeads` that predict
``K * nz`` class logits (K = every id of the split's class table, free last: 17 for OpenScene's table, 18
for Occ3D-nuScenes') and ``2 * nz`` flow values per cell, reshaped to voxels:

* ``semantics`` logits ``(B, K, nx, ny, nz)``;
* ``flow`` ``(B, nx, ny, nz, 2)``, (vx, vy) m/s in the ego frame of the key frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from driveengine.models.heads import ModelOutputs, OccupancyHeads, predict
from driveengine.models.resnet import ResNet
from driveengine.schemas import VoxelGrid
from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable


def bev_features(
    points: Sequence[torch.Tensor], grid: VoxelGrid, intensity_scale: float = 255.0
) -> torch.Tensor:
    """BEV input of a batch of point clouds (see the module docstring).

    Args:
        points: per sample a (N_i, >= 3) tensor: x, y, z in metres (ego frame of the key frame), then
            optionally intensity; extra columns (sweep time lag) are ignored.
        grid: the occupancy grid.
        intensity_scale: divisor of the intensity.

    Returns:
        (B, nz + 2, nx, ny) float32 on the device of the points.
    """
    nx, ny, nz = grid.shape
    batch = len(points)
    device = points[0].device if batch else torch.device("cpu")
    out = torch.zeros(batch, nz + 2, nx, ny, dtype=torch.float32, device=device)
    if batch == 0:
        return out
    counts = torch.tensor([len(p) for p in points], device=device)
    pts = torch.cat([p.to(torch.float32) for p in points], dim=0)
    if len(pts) == 0:
        return out
    bidx = torch.repeat_interleave(torch.arange(batch, device=device), counts)
    lo = torch.tensor(grid.range_min_m, dtype=torch.float32, device=device)
    ijk = torch.floor((pts[:, :3] - lo) / grid.voxel_size_m).to(torch.int64)
    size = torch.tensor([nx, ny, nz], device=device)
    keep = ((ijk >= 0) & (ijk < size)).all(dim=1)
    ijk, bidx = ijk[keep], bidx[keep]
    intensity = pts[keep, 3] / intensity_scale if pts.shape[1] > 3 else torch.zeros(len(ijk), device=device)
    i, j, k = ijk.unbind(1)
    flat = out.view(-1)
    # Occupancy of each height bin: channel k of cell (i, j).
    occ_index = ((bidx * (nz + 2) + k) * nx + i) * ny + j
    flat[occ_index] = 1.0
    cell = (bidx * nx + i) * ny + j
    num = torch.zeros(batch * nx * ny, device=device).index_add_(0, cell, torch.ones_like(intensity))
    total = torch.zeros(batch * nx * ny, device=device).index_add_(0, cell, intensity)
    num = num.view(batch, nx, ny)
    out[:, nz] = total.view(batch, nx, ny) / num.clamp(min=1.0)
    out[:, nz + 1] = torch.log1p(num)
    return out


class LidarOccupancyNet(nn.Module):
    """BEV ResNet encoder-decoder predicting per-voxel class logits and flow.

    Args:
        grid: the occupancy grid (output shape and BEV binning).
        depth: ResNet depth (18, 34, 50, 101).
        width: ResNet base width (64 = torchvision; small values for CPU runs).
        decoder_channels: channels of the decoder.
        stem_stride: ResNet stem stride (4 as torchvision, 1 or 2 for small grids).
        output_stride: the decoder and heads run on cells of ``output_stride`` x ``output_stride``
            voxel columns and their outputs are repeated onto the full grid (2 = 4x cheaper head, for CPU
            runs; 1 = full resolution).
        classes: the class table of the labels (the ids predicted; the split records it).
    """

    def __init__(
        self,
        grid: VoxelGrid,
        depth: int = 18,
        width: int = 64,
        decoder_channels: int = 64,
        stem_stride: int = 4,
        output_stride: int = 1,
        classes: ClassTable = OPENSCENE_CLASSES,
    ) -> None:
        super().__init__()
        nx, ny, _ = grid.shape
        if output_stride < 1 or nx % output_stride or ny % output_stride:
            raise ValueError(f"output_stride {output_stride} must divide the grid's x-y size {nx} x {ny}")
        self.output_stride = int(output_stride)
        self.grid = grid
        self.classes = classes
        nz = grid.shape[2]
        self.nz = nz
        in_channels = nz + 2
        self.encoder = ResNet(depth, in_channels=in_channels, width=width, stem_stride=stem_stride)
        self.lateral = nn.ModuleList(nn.Conv2d(c, decoder_channels, 1) for c in self.encoder.out_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_channels + in_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(decoder_channels),
            nn.ReLU(inplace=True),
        )
        self.heads = OccupancyHeads(decoder_channels, nz, classes, repeat=output_stride)

    def forward_bev(self, bev: torch.Tensor) -> ModelOutputs:
        """Outputs for a BEV input (B, nz + 2, nx, ny): ``semantics`` logits and ``flow`` (module docstring)."""
        feats = self.encoder(bev)
        x = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1]), strict=True):
            x = lat(f) + F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False)
        s = self.output_stride
        skip = bev if s == 1 else F.max_pool2d(bev, s)  # occupancy bins survive pooling
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.heads(self.fuse(torch.cat([x, skip], dim=1)))

    def forward(self, points: Sequence[torch.Tensor]) -> ModelOutputs:
        """Outputs for a batch of point clouds (per sample (N_i, >= 4): x, y, z, intensity; ego frame)."""
        return self.forward_bev(bev_features(points, self.grid))

    @staticmethod
    def predict(outputs: ModelOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids (B, nx, ny, nz) uint8 and flow (B, nx, ny, nz, 2) float32 of the outputs
        (:func:`driveengine.models.heads.predict`)."""
        return predict(outputs)
