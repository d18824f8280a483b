"""Pre-training loss: class-weighted cross-entropy over voxels plus L1 flow on foreground voxels.

The class table of the split (:class:`~driveengine.schemas.classes.ClassTable`, recorded in its manifest)
decides the ids: ``K = free + 1`` of them (OpenScene's table: 0..15 and free = 16; Occ3D-nuScenes':
0..16 and free = 17) and which are foreground (objects).

* Semantics: cross-entropy over the K ids (free included), weighted per class; voxels that no LiDAR ray
  observed (``mask_lidar`` False) are ignored when a mask is given.
* Flow: mean absolute error of (vx, vy) (m/s) over observed ground-truth foreground voxels (the table's
  ``foreground`` ids; OpenScene's: id < 10), times ``flow_weight``; 0 when a batch has none.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable

#: Target value of ignored voxels.
IGNORE_INDEX = 255


def class_weights_from_counts(counts: np.ndarray, smoothing: float = 1.02) -> np.ndarray:
    """ENet-style class weights ``1 / ln(smoothing + frequency)`` from voxel counts per id (K,).

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


def foreground_below(classes: ClassTable) -> int | None:
    """``k`` when the foreground ids of ``classes`` are exactly ``0 .. k - 1`` (a comparison then finds
    them), else None."""
    fg = tuple(sorted(classes.foreground))
    return len(fg) if fg == tuple(range(len(fg))) else None


class OccupancyLoss(nn.Module):
    """Voxel classification + flow loss (see the module docstring).

    Args:
        class_weights: (K,) weight per class id, free last (K = ``classes.free + 1``); None = all 1.
        flow_weight: factor of the flow term.
        classes: the class table of the labels.

    Raises:
        ValueError: ``class_weights`` does not have one entry per id of ``classes``.
    """

    def __init__(
        self,
        class_weights: torch.Tensor | np.ndarray | None = None,
        flow_weight: float = 1.0,
        classes: ClassTable = OPENSCENE_CLASSES,
    ) -> None:
        super().__init__()
        num_ids = classes.free + 1
        w = (
            torch.ones(num_ids)
            if class_weights is None
            else torch.as_tensor(class_weights, dtype=torch.float32)
        )
        if w.shape != (num_ids,):
            raise ValueError(
                f"class_weights has shape {tuple(w.shape)}; the class table {classes.name} needs one weight per "
                f"id ({num_ids},)"
            )
        self.register_buffer("class_weights", w.float())
        self.flow_weight = float(flow_weight)
        self.classes = classes
        self._foreground_below = foreground_below(classes)
        lut = torch.zeros(256, dtype=torch.bool)  # semantics are uint8 ids
        lut[list(classes.foreground)] = True
        self.register_buffer("foreground_lut", lut, persistent=False)

    def is_foreground(self, gt_sem: torch.Tensor) -> torch.Tensor:
        """(B, X, Y, Z) bool: the ground-truth id is one of the table's foreground ids."""
        if self._foreground_below is not None:
            return gt_sem < self._foreground_below
        return self.foreground_lut[gt_sem.long().clamp(0, 255)]

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
            sem_logits: (B, K, X, Y, Z) logits.
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
            fg = self.is_foreground(gt_sem)
            if mask is not None:
                fg = fg & mask
            # Masked mean without a host sync: 0 when the batch has no foreground voxel.
            err = (flow.float() - gt_flow.float()).abs().sum(dim=-1) * fg
            loss_flow = err.sum() / (2.0 * fg.sum()).clamp(min=1.0)
        return {"loss": loss_sem + self.flow_weight * loss_flow, "loss_sem": loss_sem, "loss_flow": loss_flow}
