"""Occupancy and flow metrics: OpenScene's ``SSCMetrics`` (semantic IoU, mIoU) plus flow EPE.

Definitions (reference §4, OpenScene's evaluation):

* Dense grids ``(..., X, Y, Z)`` of class ids, FREE = 16 for empty voxels (sparse files are densified
  with 16 first, see :mod:`driveengine.store.openscene_occ`). Voxels whose ground truth is
  ``ignore_index`` (255 by default) are left out, as are voxels outside ``mask`` when one is given
  (e.g. ``mask_lidar``: only voxels observed by a LiDAR ray).
* One 17 x 17 confusion matrix (rows ground truth, columns prediction) is summed over the whole
  dataset, separately for near and far voxels. Per class ``j`` in 0..15:
  ``iou_j = tp / (tp + fp + fn + 1e-5) * 100`` (percent).
* ``miou`` is the mean over **all 16 ids**, unused ids counting as 0 (OpenScene's number, at most
  about 50 with OpenScene's 8 used ids); ``miou_present`` is the mean over the classes that occur in
  the ground truth (``tp + fn > 0``), the more readable number.
* ``completion_iou``: binary occupied (id != 16) vs free IoU, same formula; ``foreground_iou``:
  binary foreground (id < 10) vs the rest.
* Near / far: a voxel is near when the xy distance of its centre from the ego origin (rear axle) is
  below 25 m; ``*_near`` and ``*_far`` repeat mIoU, mean-over-present and completion IoU per region.
* Flow end-point error (m/s): ``||pred_flow - gt_flow||_2`` averaged over voxels where ground truth
  and prediction are both foreground (and in the mask), split at a ground-truth speed of 0.2 m/s
  into ``epe_stationary`` (< 0.2) and ``epe_moving`` (>= 0.2). NaN where no voxel qualifies.

The accumulator works on numpy arrays or torch tensors (any device; they are copied to host memory)
with any number of leading batch dimensions, so training loops and ``driveengine evaluate`` share it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from driveengine.schemas.classes import CLASS_NAMES, FOREGROUND_BELOW, FREE, NUM_CLASSES
from driveengine.schemas.grid import GRID, VoxelGrid

#: Class ids in the confusion matrix: 0..15 and FREE.
_NUM_IDS = NUM_CLASSES + 1
#: Distance (m, xy, from the ego origin) separating near from far voxels.
NEAR_FAR_SPLIT_M = 25.0
#: Ground-truth speed (m/s) separating stationary from moving voxels in the flow EPE.
MOVING_SPEED_MPS = 0.2
#: Ground-truth value of voxels that are left out of every metric.
IGNORE_INDEX = 255
#: Epsilon of OpenScene's IoU formula.
IOU_EPS = 1e-5

_REGIONS = ("near", "far")


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array or a torch tensor (detached, on the host)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


def iou_percent(tp: np.ndarray | float, fp: np.ndarray | float, fn: np.ndarray | float) -> np.ndarray:
    """OpenScene's IoU in percent: ``tp / (tp + fp + fn + 1e-5) * 100`` (element-wise)."""
    tp = np.asarray(tp, dtype=np.float64)
    return tp / (tp + np.asarray(fp, dtype=np.float64) + np.asarray(fn, dtype=np.float64) + IOU_EPS) * 100.0


