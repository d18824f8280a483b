"""Occupancy and flow metrics: OpenScene's ``SSCMetrics`` numbers, bit for bit, and a few of our own.

The reference is OpenScene's ``SSCMetrics`` (``projects/mmdet3d_plugin/datasets/occupancy_metrics.py``)
as ``NuPlanDataset.evaluate_occ_iou`` runs it: 16 class ids, near and far distance 25 m, one frame per
``add_batch``. On the same arrays, every number below that carries OpenScene's name (or is mapped to one)
is the number ``SSCMetrics.get_stats`` returns, bit for bit, wherever that number is defined.

The ids come from a class table (:class:`~driveengine.schemas.classes.ClassTable`, the dataset's, recorded
in a split's manifest; default OpenScene's). The description below is for OpenScene's table (16 evaluated
ids 0..15, free = 16, foreground ids 0..9); for another table read "16" as its evaluated ids ``0 .. free -
1``, "FREE = 16" as its ``free`` and "ids 0..9" / "id < 10" as its ``foreground`` ids (Occ3D-nuScenes: 17
ids, free = 17, foreground 0..10), with the same definitions.

Inputs are dense grids ``(..., X, Y, Z)`` of class ids indexed ``[x, y, z]``, FREE = 16 for empty voxels
(sparse files are densified with 16 first, see :mod:`driveengine.formats.openscene_labels`). Voxels whose
ground truth is ``ignore_index`` (255, OpenScene's ignored value) are left out, as are voxels outside
``mask`` when one is given (e.g. ``mask_lidar``, OpenScene's ``invalid`` mask).

OpenScene's quantities (key here: OpenScene's key in ``get_stats``):

* ``iou_per_class`` (``iou_ssc``): per class id ``j`` in 0..15, over the dataset's summed counts,
  ``tp / (tp + fp + fn + 1e-5) * 100`` (percent). ``miou`` (``miou``): their mean over **all 16 ids**,
  ids absent from the ground truth counting as 0 (so a perfect prediction of OpenScene's 8 used ids
  reads 50). ``foreground_miou`` (``foreground_miou``): the mean over ids 0..9.
* ``completion_iou`` (``iou``): occupied (id != 16) against free, ``tp / (tp + fp + fn) * 100`` with
  **no** epsilon; ``precision``, ``recall`` (same names): ``tp / (tp + fp)``, ``tp / (tp + fn)`` as
  fractions. ``foreground_iou``, ``foreground_precision``, ``foreground_recall``: the same for
  foreground (id < 10) against everything else.
* Near and far: a voxel is near when the xy distance of its centre from the ego origin is **below**
  25 m and far when it is **above** 25 m (OpenScene's two strict masks; a centre at exactly 25 m is in
  neither). ``near_miou`` / ``far_miou``: mean of the per-class IoU (with the 1e-5) of the 10
  foreground ids 0..9 in the region, ``near_iou_ssc`` / ``far_iou_ssc`` those 10 IoUs by class name;
  ``near_iou``, ``near_precision``, ``near_recall`` (and ``far_*``): **foreground** completion IoU
  (percent), precision and recall (fractions) in the region.
* Flow end-point error (m/s), OpenScene's ``flow_distance`` [stationary, moving, all]: per frame, on the
  voxels where ground truth and prediction are both foreground, flows as float32, ``speed =
  ||gt_flow||`` in float32; stationary ``-0.2 <= speed < 0.2``, moving ``0.2 <= speed < 100`` (float32
  comparisons, so a speed of exactly 0.2 m/s is moving); speeds of 100 m/s or more (and non-finite ones)
  are in no region and left out. Per frame and region the float32 norms ``||gt - pred||`` are summed in
  float32 in OpenScene's voxel order (flat index ``x + X*y + X*Y*z``); those sums are added in float64
  frame after frame. ``epe_stationary``, ``epe_moving``, ``epe`` are sum / count.

Undefined values are ``None`` (JSON ``null``), never NaN, each explained in ``notes``: a ratio whose
denominator is 0 (OpenScene reports 0 for the guarded whole-scene and far ratios and raises
``ZeroDivisionError`` for the near ones, e.g. for an all-free prediction or nothing within 25 m), and
an EPE with no voxel (OpenScene reports all three flow distances as ``None`` when there is no stationary
voxel and NaN for moving when there is no moving one; we report ``None`` for exactly the empty set).

Our own quantities, under names OpenScene does not use:

* ``miou_present``: the mean IoU over the classes that occur in the ground truth (``tp + fn > 0``), the
  more readable number next to ``miou``.
* ``miou_near``, ``miou_far``, ``miou_present_near``, ``miou_present_far``, ``completion_iou_near``,
  ``completion_iou_far``: the 16-id mIoU, the present-class mIoU and the occupied-vs-free completion IoU
  (no epsilon) split at 25 m with near ``< 25 m`` and far ``>= 25 m`` (every voxel in one of them);
  ``None`` for a region without any counted voxel.
* ``flow_voxels_stationary``, ``flow_voxels_moving``, ``flow_voxels_excluded``: the voxel counts behind
  the EPEs, and the both-foreground voxels in no flow region.

The accumulator works on numpy arrays or torch tensors (any device; they are copied to host memory)
with any number of leading batch dimensions, so training loops and ``driveengine evaluate`` share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable
from driveengine.schemas.grid import GRID, VoxelGrid

#: Distance (m, xy, from the ego origin) separating near from far voxels (OpenScene: 25 for both).
NEAR_FAR_SPLIT_M = 25.0
#: Ground-truth speed (m/s) separating stationary from moving voxels in the flow EPE.
MOVING_SPEED_MPS = 0.2
#: Ground-truth speed (m/s) from which a voxel is left out of the EPE (OpenScene's last flow region ends here).
MAX_SPEED_MPS = 100.0
#: Ground-truth value of voxels that are left out of every metric.
IGNORE_INDEX = 255
#: Epsilon of OpenScene's per-class IoU formula (not used for the binary completion IoUs).
IOU_EPS = 1e-5

#: Regions of the confusion matrices: centre distance below, exactly at, above the split.
_BELOW, _AT, _ABOVE = 0, 1, 2
_NUM_REGIONS = 3
#: Flow regions of the EPE sums: 0 stationary, 1 moving.
_STATIONARY, _MOVING = 0, 1


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array or a torch tensor (detached, on the host; bf16 as float32)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def iou_percent(tp: np.ndarray | float, fp: np.ndarray | float, fn: np.ndarray | float) -> np.ndarray:
    """OpenScene's per-class IoU in percent: ``tp / (tp + fp + fn + 1e-5) * 100`` (element-wise, float64)."""
    tp = np.asarray(tp, dtype=np.float64)
    return tp / (tp + np.asarray(fp, dtype=np.float64) + np.asarray(fn, dtype=np.float64) + IOU_EPS) * 100.0


