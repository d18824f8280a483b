"""The evaluate stage: occupancy/flow metrics of predicted labels against ground-truth labels.

Each side is either

* a **collected split folder** (``<out>/<split>`` with ``manifest.json``, ``meta/<log>.parquet`` and
  ``occ/<log>.zarr``), or
* an **OpenScene v1.0 folder** of sparse files ``.../<scene_name>/occ_gt/{frame_idx:03d}_occ_final.npy``
  (and ``_flow_final.npy``; any zero padding of the frame index is accepted), searched recursively.

Frames are matched by ``token`` when both sides are collected splits (and must then belong to the same
log), otherwise by ``(scene_name, frame_idx)``. Any frame present on one side only is an error (the
message gives counts and examples), as are invalid sparse files and grids that differ: a partial
evaluation is never reported as a full one.

Metrics are :class:`~driveengine.evaluation.metrics.OccupancyMetrics`: OpenScene's ``SSCMetrics`` numbers bit
for bit (frame statistics are added in ground-truth frame order whatever the number of threads), plus our
own present-class and near/far figures. The **mask** restricts every metric to the ground truth's observed
voxels: ``lidar`` (``mask_lidar``: seen by the LiDAR), ``camera`` (``mask_camera``: seen by the cameras,
Occ3D's camera-only protocol), ``both`` (seen by both) or ``none`` (every voxel). Default: ``lidar`` when
the ground truth is a collected split (which has ``mask_lidar``), ``none`` for OpenScene files.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from driveengine.errors import DriveEngineError
from driveengine.formats.openscene_labels import (
    FLOW_SUFFIX,
    OCC_SUFFIX,
    LabelFiles,
    check_label_files,
    read_label_file,
)
from driveengine.schemas.classes import OPENSCENE_CLASSES, ClassTable
from driveengine.schemas.grid import GRID, VoxelGrid
from driveengine.store.manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from driveengine.evaluation.metrics import FrameStats

StrPath = str | os.PathLike[str]

#: A frame loader: returns (semantics (X,Y,Z) uint8, flow (X,Y,Z,2) float, {mask array name: (X,Y,Z) bool}).
Loader = Callable[[], tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]

#: ``--mask`` values: the ground-truth mask arrays each one multiplies.
MASKS: dict[str, tuple[str, ...]] = {
    "lidar": ("mask_lidar",),
    "camera": ("mask_camera",),
    "both": ("mask_lidar", "mask_camera"),
    "none": (),
}


class EvaluationError(DriveEngineError):
    """Prediction and ground truth cannot be compared (missing frames, different grids, bad files)."""


@dataclass
class FrameRef:
    """One frame of a label source: how to match it and how to load it."""

    scene_name: str
    frame_idx: int
    token: str | None  #: None for OpenScene folders (the files carry no token)
    log: str | None  #: None for OpenScene folders
    load: Loader
    where: str  #: human-readable location, for messages


@dataclass
class LabelSource:
    """All frames of one side (prediction or ground truth)."""

    path: Path
    kind: str  #: "collected" or "openscene-v1.0" (a folder of OpenScene v1.0 label files)
    grid: VoxelGrid
    frames: list[FrameRef]
    has_mask: bool
    classes: ClassTable = (
        OPENSCENE_CLASSES  #: the class table of its labels (OpenScene v1.0 files: OpenScene's)
    )
    masks: tuple[str, ...] = ()  #: the mask arrays every frame has (``mask_lidar``, ``mask_camera``)


def _zarr_loader(occ: Any, i: int, masks: tuple[str, ...] = ("mask_lidar",)) -> Loader:
    """A loader of frame ``i`` of an opened ``occ/<log>.zarr`` group (and of its ``masks`` arrays)."""

    def load() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        f = occ.frame(i)
        out = {"mask_lidar": f.mask_lidar}
        for name in masks:
            if name not in out:
                out[name] = occ.array(name)[i]
        return f.semantics, f.flow, out

    return load


def _npy_loader(files: LabelFiles, grid: VoxelGrid) -> Loader:
    """A loader of one frame's OpenScene files (no mask)."""

    def load() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        sem, flow = read_label_file(files.occ, files.flow, grid)
        return sem, flow, {}

    return load


def _collected_source(split_dir: Path) -> LabelSource:
    from driveengine.store.dataset import open_split

    split = open_split(split_dir)
    frames: list[FrameRef] = []
    masks: set[str] | None = None
    for log in split.logs:
        if not log.has_labels:
            raise EvaluationError(
                f"{split_dir}: log {log.name} was collected without labels (occ is null); "
                "re-collect it with labels or evaluate another split"
            )
        rows = log.frames(["token", "scene_name", "frame_idx"]).to_pylist()
        occ = log.labels()  # checked: frame count and grid agree with the manifest and the split
        here = {a for a in occ.arrays if a.startswith("mask_")}
        masks = here if masks is None else masks & here
        for i, row in enumerate(rows):
            frames.append(
                FrameRef(
                    scene_name=str(row["scene_name"]),
                    frame_idx=int(row["frame_idx"]),
                    token=str(row["token"]),
                    log=log.name,
                    load=_zarr_loader(occ, i, tuple(sorted(here))),
                    where=f"{log.occ_path}[{i}]",
                )
            )
    return LabelSource(
        split_dir, "collected", split.grid, frames, has_mask=True, classes=split.classes,
        masks=tuple(sorted(masks or {"mask_lidar"})),
    )  # fmt: skip