class OccupancyMetrics:
    """Accumulates semantic occupancy and flow statistics over a dataset; :meth:`compute` reports them.

    Args:
        grid: the voxel grid; the last three dimensions of every input must equal ``grid.shape``
            (used for the near/far split by voxel-centre distance).
        near_far_m: xy distance (m) from the ego origin below which a voxel is "near".
        moving_speed_mps: ground-truth speed (m/s) at or above which a voxel counts as moving.
        ignore_index: ground-truth value excluded from all metrics.

    Example::

        metrics = OccupancyMetrics()
        for batch in loader:
            metrics.update(pred_sem, gt_sem, pred_flow, gt_flow, mask=mask_lidar)
        print(metrics.compute()["miou"])
    """

    def __init__(
        self,
        grid: VoxelGrid = GRID,
        near_far_m: float = NEAR_FAR_SPLIT_M,
        moving_speed_mps: float = MOVING_SPEED_MPS,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.grid = grid
        self.near_far_m = float(near_far_m)
        self.moving_speed_mps = float(moving_speed_mps)
        self.ignore_index = int(ignore_index)
        centres = grid.voxel_centres()
        dist_xy = np.hypot(centres[..., 0], centres[..., 1])
        #: (X*Y*Z,) region id per voxel: 0 near, 1 far (C order over x, y, z).
        self._region = (dist_xy >= self.near_far_m).astype(np.int32).ravel()
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        #: (2, 17, 17) int64 confusion matrices [region, gt, pred] (region 0 near, 1 far).
        self.confusion = np.zeros((len(_REGIONS), _NUM_IDS, _NUM_IDS), dtype=np.int64)
        #: Flow EPE sums (m/s) and voxel counts, index 0 stationary, 1 moving.
        self.epe_sum = np.zeros(2, dtype=np.float64)
        self.epe_count = np.zeros(2, dtype=np.int64)
        self.frames = 0

    def merge(self, other: OccupancyMetrics) -> None:
        """Add the statistics of ``other`` (e.g. from another process) to this accumulator."""
        self.confusion += other.confusion
        self.epe_sum += other.epe_sum
        self.epe_count += other.epe_count
        self.frames += other.frames

    def update(
        self,
        pred_sem: Any,
        gt_sem: Any,
        pred_flow: Any | None = None,
        gt_flow: Any | None = None,
        mask: Any | None = None,
    ) -> None:
        """Add one frame or a batch of frames.

        Args:
            pred_sem: (..., X, Y, Z) integer class ids of the prediction, 0..16 (16 = free).
            gt_sem: same shape, ground-truth class ids 0..16, or ``ignore_index`` to leave a voxel out.
            pred_flow: optional (..., X, Y, Z, 2) predicted (vx, vy), m/s, ego frame.
            gt_flow: optional (..., X, Y, Z, 2) ground-truth (vx, vy), m/s, ego frame. EPE is only
                accumulated when both flows are given.
            mask: optional boolean (..., X, Y, Z) (or broadcastable, e.g. (X, Y, Z)): only voxels
                where it is true count (e.g. ``mask_lidar``).

        Raises:
            ValueError: shapes disagree with each other or with the grid, or ids are out of range.
        """
        pred = _to_numpy(pred_sem)
        gt = _to_numpy(gt_sem)
        spatial = self.grid.shape
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        if pred.ndim < 3 or pred.shape[-3:] != spatial:
            raise ValueError(f"occupancy arrays must end in the grid shape {spatial}, got {pred.shape}")
        nvox = self.grid.num_voxels
        full_shape = pred.shape
        pred = pred.reshape(-1, nvox)
        gt = gt.reshape(-1, nvox)
        if pred.dtype.kind not in "iu" or gt.dtype.kind not in "iu":
            raise ValueError(f"class ids must be integers, got {pred.dtype} and {gt.dtype}")
        if pred.size and (pred.min() < 0 or pred.max() > FREE):
            raise ValueError(f"predicted class ids must be in 0..{FREE}, got {pred.min()}..{pred.max()}")
        keep = gt != self.ignore_index
        if mask is not None:
            m = np.broadcast_to(_to_numpy(mask).astype(bool, copy=False), full_shape)
            keep &= m.reshape(-1, nvox)
        bad = keep & ((gt < 0) | (gt > FREE))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} ground-truth voxels have ids outside 0..{FREE} (and are not "
                f"ignore_index {self.ignore_index}), e.g. {gt[bad][:5].tolist()}"
            )
        gt_i = gt.astype(np.int32, copy=False)
        pred_i = pred.astype(np.int32, copy=False)
        code = self._region[None, :] * (_NUM_IDS * _NUM_IDS) + gt_i * _NUM_IDS + pred_i
        counts = np.bincount(code[keep], minlength=len(_REGIONS) * _NUM_IDS * _NUM_IDS)
        self.confusion += counts.reshape(len(_REGIONS), _NUM_IDS, _NUM_IDS)
        self.frames += pred.shape[0]

        if pred_flow is None or gt_flow is None:
            return
        pf = _to_numpy(pred_flow)
        gf = _to_numpy(gt_flow)
        want = (*full_shape, 2)
        if pf.shape != want or gf.shape != want:
            raise ValueError(f"flow arrays must have shape {want}, got {pf.shape} and {gf.shape}")
        both_fg = keep & (gt_i < FOREGROUND_BELOW) & (pred_i < FOREGROUND_BELOW)
        idx = np.flatnonzero(both_fg)  # row indices: np.take of rows beats a boolean (N, 2) gather
        gflow = np.take(gf.reshape(-1, 2), idx, axis=0).astype(np.float64)
        pflow = np.take(pf.reshape(-1, 2), idx, axis=0).astype(np.float64)
        err = np.hypot(*(pflow - gflow).T)
        moving = np.hypot(*gflow.T) >= self.moving_speed_mps
        self.epe_sum += np.bincount(moving.astype(np.int64), weights=err, minlength=2)
        self.epe_count += np.bincount(moving.astype(np.int64), minlength=2)

    # -- results ---------------------------------------------------------------------------------

    @staticmethod
    def _scores(conf: np.ndarray) -> dict[str, Any]:
        """IoU figures of one (17, 17) confusion matrix."""
        tp = np.diag(conf)[:NUM_CLASSES].astype(np.float64)
        fp = conf[:, :NUM_CLASSES].sum(axis=0) - tp
        fn = conf[:NUM_CLASSES, :].sum(axis=1) - tp
        iou = iou_percent(tp, fp, fn)
        present = (tp + fn) > 0
        occ = slice(0, NUM_CLASSES)  # ids 0..15 are occupied, 16 free
        c_tp = conf[occ, occ].sum()
        c_fp = conf[FREE, occ].sum()
        c_fn = conf[occ, FREE].sum()
        fg = slice(0, FOREGROUND_BELOW)
        f_tp = conf[fg, fg].sum()
        f_fp = conf[FOREGROUND_BELOW:, fg].sum()
        f_fn = conf[fg, FOREGROUND_BELOW:].sum()
        return {
            "iou": iou,
            "present": present,
            "miou": float(iou.mean()),
            "miou_present": float(iou[present].mean()) if present.any() else math.nan,
            "completion_iou": float(iou_percent(c_tp, c_fp, c_fn)),
            "completion_precision": float(c_tp / (c_tp + c_fp) * 100.0) if c_tp + c_fp else math.nan,
            "completion_recall": float(c_tp / (c_tp + c_fn) * 100.0) if c_tp + c_fn else math.nan,
            "foreground_iou": float(iou_percent(f_tp, f_fp, f_fn)),
        }

    def compute(self) -> dict[str, Any]:
        """All metrics of what was accumulated (IoUs in percent, EPE in m/s; NaN where undefined).

        Returns:
            A JSON-ready dict (NaN aside) with keys ``iou_per_class`` ({class name: IoU} for ids 0..15
            in id order), ``present_classes`` (ids occurring in the ground truth), ``miou`` (mean over
            all 16 ids), ``miou_present``, ``completion_iou``, ``completion_precision``,
            ``completion_recall``, ``foreground_iou``, ``miou_near``, ``miou_far``,
            ``miou_present_near``, ``miou_present_far``, ``completion_iou_near``,
            ``completion_iou_far``, ``epe`` (all both-foreground voxels), ``epe_stationary``,
            ``epe_moving``, ``flow_voxels_stationary``, ``flow_voxels_moving``, ``voxels``, ``frames``.
        """
        total = self._scores(self.confusion.sum(axis=0))
        out: dict[str, Any] = {
            "iou_per_class": {CLASS_NAMES[j]: float(total["iou"][j]) for j in range(NUM_CLASSES)},
            "present_classes": [int(j) for j in np.flatnonzero(total["present"])],
        }
        for key in (
            "miou",
            "miou_present",
            "completion_iou",
            "completion_precision",
            "completion_recall",
            "foreground_iou",
        ):
            out[key] = total[key]
        for r, name in enumerate(_REGIONS):
            scores = self._scores(self.confusion[r])
            for key in ("miou", "miou_present", "completion_iou"):
                out[f"{key}_{name}"] = scores[key]
        count = self.epe_count
        out["epe"] = float(self.epe_sum.sum() / count.sum()) if count.sum() else math.nan
        out["epe_stationary"] = float(self.epe_sum[0] / count[0]) if count[0] else math.nan
        out["epe_moving"] = float(self.epe_sum[1] / count[1]) if count[1] else math.nan
        out["flow_voxels_stationary"] = int(count[0])
        out["flow_voxels_moving"] = int(count[1])
        out["near_far_m"] = self.near_far_m
        out["moving_speed_mps"] = self.moving_speed_mps
        out["voxels"] = int(self.confusion.sum())
        out["frames"] = int(self.frames)
        return out


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of :meth:`OccupancyMetrics.compute`'s result, for terminals and logs."""
    lines = [f"{'class':<18} {'IoU %':>8}"]
    present = set(metrics.get("present_classes", []))
    for j, (name, iou) in enumerate(metrics["iou_per_class"].items()):
        mark = "" if j in present else "  (not in ground truth)"
        lines.append(f"{j:>2} {name:<15} {iou:8.2f}{mark}")
    lines.append("-" * 40)

    def fmt(v: float, unit: str = "") -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}{unit}"

    split = metrics.get("near_far_m", NEAR_FAR_SPLIT_M)
    speed = metrics.get("moving_speed_mps", MOVING_SPEED_MPS)
    rows = [
        ("mIoU (all 16 ids)", metrics["miou"], " %"),
        ("mIoU (present classes)", metrics["miou_present"], " %"),
        ("completion IoU", metrics["completion_iou"], " %"),
        ("foreground IoU", metrics["foreground_iou"], " %"),
        (f"mIoU near (< {split:g} m)", metrics["miou_near"], " %"),
        (f"mIoU far (>= {split:g} m)", metrics["miou_far"], " %"),
        ("completion IoU near", metrics["completion_iou_near"], " %"),
        ("completion IoU far", metrics["completion_iou_far"], " %"),
        (f"EPE stationary (< {speed:g} m/s)", metrics["epe_stationary"], " m/s"),
        (f"EPE moving (>= {speed:g} m/s)", metrics["epe_moving"], " m/s"),
        ("EPE all foreground", metrics["epe"], " m/s"),
    ]
    for label, value, unit in rows:
        lines.append(f"{label:<26} {fmt(value, unit):>14}")
    lines.append(f"{'frames / voxels':<26} {metrics['frames']:>6} / {metrics['voxels']}")
    return "\n".join(lines)