def distance_xy_m(grid: VoxelGrid) -> np.ndarray:
    """(X, Y) float64 xy distance (m) of the voxel centres from the ego origin, computed as OpenScene does.

    OpenScene's ``obtain_masked_distanced_voxel``: centre ``(i + 0.5) / n * (max - min) + min`` per axis,
    then ``np.linalg.norm`` of (x, y); computed the same way so that the near/far masks agree to the bit.
    """
    nx, ny, _ = grid.shape
    (x0, y0, _), (x1, y1, _) = grid.range_min_m, grid.range_max_m
    px = (np.arange(nx) + 0.5) / nx * (x1 - x0) + x0
    py = (np.arange(ny) + 0.5) / ny * (y1 - y0) + y0
    xy = np.stack(np.meshgrid(px, py, indexing="ij"), axis=-1)
    return np.linalg.norm(xy, axis=-1)


@dataclass
class FrameStats:
    """The statistics of one or more frames (:meth:`OccupancyMetrics.frame_stats`), frames in order.

    Attributes:
        confusion: (3, K, K) int64 counts [region (below, at, above the split distance), gt, pred] over the
            K = free + 1 ids of the class table (17 for OpenScene's).
        flow_sums: (F, 2) float64 per frame: the float32 sum of end-point errors (m/s) over its
            stationary / moving voxels (0 where there is none).
        flow_counts: (F, 2) int64 per frame: stationary / moving voxel counts.
        flow_excluded: both-foreground voxels left out of the EPE (ground-truth speed >= the maximum
            or not finite).
        frames: number of frames.
    """

    confusion: np.ndarray
    flow_sums: np.ndarray
    flow_counts: np.ndarray
    flow_excluded: int
    frames: int


