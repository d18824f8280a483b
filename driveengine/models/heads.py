"""The occupancy heads every pre-training model ends with, and what their outputs mean.

A pre-training model (LiDAR: :class:`~driveengine.models.lidar.LidarOccupancyNet`, cameras:
:class:`~driveengine.models.camera.CameraOccupancyNet`, or one registered by a user) maps a batch to
:data:`ModelOutputs`, a dict with at least

* ``semantics``: logits ``(B, K, nx, ny, nz)`` over the ``K = classes.free + 1`` ids of the split's class
  table (:class:`~driveengine.schemas.classes.ClassTable`: ids ``0 .. free - 1`` and ``free``; OpenScene's
  table 17, Occ3D-nuScenes' 18);
* ``flow``: ``(B, nx, ny, nz, 2)`` (vx, vy) m/s in the ego frame of the key frame;

and possibly more (the camera model adds ``visible``). The loss (:mod:`driveengine.train.loss`) and the
metrics read these two; :func:`predict` turns them into class ids and flow.
"""

from __future__ import annotations

import torch
from torch import nn

from driveengine.schemas.classes import ClassTable

#: What a pre-training model returns: output name -> tensor (see the module docstring).
ModelOutputs = dict[str, torch.Tensor]


def num_output_ids(classes: ClassTable) -> int:
    """Ids predicted per voxel: the evaluated ids ``0 .. free - 1`` and ``free`` (``classes.free + 1``)."""
    return classes.free + 1


class OccupancyHeads(nn.Module):
    """The per-cell 1x1 heads shared by the LiDAR and camera models.

    BEV features (B, C, X, Y) -> ``semantics`` logits (B, K, X r, Y r, nz) (K = :func:`num_output_ids`
    of ``classes``: every id of the table, free last, for each of the ``nz`` height bins) and ``flow``
    (B, X r, Y r, nz, 2) m/s, each cell's prediction repeated over its ``r x r`` voxel columns (``repeat``
    = r). The flow head starts at zero (no motion).

    Args:
        channels: channels of the BEV features.
        nz: height bins of the label grid.
        classes: the class table of the labels (the number of ids predicted).
        repeat: r, voxel columns per cell along x and y.
    """

    def __init__(self, channels: int, nz: int, classes: ClassTable, repeat: int = 1) -> None:
        super().__init__()
        self.nz, self.repeat = nz, repeat
        self.num_ids = num_output_ids(classes)
        self.sem_head = nn.Conv2d(channels, self.num_ids * nz, 1)
        self.flow_head = nn.Conv2d(channels, 2 * nz, 1)
        nn.init.zeros_(self.flow_head.weight)
        nn.init.zeros_(self.flow_head.bias)

    def forward(self, x: torch.Tensor) -> ModelOutputs:
        """``semantics`` (B, K, X r, Y r, nz) logits and ``flow`` (B, X r, Y r, nz, 2) m/s of features (B, C, X, Y)."""
        sem, flow = self.sem_head(x), self.flow_head(x)
        if self.repeat > 1:
            r = self.repeat
            sem = sem.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)
            flow = flow.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)
        b, _, nx, ny = sem.shape
        sem = sem.view(b, self.num_ids, self.nz, nx, ny).permute(0, 1, 3, 4, 2)
        flow = flow.view(b, self.nz, 2, nx, ny).permute(0, 3, 4, 1, 2)
        return {"semantics": sem, "flow": flow}


def predict(outputs: ModelOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids (B, nx, ny, nz) uint8 (the most likely id) and flow (B, nx, ny, nz, 2) float32 of a model's
    outputs."""
    return outputs["semantics"].argmax(dim=1).to(torch.uint8), outputs["flow"].float()