def _openscene_source(folder: Path, grid: VoxelGrid) -> LabelSource:
    frames: list[FrameRef] = []
    files: list[LabelFiles] = []
    for occ_path in sorted(folder.rglob(f"*{OCC_SUFFIX}")):
        stem = occ_path.name[: -len(OCC_SUFFIX)]
        if not (stem.isascii() and stem.isdigit()):
            raise EvaluationError(
                f"{occ_path}: file name is not <frame_idx>{OCC_SUFFIX} (OpenScene writes {{frame_idx:03d}}); "
                "rename or remove it"
            )
        scene_dir = occ_path.parent.parent if occ_path.parent.name == "occ_gt" else occ_path.parent
        flow_path = occ_path.with_name(stem + FLOW_SUFFIX)
        lf = LabelFiles(occ_path, flow_path if flow_path.exists() else None)
        files.append(lf)
        frames.append(FrameRef(scene_dir.name, int(stem), None, None, _npy_loader(lf, grid), str(occ_path)))
    if not frames:
        raise EvaluationError(
            f"{folder}: no {MANIFEST_NAME} and no *{OCC_SUFFIX} files below it; pass a collected split "
            "folder (<out>/<split>) or a folder of OpenScene v1.0 occupancy files"
        )
    report = check_label_files(files, grid)
    if not report.ok:
        raise EvaluationError(report.message())
    return LabelSource(folder, "openscene-v1.0", grid, frames, has_mask=False)


def open_label_source(path: StrPath, grid: VoxelGrid = GRID) -> LabelSource:
    """The frames of a collected split folder or of an OpenScene v1.0 sparse-file folder.

    Args:
        path: the folder.
        grid: the grid of OpenScene files' flat indices (collected splits record their own).
    """
    path = Path(path)
    if not path.is_dir():
        raise EvaluationError(f"{path}: no such folder")
    if (path / MANIFEST_NAME).exists():
        return _collected_source(path)
    return _openscene_source(path, grid)


def _index(
    source: LabelSource, by_token: bool, other: dict[Any, FrameRef] | None = None
) -> dict[Any, FrameRef]:
    """Frames of ``source`` by token or by (scene_name, frame_idx).

    With ``other`` (the index of an OpenScene folder), a collected frame whose scene name
    ``<log>-<source scene>`` is not a key there uses the source scene name when that one is: OpenScene
    names its folders by its own scene names (``log-XXXX-scene-YYYY``).
    """
    index: dict[Any, FrameRef] = {}
    for f in source.frames:
        key = f.token if by_token else (f.scene_name, f.frame_idx)
        if other is not None and key not in other and f.log and f.scene_name.startswith(f"{f.log}-"):
            alt = (f.scene_name[len(f.log) + 1 :], f.frame_idx)
            key = alt if alt in other else key
        if key in index:
            raise EvaluationError(
                f"{source.path}: two frames share the key {key!r} ({index[key].where} and {f.where}); "
                "evaluate one split at a time"
            )
        index[key] = f
    return index


def match_frames(pred: LabelSource, gt: LabelSource) -> list[tuple[FrameRef, FrameRef]]:
    """Pairs (prediction, ground truth) in ground-truth order.

    Raises:
        EvaluationError: frames on one side only, frames matched across different logs, or
            different grids.
    """
    if pred.grid != gt.grid:
        raise EvaluationError(
            f"{pred.path}: grid {pred.grid} differs from the ground truth's {gt.grid} ({gt.path})"
        )
    if pred.classes != gt.classes:
        raise EvaluationError(
            f"{pred.path}: class table {pred.classes.name} differs from the ground truth's {gt.classes.name} "
            f"({gt.path}); compare labels of the same dataset"
        )
    by_token = pred.kind == "collected" and gt.kind == "collected"
    if by_token or pred.kind == gt.kind:
        pi, gi = _index(pred, by_token), _index(gt, by_token)
    elif pred.kind == "openscene-v1.0":
        pi = _index(pred, False)
        gi = _index(gt, False, other=pi)
    else:
        gi = _index(gt, False)
        pi = _index(pred, False, other=gi)
    missing = [k for k in gi if k not in pi]
    extra = [k for k in pi if k not in gi]
    if missing or extra:
        what = "token" if by_token else "(scene_name, frame_idx)"
        parts = [
            f"prediction {pred.path} and ground truth {gt.path} do not hold the same frames (by {what}):"
        ]
        if missing:
            parts.append(
                f"{len(missing)} of {len(gi)} ground-truth frames have no prediction, e.g. {missing[:3]}"
            )
        if extra:
            parts.append(
                f"{len(extra)} of {len(pi)} predicted frames are not in the ground truth, e.g. {extra[:3]}"
            )
        parts.append(
            "predict every frame of the split, or evaluate against the split the prediction was made for"
        )
        raise EvaluationError(" ".join(parts))
    pairs = [(pi[k], gi[k]) for k in gi]
    if by_token:
        wrong = [(p.log, g.log, g.token) for p, g in pairs if p.log != g.log]
        if wrong:
            raise EvaluationError(
                f"{len(wrong)} frames are under different logs in {pred.path} and {gt.path}, "
                f"e.g. (pred log, gt log, token) {wrong[0]}"
            )
    return pairs