class OccupancyMetrics:
    """Accumulates semantic occupancy and flow statistics over a dataset; :meth:`compute` reports them.

    Args:
        grid: the voxel grid; the last three dimensions of every input must equal ``grid.shape``
            (used for the near/far split by voxel-centre distance).
        near_far_m: xy distance (m) from the ego origin splitting near from far (OpenScene: 25).
        moving_speed_mps: ground-truth speed (m/s) at or above which a voxel counts as moving (0.2).
        max_speed_mps: ground-truth speed (m/s) at or above which a voxel is left out of the EPE (100).
        ignore_index: ground-truth value excluded from all metrics.
        classes: the class table of the labels (a split's ``classes``; default OpenScene's): the evaluated
            ids ``0 .. free - 1``, ``free``, the foreground ids and the class names in the results.

    Example::

        metrics = OccupancyMetrics()
        for batch in loader:
            metrics.update(pred_sem, gt_sem, pred_flow, gt_flow, mask=mask_lidar)
        print(metrics.compute()["miou"])
    """

    #: Accumulated arrays that several processes sum (e.g. ``all_reduce`` under DDP).
    SUMMED: tuple[str, ...] = ("confusion", "epe_sum", "epe_count", "flow_excluded")

    def __init__(
        self,
        grid: VoxelGrid = GRID,
        near_far_m: float = NEAR_FAR_SPLIT_M,
        moving_speed_mps: float = MOVING_SPEED_MPS,
        max_speed_mps: float = MAX_SPEED_MPS,
        ignore_index: int = IGNORE_INDEX,
        classes: ClassTable = OPENSCENE_CLASSES,
    ) -> None:
        self.grid = grid
        self.classes = classes
        #: Ids in the confusion matrices: the evaluated ids and free.
        self._num_ids = classes.free + 1
        #: The foreground ids, ascending.
        self._foreground = np.array(sorted(classes.foreground), dtype=np.int64)
        #: ``k`` when the foreground ids are ``0 .. k - 1`` (found by one comparison), else None.
        self._foreground_below = (
            len(self._foreground)
            if np.array_equal(self._foreground, np.arange(len(self._foreground)))
            else None
        )
        self.near_far_m = float(near_far_m)
        self.moving_speed_mps = float(moving_speed_mps)
        self.max_speed_mps = float(max_speed_mps)
        self.ignore_index = int(ignore_index)
        nx, ny, nz = grid.shape
        dist = distance_xy_m(grid)
        region_xy = np.where(dist < self.near_far_m, _BELOW, np.where(dist > self.near_far_m, _ABOVE, _AT))
        #: (X*Y*Z,) region id per voxel, C order over x, y, z.
        self._region = np.repeat(region_xy.astype(np.int32).ravel(), nz)
        #: C-order index of the voxel with OpenScene flat index k (``x + X*y + X*Y*z``).
        self._c_index = np.arange(nx * ny * nz, dtype=np.int64).reshape(nx, ny, nz).transpose(2, 1, 0).ravel()
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        #: (3, K, K) int64 confusion matrices [region, gt, pred] (below, at, above the split distance).
        self.confusion = np.zeros((_NUM_REGIONS, self._num_ids, self._num_ids), dtype=np.int64)
        #: Flow EPE sums (m/s; float64 sums of per-frame float32 sums) and voxel counts, [stationary, moving].
        self.epe_sum = np.zeros(2, dtype=np.float64)
        self.epe_count = np.zeros(2, dtype=np.int64)
        #: (1,) both-foreground voxels left out of the EPE (speed >= max_speed_mps or not finite).
        self.flow_excluded = np.zeros(1, dtype=np.int64)
        self.frames = 0

    def merge(self, other: OccupancyMetrics) -> None:
        """Add the statistics of ``other`` (e.g. from another process) to this accumulator.

        Counts add exactly; the EPE sums are float sums, so merging in another order than the frames'
        can change their last bits (``driveengine evaluate`` adds frame statistics in frame order).

        Raises:
            ValueError: ``other`` counts the ids of another class table.
        """
        if other.classes != self.classes:
            raise ValueError(
                f"cannot merge metrics of class table {other.classes.name} into {self.classes.name}"
            )
        self.confusion += other.confusion
        self.epe_sum += other.epe_sum
        self.epe_count += other.epe_count
        self.flow_excluded += other.flow_excluded
        self.frames += other.frames

    def update(
        self,
        pred_sem: Any,
        gt_sem: Any,
        pred_flow: Any | None = None,
        gt_flow: Any | None = None,
        mask: Any | None = None,
    ) -> None:
        """Add one frame or a batch of frames (see :meth:`frame_stats` for the arguments)."""
        self.add(self.frame_stats(pred_sem, gt_sem, pred_flow, gt_flow, mask))

    def add(self, stats: FrameStats) -> None:
        """Add the statistics of :meth:`frame_stats`; the EPE sums frame after frame, as OpenScene does.

        Raises:
            ValueError: ``stats`` counts another number of ids (another class table).
        """
        if stats.confusion.shape != self.confusion.shape:
            raise ValueError(
                f"frame statistics of shape {stats.confusion.shape} do not fit the class table "
                f"{self.classes.name} ({self.confusion.shape})"
            )
        self.confusion += stats.confusion
        for sums, counts in zip(stats.flow_sums, stats.flow_counts, strict=True):
            for r in (_STATIONARY, _MOVING):
                if counts[r]:  # OpenScene: ``if point_num: flow_l2_distances[index] += l2_distance``
                    self.epe_sum[r] += sums[r]
                    self.epe_count[r] += counts[r]
        self.flow_excluded += stats.flow_excluded
        self.frames += stats.frames

    def frame_stats(
        self,
        pred_sem: Any,
        gt_sem: Any,
        pred_flow: Any | None = None,
        gt_flow: Any | None = None,
        mask: Any | None = None,
    ) -> FrameStats:
        """The statistics of one frame or a batch of frames, without changing the accumulator.

        Safe to call from several threads at once; add the results with :meth:`add` in frame order.

        Args:
            pred_sem: (..., X, Y, Z) integer class ids of the prediction, ``0 .. free`` of the class table
                (OpenScene's: 0..16, 16 = free).
            gt_sem: same shape, ground-truth class ids ``0 .. free``, or ``ignore_index`` to leave a voxel out.
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
        free = self.classes.free
        if pred.size and (pred.min() < 0 or pred.max() > free):
            raise ValueError(f"predicted class ids must be in 0..{free}, got {pred.min()}..{pred.max()}")
        keep = gt != self.ignore_index
        if mask is not None:
            m = np.broadcast_to(_to_numpy(mask).astype(bool, copy=False), full_shape)
            keep &= m.reshape(-1, nvox)
        bad = keep & ((gt < 0) | (gt > free))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} ground-truth voxels have ids outside 0..{free} (and are not "
                f"ignore_index {self.ignore_index}), e.g. {gt[bad][:5].tolist()}"
            )
        gt_i = gt.astype(np.int32, copy=False)
        pred_i = pred.astype(np.int32, copy=False)
        n = self._num_ids
        code = self._region[None, :] * (n * n) + gt_i * n + pred_i
        counts = np.bincount(code[keep], minlength=_NUM_REGIONS * n * n)
        frames = pred.shape[0]
        stats = FrameStats(
            confusion=counts.reshape(_NUM_REGIONS, n, n).astype(np.int64, copy=False),
            flow_sums=np.zeros((frames, 2), dtype=np.float64),
            flow_counts=np.zeros((frames, 2), dtype=np.int64),
            flow_excluded=0,
            frames=frames,
        )
        if pred_flow is None or gt_flow is None:
            return stats
        pf = _to_numpy(pred_flow)
        gf = _to_numpy(gt_flow)
        want = (*full_shape, 2)
        if pf.shape != want or gf.shape != want:
            raise ValueError(f"flow arrays must have shape {want}, got {pf.shape} and {gf.shape}")
        pf = pf.reshape(frames, nvox, 2)
        gf = gf.reshape(frames, nvox, 2)
        both_fg = keep & self._is_foreground(gt_i) & self._is_foreground(pred_i)
        for f in range(frames):
            stats.flow_excluded += self._frame_flow(both_fg[f], pf[f], gf[f], stats, f)
        return stats

    def _is_foreground(self, ids: np.ndarray) -> np.ndarray:
        """Bool array: ``ids`` is a foreground id of the class table (OpenScene's: id < 10)."""
        if self._foreground_below is not None:
            return ids < self._foreground_below
        return np.isin(ids, self._foreground)

    def _frame_flow(
        self, both_fg: np.ndarray, pflow: np.ndarray, gflow: np.ndarray, stats: FrameStats, f: int
    ) -> int:
        """One frame's EPE sums into ``stats`` row ``f`` (OpenScene's ``get_flow_l2_distance``).

        Returns:
            The number of both-foreground voxels in no flow region.
        """
        nx, ny, nz = self.grid.shape
        # OpenScene's voxel order (flat index x + X*y + X*Y*z): the float32 sums depend on the order.
        k = np.flatnonzero(both_fg.reshape(nx, ny, nz).transpose(2, 1, 0))
        if not k.size:
            return 0
        idx = self._c_index[k]
        # OpenScene densifies flows into float32 arrays before anything else.
        g = np.take(gflow, idx, axis=0).astype(np.float32)
        p = np.take(pflow, idx, axis=0).astype(np.float32)
        speed = np.linalg.norm(g, axis=-1)  # float32, as OpenScene's ``_flow_true_magnitude``
        split = np.float32(self.moving_speed_mps)
        regions = (
            (speed >= -split) & (speed < split),  # OpenScene's flow_regions [-0.2, 0.2)
            (speed >= split) & (speed < np.float32(self.max_speed_mps)),  # [0.2, 100)
        )
        err = np.linalg.norm(g - p, axis=-1)  # float32 per voxel, OpenScene's ``vel_true - vel_pred``
        counted = 0
        for r, in_region in enumerate(regions):
            n = int(np.count_nonzero(in_region))
            if n:
                stats.flow_sums[f, r] = float(np.sum(err[in_region]))  # a float32 sum, as OpenScene's
                stats.flow_counts[f, r] = n
                counted += n
        return int(k.size) - counted

    # -- results ---------------------------------------------------------------------------------

    def compute(self) -> dict[str, Any]:
        """All metrics of what was accumulated (see the module docstring for each key).

        Returns:
            A JSON-ready dict: IoUs in percent, precision/recall as fractions, EPE in m/s; ``None`` where a
            value is undefined, with one line per such value in ``notes``. Keys: ``iou_per_class``
            ({class name: IoU} for the evaluated ids ``0 .. free - 1`` in id order), ``present_classes``, ``miou``,
            ``miou_present``, ``foreground_miou``, ``completion_iou``, ``precision``, ``recall``,
            ``foreground_iou``, ``foreground_precision``, ``foreground_recall``, ``near_miou``,
            ``near_iou``, ``near_precision``, ``near_recall``, ``near_iou_ssc``, the same five ``far_*``,
            ``miou_near``, ``miou_far``, ``miou_present_near``, ``miou_present_far``,
            ``completion_iou_near``, ``completion_iou_far``, ``epe``, ``epe_stationary``, ``epe_moving``,
            ``flow_voxels_stationary``, ``flow_voxels_moving``, ``flow_voxels_excluded``, ``near_far_m``,
            ``moving_speed_mps``, ``max_speed_mps``, ``voxels``, ``frames``, ``notes``.
        """
        notes: list[str] = []
        split = f"{self.near_far_m:g} m"
        out: dict[str, Any] = {}
        names = self.classes.names
        evaluated = np.arange(self.classes.num_classes)  # ids 0 .. free - 1 (OpenScene's 0..15)
        fg = self._foreground  # OpenScene's 0..9

        total = self.confusion.sum(axis=0)
        tp, fp, fn = _class_counts(total, evaluated)
        iou = iou_percent(tp, fp, fn)  # OpenScene: iou_ssc = tps / (tps + fps + fns + 1e-5) * 100.0
        present = (tp + fn) > 0
        out["iou_per_class"] = {names[j]: float(iou[j]) for j in evaluated}
        out["present_classes"] = [int(j) for j in np.flatnonzero(present)]
        out["miou"] = float(np.mean(iou))  # OpenScene: "miou": np.mean(iou_ssc)
        out["miou_present"] = _mean_present(iou, present, "miou_present", "", notes)
        out["foreground_miou"] = float(np.mean(iou[fg]))  # np.mean(iou_ssc[:10])

        # OpenScene guards these with ``if tp != 0 ... else 0, 0, 0``
        occupied = _binary_counts(total, evaluated)  # id != 16
        _binary_scores(
            out, "completion_iou", "precision", "recall", occupied, "occupied voxel", "reports 0", notes
        )
        foreground = _binary_counts(total, fg)  # id < 10
        _binary_scores(
            out, "foreground_iou", "foreground_precision", "foreground_recall", foreground, "foreground voxel",
            "reports 0", notes,
        )  # fmt: skip

        for name, conf, openscene in (
            ("near", self.confusion[_BELOW], "raises ZeroDivisionError"),  # no guard in get_stats
            ("far", self.confusion[_ABOVE], "reports 0"),  # ``if self.far_completion_tp != 0``
        ):
            ftp, ffp, ffn = _class_counts(conf, fg)
            fiou = iou_percent(ftp, ffp, ffn)  # OpenScene: {near,far}_iou_ssc over class_num=10
            out[f"{name}_miou"] = float(np.mean(fiou))  # OpenScene: np.mean({near,far}_iou_ssc)
            counts = _binary_counts(conf, fg)
            what = f"foreground voxel {'within' if name == 'near' else 'beyond'} {split}"
            _binary_scores(
                out, f"{name}_iou", f"{name}_precision", f"{name}_recall", counts, what, openscene, notes
            )
            out[f"{name}_iou_ssc"] = {names[j]: float(fiou[i]) for i, j in enumerate(fg)}

        # ours: every voxel is near (< split) or far (>= split)
        for name, conf in (
            ("near", self.confusion[_BELOW]),
            ("far", self.confusion[_AT] + self.confusion[_ABOVE]),
        ):
            rtp, rfp, rfn = _class_counts(conf, evaluated)
            riou = iou_percent(rtp, rfp, rfn)
            where = f" {'within' if name == 'near' else 'at or beyond'} {split}"
            out[f"miou_{name}"] = float(np.mean(riou)) if conf.any() else None
            if out[f"miou_{name}"] is None:
                notes.append(f"miou_{name}: no voxel counted{where}")
            out[f"miou_present_{name}"] = _mean_present(
                riou, (rtp + rfn) > 0, f"miou_present_{name}", where, notes
            )
            ctp, cfp, cfn = _binary_counts(conf, evaluated)
            out[f"completion_iou_{name}"] = _ratio(ctp, ctp + cfp + cfn, 100.0)
            if out[f"completion_iou_{name}"] is None:
                notes.append(
                    f"completion_iou_{name}: no occupied voxel{where} in ground truth or prediction (0/0)"
                )

        out.update(self._flow_scores(notes))
        out["near_far_m"] = self.near_far_m
        out["moving_speed_mps"] = self.moving_speed_mps
        out["max_speed_mps"] = self.max_speed_mps
        out["voxels"] = int(self.confusion.sum())
        out["frames"] = int(self.frames)
        out["notes"] = notes
        return out

    def _flow_scores(self, notes: list[str]) -> dict[str, Any]:
        """``epe*`` and ``flow_voxels_*`` (OpenScene's ``flow_distance``), with notes on undefined ones."""
        sums, counts = self.epe_sum, self.epe_count
        speed = f"{self.moving_speed_mps:g} m/s"
        out: dict[str, Any] = {
            "epe_stationary": _ratio(sums[_STATIONARY], counts[_STATIONARY]),
            "epe_moving": _ratio(sums[_MOVING], counts[_MOVING]),
            # OpenScene: np.sum(flow_l2_distances) / np.sum(flow_point_nums)
            "epe": _ratio(sums[_STATIONARY] + sums[_MOVING], counts[_STATIONARY] + counts[_MOVING]),
            "flow_voxels_stationary": int(counts[_STATIONARY]),
            "flow_voxels_moving": int(counts[_MOVING]),
            "flow_voxels_excluded": int(self.flow_excluded[0]),
        }
        if not counts[_STATIONARY]:
            notes.append(
                f"epe_stationary: no voxel with a ground-truth speed below {speed} where ground truth and "
                "prediction are both foreground (OpenScene then reports None for all three flow distances)"
            )
        if not counts[_MOVING]:
            notes.append(
                f"epe_moving: no voxel with a ground-truth speed of {speed} or more where ground truth and "
                "prediction are both foreground (OpenScene reports NaN, 0/0)"
            )
        if not counts.sum():
            notes.append("epe: no voxel where ground truth and prediction are both foreground")
        for key in ("epe_stationary", "epe_moving", "epe"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
                notes.append(f"{key}: the predicted flow is not finite on some counted voxels")
        if out["flow_voxels_excluded"]:
            notes.append(
                f"flow_voxels_excluded: {out['flow_voxels_excluded']} both-foreground voxels with a ground-truth "
                f"speed of {self.max_speed_mps:g} m/s or more (or not finite) are in no EPE, as in OpenScene"
            )
        return out


def _class_counts(conf: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (tp, fp, fn) float64 of the class ``ids`` of a (K, K) [gt, pred] confusion matrix."""
    diag = np.diag(conf)[ids]
    fp = conf[:, ids].sum(axis=0) - diag  # OpenScene: y_true != j and y_pred == j
    fn = conf[ids, :].sum(axis=1) - diag  # OpenScene: y_true == j and y_pred != j
    return diag.astype(np.float64), fp.astype(np.float64), fn.astype(np.float64)


def _binary_counts(conf: np.ndarray, positive: np.ndarray) -> tuple[int, int, int]:
    """(tp, fp, fn) of "id in ``positive``" against the other ids of a (K, K) [gt, pred] confusion matrix
    (the evaluated ids: occupied vs free; the foreground ids: foreground vs the rest)."""
    pos = np.zeros(len(conf), dtype=bool)
    pos[positive] = True
    neg = ~pos
    return int(conf[pos][:, pos].sum()), int(conf[neg][:, pos].sum()), int(conf[pos][:, neg].sum())


def _ratio(num: float, den: float, scale: float | None = None) -> float | None:
    """``num / den`` (times ``scale`` when given, OpenScene's ``... * 100.0``); None when ``den`` is 0."""
    if not den:
        return None
    value = num / den
    return float(value * scale if scale is not None else value)


def _binary_scores(
    out: dict[str, Any],
    iou_key: str,
    precision_key: str,
    recall_key: str,
    counts: tuple[int, int, int],
    what: str,
    openscene: str,
    notes: list[str],
) -> None:
    """IoU (percent, no epsilon), precision and recall (fractions) of binary counts into ``out``.

    Python ints divided as in OpenScene's ``get_stats`` (``tp / (tp + fp + fn) * 100.0``); a 0/0 is
    None with a note naming ``what`` is missing and what OpenScene does there (``openscene``, e.g.
    "reports 0").
    """
    tp, fp, fn = counts
    out[iou_key] = _ratio(tp, tp + fp + fn, 100.0)
    out[precision_key] = _ratio(tp, tp + fp)
    out[recall_key] = _ratio(tp, tp + fn)
    if out[iou_key] is None:
        notes.append(f"{iou_key}: no {what} in ground truth or prediction (0/0; OpenScene {openscene})")
    if out[precision_key] is None:
        notes.append(f"{precision_key}: no {what} predicted (0/0; OpenScene {openscene})")
    if out[recall_key] is None:
        notes.append(f"{recall_key}: no {what} in the ground truth (0/0; OpenScene {openscene})")


def _mean_present(
    iou: np.ndarray, present: np.ndarray, key: str, where: str, notes: list[str]
) -> float | None:
    """Mean IoU over the classes present in the ground truth; None (with a note) when there is none."""
    if present.any():
        return float(iou[present].mean())
    notes.append(f"{key}: no class of ids 0..{len(iou) - 1} occurs in the ground truth{where}")
    return None


def _fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}{unit}"
    )


def _id_span(ids: list[int]) -> str:
    """``0-9`` for consecutive ids, else ``0, 3, 5``."""
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return ", ".join(map(str, ids))


def summary_line(metrics: dict[str, Any]) -> str:
    """One line with OpenScene's all-id mIoU and the present-class mIoU beside it, explained (the number
    of ids is that of the class table the metrics were computed with).

    Example: ``mIoU 12.50 % over all 16 ids (OpenScene's; the 14 ids absent from the ground truth count
    as 0) | 100.00 % over the 2 classes present``.
    """
    evaluated = len(metrics["iou_per_class"])
    present = len(metrics.get("present_classes", []))
    absent = evaluated - present
    line = (
        f"mIoU {_fmt(metrics['miou'], ' %', 2)} over all {evaluated} ids (OpenScene's; the {absent} ids "
        f"absent from the ground truth count as 0)"
    )
    if metrics.get("miou_present") is None:
        return line + " | no class present in the ground truth"
    return line + f" | {_fmt(metrics['miou_present'], ' %', 2)} over the {present} classes present"


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of :meth:`OccupancyMetrics.compute`'s result, for terminals and logs."""
    lines = [summary_line(metrics), f"{'class':<18} {'IoU %':>8}"]
    present = set(metrics.get("present_classes", []))
    for j, (name, iou) in enumerate(metrics["iou_per_class"].items()):
        mark = "" if j in present else "  (not in ground truth)"
        lines.append(f"{j:>2} {name:<15} {iou:8.2f}{mark}")
    lines.append("-" * 40)

    split = metrics.get("near_far_m", NEAR_FAR_SPLIT_M)
    speed = metrics.get("moving_speed_mps", MOVING_SPEED_MPS)
    m = metrics

    def pair(a: str, b: str, unit: str = "") -> str:
        return f"{_fmt(m[a])} / {_fmt(m[b])}{unit}"

    names = list(m["iou_per_class"])
    evaluated = len(names)
    fg = _id_span([names.index(name) for name in m.get("near_iou_ssc", {}) if name in names])
    rows = [
        (f"mIoU (all {evaluated} ids)", _fmt(m["miou"], " %")),
        ("mIoU (present classes)", _fmt(m["miou_present"], " %")),
        (f"foreground mIoU (ids {fg})", _fmt(m["foreground_miou"], " %")),
        ("completion IoU", _fmt(m["completion_iou"], " %")),
        ("  precision / recall", pair("precision", "recall")),
        ("foreground IoU", _fmt(m["foreground_iou"], " %")),
        ("  precision / recall", pair("foreground_precision", "foreground_recall")),
        (f"near_miou / far_miou (ids {fg})", pair("near_miou", "far_miou", " %")),
        ("near_iou / far_iou (foreground)", pair("near_iou", "far_iou", " %")),
        (f"mIoU near / far ({evaluated} ids)", pair("miou_near", "miou_far", " %")),
        ("completion IoU near / far", pair("completion_iou_near", "completion_iou_far", " %")),
        (f"EPE stationary (< {speed:g} m/s)", _fmt(m["epe_stationary"], " m/s")),
        (f"EPE moving (>= {speed:g} m/s)", _fmt(m["epe_moving"], " m/s")),
        ("EPE all foreground", _fmt(m["epe"], " m/s")),
    ]
    for label, text in rows:
        lines.append(f"{label:<34} {text:>18}")
    lines.append(
        f"(near_*: centre < {split:g} m, far_*: > {split:g} m, OpenScene's; mIoU/completion near / far: "
        f"< {split:g} m / >= {split:g} m)"
    )
    lines.append(f"{'frames / voxels':<34} {metrics['frames']:>6} / {metrics['voxels']}")
    for note in metrics.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
