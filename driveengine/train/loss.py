"""Pre-training loss: class-weighted cross-entropy over voxels plus L1 flow on foreground voxels.

* Semantics: cross-entropy over the 17 ids (0..15 and FREE = 16, FREE included), weighted per class;
  voxels that no LiDAR ray observed (``mask_lidar`` False) are ignored when a mask is given.
* Flow: mean absolute error of (vx, vy) (m/s) over observed ground-truth foreground voxels (id < 10),
  times ``flow_weight``; 0 when a batch has none.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from driveengine.schemas.classes import FOREGROUND_BELOW, FREE

#: Target value of ignored voxels.
IGNORE_INDEX = 255


def class_weights_from_counts(counts: np.ndarray, smoothing: float = 1.02) -> np.ndarray:
    """ENet-style class weights ``1 / ln(smoothing + frequency)`` from voxel counts per id (17,).

    Weights are normalised to mean 1 over the classes that occur; absent classes get weight 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return np.ones_like(counts)
    freq = counts / counts.sum()
    w = 1.0 / np.log(smoothing + freq)
    w = np.where(present, w, 1.0)
    w[present] /= w[present].mean()
    return w


class OccupancyLoss(nn.Module):
    """Voxel classification + flow loss (see the module docstring).

    Args:
        class_weights: (17,) weight per class id, FREE last.
        flow_weight: factor of the flow term.
    """

    def __init__(
        self, class_weights: torch.Tensor | np.ndarray | None = None, flow_weight: float = 1.0
    ) -> None:
        super().__init__()
        w = (
            torch.ones(FREE + 1)
            if class_weights is None
            else torch.as_tensor(class_weights, dtype=torch.float32)
        )
        self.register_buffer("class_weights", w.float())
        self.flow_weight = float(flow_weight)

    def forward(
        self,
        sem_logits: torch.Tensor,
        flow: torch.Tensor,
        gt_sem: torch.Tensor,
        gt_flow: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms.

        Args:
            sem_logits: (B, 17, X, Y, Z) logits.
            flow: (B, X, Y, Z, 2) predicted flow, m/s.
            gt_sem: (B, X, Y, Z) integer class ids.
            gt_flow: (B, X, Y, Z, 2) ground-truth flow, m/s (no flow term when None).
            mask: (B, X, Y, Z) bool, observed voxels (all voxels when None).

        Returns:
            ``{"loss", "loss_sem", "loss_flow"}`` scalar tensors (float32).
        """
        target = gt_sem.long()
        if mask is not None:
            target = torch.where(mask, target, torch.full_like(target, IGNORE_INDEX))
        loss_sem = F.cross_entropy(
            sem_logits.float(), target, weight=self.class_weights, ignore_index=IGNORE_INDEX
        )
        if not torch.isfinite(loss_sem):  # every voxel ignored
            loss_sem = sem_logits.float().sum() * 0.0
        if gt_flow is None:
            loss_flow = flow.float().sum() * 0.0
        else:
            fg = gt_sem < FOREGROUND_BELOW
            if mask is not None:
                fg = fg & mask
            # Masked mean without a host sync: 0 when the batch has no foreground voxel.
            err = (flow.float() - gt_flow.float()).abs().sum(dim=-1) * fg
            loss_flow = err.sum() / (2.0 * fg.sum()).clamp(min=1.0)
        return {"loss": loss_sem + self.flow_weight * loss_flow, "loss_sem": loss_sem, "loss_flow": loss_flow}