def evaluate(
    pred: StrPath,
    gt: StrPath,
    *,
    mask_lidar: bool | None = None,
    mask: str | None = None,
    grid: VoxelGrid = GRID,
    workers: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of the labels in ``pred`` against those in ``gt`` (see the module docstring).

    Args:
        pred: collected split folder or OpenScene v1.0 folder with the predicted labels.
        gt: the same for the ground truth.
        mask_lidar: the older way to choose the mask: True = ``lidar``, False = ``none``.
        mask: ``lidar``, ``camera``, ``both`` or ``none`` (:data:`MASKS`, see the module doc); None = the
            default (``lidar`` when the ground truth has ``mask_lidar``, else ``none``).
        grid: grid of OpenScene files (collected splits carry their own).
        workers: threads loading and scoring frames (Zarr decompression and numpy release the GIL);
            their statistics are added in ground-truth frame order, so the result does not depend on it
            (bit for bit, the EPE float sums included).
        progress: show progress on stderr (:mod:`driveengine.progress`: a bar on a terminal, lines in a file).

    Returns:
        :meth:`OccupancyMetrics.compute`'s dict plus ``pred``, ``gt``, ``mask`` (the mask used),
        ``mask_lidar`` (bool: whether ``mask_lidar`` restricted the metrics) and ``matched_by`` (``token`` or
        ``scene_frame``).

    Raises:
        EvaluationError: mismatched inputs (see :func:`match_frames`), an unknown mask, or a mask the
            ground truth does not have.
    """
    from driveengine.evaluation.metrics import OccupancyMetrics
    from driveengine.progress import track

    if mask is not None and mask not in MASKS:
        raise EvaluationError(f"--mask {mask!r}: use one of {', '.join(MASKS)}")
    if mask is not None and mask_lidar is not None and (mask == "lidar") != mask_lidar:
        raise EvaluationError("--mask and --mask-lidar/--no-mask-lidar disagree; use --mask alone")
    pred_src = open_label_source(pred, grid)
    gt_src = open_label_source(gt, grid)
    if mask is None:
        mask = (
            ("lidar" if gt_src.has_mask else "none")
            if mask_lidar is None
            else ("lidar" if mask_lidar else "none")
        )
    missing = [a for a in MASKS[mask] if a not in gt_src.masks]
    if missing:
        if gt_src.kind != "collected":
            raise EvaluationError(
                f"{gt_src.path}: OpenScene v1.0 files carry no mask_lidar or mask_camera (--mask {mask}); use "
                "--mask none (or --no-mask-lidar), or a collected split as ground truth"
            )
        raise EvaluationError(
            f"{gt_src.path}: the ground truth has no {' and '.join(missing)} (--mask {mask}); re-collect it "
            "with --label-camera-mask, or choose another --mask"
        )
    names = MASKS[mask]
    pairs = match_frames(pred_src, gt_src)
    metrics = OccupancyMetrics(grid=gt_src.grid, classes=gt_src.classes)

    def score(pair: tuple[FrameRef, FrameRef]) -> FrameStats:
        p_sem, p_flow, _ = pair[0].load()
        g_sem, g_flow, g_masks = pair[1].load()
        keep = None
        for name in names:
            keep = g_masks[name] if keep is None else keep & g_masks[name]
        return metrics.frame_stats(p_sem, g_sem, p_flow, g_flow, mask=keep)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for stats in track(
            _ordered_map(pool, score, pairs, ahead=4 * max(1, workers)),
            total=len(pairs), desc="evaluate", unit="frame", show=progress,
        ):  # fmt: skip
            metrics.add(stats)  # in ground-truth frame order: the EPE float sums are OpenScene's
    out = metrics.compute()
    out.update(
        {
            "pred": str(pred_src.path),
            "gt": str(gt_src.path),
            "mask": mask,
            "mask_lidar": "mask_lidar" in names,
            "matched_by": "token" if pred_src.kind == gt_src.kind == "collected" else "scene_frame",
        }
    )
    return out


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any], ahead: int
) -> Iterator[Any]:
    """``fn(item)`` for every item, computed on ``pool``, yielded in order; at most ``ahead`` in flight.

    Unlike ``pool.map`` (which submits everything at once and keeps every finished result until its
    turn), memory stays bounded by ``ahead`` results.
    """
    it = iter(items)
    pending: deque[Future[Any]] = deque(pool.submit(fn, item) for item in islice(it, max(1, ahead)))
    while pending:
        result = pending.popleft().result()
        pending.extend(pool.submit(fn, item) for item in islice(it, 1))
        yield result


def to_json_ready(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {k: to_json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
